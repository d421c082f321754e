"""The annotation API blueprint (`/api/…` beside `/api/v1/`): a thin HTTP layer over gateway.annotations.

It keeps the conventions that the existing service's clients (curl, requests, urllib, R httr, a jQuery
page) rely on: the query comes as `?j=JSON`, as a POSTed JSON body or as a form field `j` (else, or when
`j` is blank, the path's QUERY is the single term); `callback=NAME` wraps any answer, errors included, as
JSONP; every answer lets any origin read it (CORS).
"""
import itertools
import json
import logging
import re
import uuid

from flask import Blueprint, Response, current_app, g, request, stream_with_context
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from ..db import utcnow
from ..errors import GatewayError, InvalidValue, NotAuthenticated, ObjectNotFound
from ..validation import check_parameters, parse_json
from ..v1 import bp as archive_bp
from . import mappings, store
from .query import parse_query, search_annotations, search_documents

log = logging.getLogger(__name__)

bp = Blueprint("annotations", __name__, url_prefix="/api")

MAX_REQUEST_BYTES = 1_000_000  # a body, or the j parameter
_CHUNK_CHARACTERS = 32_768  # results are written in chunks of about this size, not a system call per row
_CALLBACK = re.compile(r"[A-Za-z_$][\w$.]*", re.ASCII)
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "X-Content-Type-Options": "nosniff",
}
_PASSPHRASE_NEEDED = "this call needs passphrase=<sha256 hex digest of the passphrase> (inside the body of a POST)"
_NO_ROWS = object()


def _call(rule):
    """A call that answers GET and POST (OPTIONS too), with or without the trailing slash."""
    return bp.route(rule, methods=("GET", "POST", "OPTIONS"), strict_slashes=False)


# --- the calls ----------------------------------------------------------------------------------------


@_call("/need_passphrase")
def need_passphrase():
    return _answer(_passphrase().required)


@_call("/check_phrase/<phrase>")
def check_phrase(phrase):
    # Without a passphrase no phrase is the right one, as the existing service answers.
    passphrase = _passphrase()
    return _answer(passphrase.required and passphrase.accepts(request.remote_addr, phrase))


@_call("/docs")
def docs():
    offset, limit = _integer("offset", 0), _integer("limit", 100)
    uids = store.document_uids(offset, limit)
    return _results("docs", {"offset": offset, "limit": limit}, iter(uids))


@_call("/doc_detail/<docid>")
@_call("/getDocDetail/<docid>")
def doc_detail(docid):
    return _answer(store.doc_detail(docid))


@_call("/doc_content_mapping/<docid>/<mapping_name>")
def doc_content_mapping(docid, mapping_name):
    detail = store.doc_detail(docid, only_cuis=_cui_terms(_mapping(mapping_name)))
    detail["anns"]["mapping_name"] = mapping_name
    return _answer(detail)


@_call("/mappings")
def mapping_names():
    return _answer(mappings.mapping_names())


@_call("/search_anns/<text>")
def search_anns(text):
    return _search("search_anns", text, search_annotations)


@_call("/search_anns_by_mapping/<text>/<mapping_name>")
def search_anns_by_mapping(text, mapping_name):
    _mapping(mapping_name)  # names how the client will show the documents: the search is search_anns'
    return _search("search_anns_by_mapping", text, search_annotations)


@_call("/search_docs/<text>")
def search_docs(text):
    return _search("search_docs", text, search_documents)


def _search(call, text, run):
    query = g.query if g.query is not None else {"terms": [{"q": text}]}
    search = run(parse_query(query))  # checked and compiled before the answer starts
    return _results(call, query, search.rows(), search.warnings)


def _mapping(name):
    mapping = mappings.get_mapping(name)
    if mapping is None:
        raise ObjectNotFound("mapping_not_found", f"there is no mapping {name!r}")
    return mapping


def _cui_terms(mapping):
    """{cui: term} of a mapping {term: [cui]}: a CUI listed under several terms shows the first."""
    cui_terms = {}
    for term, cuis in mapping.items():
        for cui in cuis:
            cui_terms.setdefault(cui, term)
    return cui_terms


def _integer(name, default):
    value = request.values.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or abs(number) >= 2**63:  # beyond what the stores' integers hold
        raise InvalidValue("invalid_paging", f"{name} must be an integer")
    return number


def _passphrase():
    return current_app.extensions["gateway.passphrase"]


# --- reading the request --------------------------------------------------------------------------------


@bp.before_request
def _read_request():
    """The callback name, then the query, then the passphrase, each refused before the call does any work."""
    if request.method == "OPTIONS":  # a CORS preflight: no passphrase, nothing to read
        preflight = Response(status=204)
        preflight.headers.remove("Content-Type")
        return preflight
    if "callback" in request.args and _jsonp_name() is None:
        raise InvalidValue("invalid_callback", "callback must be a JavaScript function name ([A-Za-z_$][\\w$.]*)")
    # A body of unknown length (chunked) is read to one byte past the limit: longer ones are then told
    # from those that just fit, instead of being cut off silently.
    request.max_content_length = MAX_REQUEST_BYTES + 1
    request.max_form_memory_size = MAX_REQUEST_BYTES
    # path parts too (a document id, a mapping name); the JSON query's own strings are parse_query's
    check_parameters([*(request.view_args or {}).items(), *request.values.items(multi=True)])
    passphrase, g.query = _passphrase_and_query()
    if current_app.view_functions[request.endpoint] in (need_passphrase, check_phrase):
        return None
    if not _passphrase().accepts(request.remote_addr, passphrase):
        raise NotAuthenticated(None, "the passphrase is wrong" if passphrase else _PASSPHRASE_NEEDED)
    return None


def _passphrase_and_query():
    """(passphrase, query) of the request; query: the JSON object of a POSTed body or of `j`, else None.

    The passphrase travels in the query string or a form, or inside the JSON object.
    """
    values = request.values  # the query string, and a form body's fields
    body = request.get_data() if request.method == "POST" and request.mimetype not in _FORM_TYPES else b""
    source, text = ("the POSTed body", body) if body.strip() else ("j", values.get("j"))
    passphrase = values.get("passphrase")
    if text is None or not text.strip():  # a blank j= (the existing clients send one) is no j
        return passphrase, None
    if len(text) > MAX_REQUEST_BYTES:
        raise InvalidValue("invalid_query", f"{source} is longer than {MAX_REQUEST_BYTES:,} bytes")
    try:
        query = parse_json(text, source)
    except ValueError as error:
        raise InvalidValue("invalid_query", str(error)) from None
    if not isinstance(query, dict):
        raise InvalidValue("invalid_query", f"{source} must be a JSON object with 'terms'")
    passphrase = query.pop("passphrase", passphrase)
    return passphrase, query or None  # a body that held just the passphrase asks for no query


# --- answers ----------------------------------------------------------------------------------------------


def _jsonp_name():
    """The request's JSONP callback name; None when it asks for none, or for an invalid one (a 400 in
    plain JSON)."""
    name = request.args.get("callback")
    return name if name is not None and _CALLBACK.fullmatch(name) else None


def _respond(body, status=200):
    """The response of a JSON text, or of a generator of JSON text chunks (streamed); JSONP when asked."""
    name = _jsonp_name()
    if name is None:
        return Response(body, status, mimetype="application/json")
    body = f"{name}({body})" if isinstance(body, str) else _jsonp_stream(name, body)
    return Response(body, 200, mimetype="application/javascript")  # a script tag cannot see the status


def _jsonp_stream(name, chunks):
    yield f"{name}("
    yield from chunks  # closing this generator closes `chunks` too
    yield ")"


def _answer(value, status=200):
    return _respond(json.dumps(value), status)


def error_answer(status, message):
    """The annotation API's error body (the /vis/ page's too)."""
    return _answer({"success": False, "message": message}, status)


def _results(call, query, rows, warnings=()):
    """A success answer, streamed as `rows` (an iterator) yields, and recorded as a transaction when the
    stream ends, with the number of results sent (fewer when the client went away).

    The first row is read before the answer starts, so that an error running the search is still
    answered as an error.
    """
    transaction_id, started_at, client_address = str(uuid.uuid4()), utcnow(), request.remote_addr
    search_log = current_app.extensions["gateway.search_log"]
    query_json = json.dumps(query)
    first = next(rows, _NO_ROWS)
    head = {"success": True, "transactionId": transaction_id, **({"warnings": warnings} if warnings else {})}

    def chunks():
        count = 0
        try:
            yield json.dumps(head)[:-1] + ', "results": ['
            separator, batch, size = "", [], 0
            for row in itertools.chain(() if first is _NO_ROWS else (first,), rows):
                batch.append(json.dumps(row))
                size += len(batch[-1])
                if size >= _CHUNK_CHARACTERS:
                    count += len(batch)
                    yield separator + ",".join(batch)
                    separator, batch, size = ",", [], 0
            count += len(batch)
            yield f'{separator}{",".join(batch)}], "num_results": {count}}}'
        finally:
            if hasattr(rows, "close"):  # a search's rows hold a database cursor
                rows.close()
            search_log.record(transaction_id, started_at, call, query_json, client_address, count)

    return _respond(stream_with_context(chunks()))


# --- errors and headers of everything under /api/ but /api/v1/ -----------------------------------------------

_HTTP_MESSAGES = {
    308: "this call's URL is {location}",
    404: "there is no such call in the annotation API",
    405: "this call does not accept the {method} method",
    413: f"the request is larger than the annotation API accepts ({MAX_REQUEST_BYTES:,} bytes)",
}


def _in_annotation_api():
    def under(prefix):
        return request.path == prefix or request.path.startswith(prefix + "/")

    return under(bp.url_prefix) and not under(archive_bp.url_prefix)


@bp.errorhandler(GatewayError)
def _gateway_error(error):
    response = error_answer(error.status, error.message)
    response.headers.update(error.headers)
    return response


@bp.errorhandler(HTTPException)
def _http_error(error):
    message = _HTTP_MESSAGES.get(error.code)
    location = getattr(error, "new_url", None)  # a RequestRedirect's (a path with a doubled slash)
    message = message.format(method=request.method, location=location) if message else error.description
    response = error_answer(400 if error.code == 413 else error.code, message)  # too large to read is a bad query
    if location:
        response.headers["Location"] = location
    return response


@bp.errorhandler(Exception)
def _unexpected_error(_exception):
    # The endpoint, not the path: a check_phrase path holds a passphrase digest.
    log.exception("unexpected error in %s %s", request.method, request.endpoint)
    return error_answer(500, "the gateway failed to answer; the error is logged")


@bp.before_app_request
def _unknown_call():
    """A path under /api/ that names no call (or a method no call takes) belongs to no blueprint, so no
    handler of this one would see its error: it is answered here, before dispatch raises it."""
    error = request.routing_exception
    if isinstance(error, (NotFound, MethodNotAllowed, RequestRedirect)) and _in_annotation_api():
        return _http_error(error)
    return None


@bp.after_app_request
def _headers(response):
    if _in_annotation_api():
        response.headers.update(_HEADERS)
    return response
