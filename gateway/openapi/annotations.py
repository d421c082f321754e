"""The OpenAPI description of the annotation API (gateway.annotations.api), its query being the very
marshmallow schema that gateway.annotations.query's parse_query loads."""
import dataclasses

from marshmallow import INCLUDE, Schema, fields

from ..annotations import api
from ..annotations.query import _QuerySchema
from . import answers
from .common import TERM, TEXT, json_content, new_spec, retry_after_header, schema_name

TITLE = "Imaging research gateway: annotation API"
DESCRIPTION = (
    "Finds radiology reports by the NLP annotations of their text and answers their DICOM identifiers, in the "
    "conventions of the existing annotation service. Every call answers GET and POST (and the CORS preflight "
    "OPTIONS), with or without the trailing slash. A search's query comes as j=<JSON> (in the query string or "
    "as a form field) or as a POSTed JSON body; without one, the path's text is the single term. callback=NAME "
    "turns any answer, errors too, into JSONP (application/javascript, status 200). When the gateway has a "
    "passphrase (GATEWAY_PASSPHRASE; need_passphrase tells), every call but need_passphrase and check_phrase "
    "needs passphrase=<its sha256 hex digest>, in the query string, a form field or the JSON body."
)
SECURITY = {"passphrase": {
    "type": "apiKey", "in": "query", "name": "passphrase",
    "description": "the sha256 hex digest of the gateway's passphrase; needed only when the gateway has one "
                   "(also as a form field, or inside a POSTed JSON body)",
}}
_METHODS = ("get", "post", "options")
_ERRORS = {
    "400": "a malformed or too large query, naming the bad key or value; a NUL or a lone surrogate anywhere; an "
           "invalid callback name or paging",
    "401": "a missing or wrong passphrase",
    "404": "an unknown document or mapping",
    "429": "too many wrong passphrases from this client lately",
    "500": "an error of the gateway itself; it is logged",
    "503": "the search ran out of its time budget",
}


# Any JSON value: one that is no string is a wrong passphrase where one is needed, and ignored elsewhere.
_PASSPHRASE = {"description": "the sha256 hex digest of the gateway's passphrase, when it has one"}


class PostedQuery(_QuerySchema):
    """The query as j or a POSTed body carry it: the passphrase may travel inside it."""

    passphrase = fields.Raw(metadata=_PASSPHRASE)


class PassphraseOnly(Schema):
    """A search's POSTed body that carries only the passphrase (or nothing): it asks for no query."""

    passphrase = fields.Raw(metadata=_PASSPHRASE)


class Passphrase(PassphraseOnly):
    """The POSTed body of a call that is no search: its other keys are ignored (old clients send some)."""

    class Meta:
        unknown = INCLUDE


@dataclasses.dataclass(frozen=True)
class _Call:
    summary: str
    answer: object  # a marshmallow schema or a JSON schema
    search: bool = False
    passphrase: bool = True  # needs it, when the gateway has one
    throttled: bool = True  # wrong passphrases count against the client: 429 after too many
    not_found: bool = False
    paged: bool = False


_BOOLEAN = {"type": "boolean"}
_SEARCH = "the query's matching documents; without j or a JSON body, {text} is the single term"
# Each call by its path under /api/, as its rule names it (path parameters as {name})
CALLS = {
    "/need_passphrase": _Call("Whether the calls need a passphrase", _BOOLEAN, passphrase=False, throttled=False),
    "/check_phrase/{phrase}": _Call(
        "Whether {phrase} is the passphrase's sha256 hex digest (false when none is configured)", _BOOLEAN,
        passphrase=False),
    "/docs": _Call("The documents' SOPInstanceUIDs, paged", answers.DocumentPage, paged=True),
    "/doc_detail/{docid}": _Call("A document's metadata, annotations, phenotypes, sentences and text",
                                 answers.DocumentDetail, not_found=True),
    "/getDocDetail/{docid}": _Call("doc_detail by its older name", answers.DocumentDetail, not_found=True),
    "/doc_content_mapping/{docid}/{mapping_name}": _Call(
        "A document with only the annotations whose CUI the mapping lists", answers.MappedDocumentDetail,
        not_found=True),
    "/mappings": _Call("The names of the mappings", {"type": "array", "items": {"type": "string"}}),
    "/search_anns/{text}": _Call(f"Search the annotations: {_SEARCH}", answers.SearchResults, search=True),
    "/search_anns_by_mapping/{text}/{mapping_name}": _Call(
        f"search_anns, for a client that shows the documents through the mapping: {_SEARCH}", answers.SearchResults,
        search=True, not_found=True),
    "/search_docs/{text}": _Call(f"Search the report texts' words: {_SEARCH} (a text or item without a word, of "
                                 "letters or digits, is a 400)", answers.SearchResults, search=True),
}


def build():
    spec = new_spec(TITLE, DESCRIPTION, SECURITY)
    spec.components.schema(answers.SEARCH_ROW, schema=answers.SearchRow)
    spec.components.schema("AnnotationError", schema=answers.AnnotationError)
    for schema in (PostedQuery, PassphraseOnly, Passphrase):
        spec.components.schema(schema_name(schema), schema=schema)
    for status, description in _ERRORS.items():
        error = {"description": description, "content": json_content("AnnotationError")}
        if status == "429":
            error["headers"] = retry_after_header()
        spec.components.response(f"Error{status}", error)
    spec.components.response("Preflight", {"description": "the CORS preflight: no body, no passphrase"})
    for path, call in CALLS.items():
        for slash in ("", "/"):
            spec.path(path=api.bp.url_prefix + path + slash, operations={
                method: _operation(path, call, method, slash) for method in _METHODS
            })
    return spec.to_dict()


def _operation_id(path, method, slash):
    name = path.strip("/").split("/")[0]
    return f"{name}{'_slash' if slash else ''}_{method}"


def _path_parameters(path):
    """The path's parameters: {text}, a search's single term when it has no query, is read as a term's q."""
    return [{"name": part[1:-1], "in": "path", "required": True,
             "schema": {"type": "string", "pattern": TERM} if part == "{text}" else {**TEXT, "minLength": 1}}
            for part in path.split("/") if part.startswith("{")]


def _operation(path, call, method, slash):
    operation = {
        "operationId": _operation_id(path, method, slash),
        "summary": call.summary,
        "tags": ["annotations"],
        "parameters": _path_parameters(path),
    }
    if method == "options":
        return {**operation, "summary": "CORS preflight", "security": [],
                "responses": {"204": {"$ref": "#/components/responses/Preflight"},
                              "414": {"$ref": "#/components/responses/Error414"}}}
    operation["security"] = [{}, {"passphrase": []}] if call.passphrase else []
    # j is read by every call (it may carry the passphrase), and must be a JSON object
    query = {"j": {"description": "the query, as JSON", "content": json_content(_posted(call))}}
    if call.paged:
        query["offset"] = {"schema": {"type": "integer", "minimum": 0, "default": 0}}
        # the bounds that gateway.annotations.store.document_uids checks
        query["limit"] = {"schema": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100}}
    if method == "get":
        operation["parameters"] += [{"name": name, "in": "query", **value} for name, value in query.items()]
    else:
        operation["requestBody"] = _body(call, query)
    operation["parameters"].append({
        "name": "callback", "in": "query", "description": "answer JSONP: NAME(json), status 200",
        "schema": {"type": "string", "pattern": f"^{api._CALLBACK.pattern}$"},
    })
    operation["responses"] = {"200": _success(call), **{
        status: {"$ref": f"#/components/responses/Error{status}"} for status in _error_statuses(call)}}
    return operation


def _body(call, query):
    """A POST's body: its query as JSON (passphrase inside), or form fields, j the JSON text of its query
    parameter (a multipart part of type application/json). Other fields are read too, and refused with a NUL."""
    fields = {"passphrase": TEXT, **{name: value["schema"] for name, value in query.items() if "schema" in value}}
    form = {"type": "object", "additionalProperties": TEXT}
    json_text = {"type": "string", "contentMediaType": "application/json", "contentSchema": _posted(call)}
    return {"required": False, "content": {
        **json_content(_posted(call)),
        "application/x-www-form-urlencoded": {"schema": {**form, "properties": {**fields, "j": json_text}}},
        "multipart/form-data": {"schema": {**form, "properties": {**fields, "j": _posted(call)}},
                                "encoding": {"j": {"contentType": "application/json"}}},
    }}


def _posted(call):
    """The JSON object that j or a POSTed body holds: a search's query (or just the passphrase, and the
    path's text is the query); for another call anything, of which only a passphrase is read."""
    if call.search:
        return {"anyOf": [_ref(PostedQuery), _ref(PassphraseOnly)]}
    return _ref(Passphrase)


def _ref(schema):
    return {"$ref": f"#/components/schemas/{schema_name(schema)}"}


def _success(call):
    return {"description": call.summary, "content": {
        **json_content(call.answer),
        "application/javascript": {"schema": {"type": "string", "description": "with callback=NAME: NAME(json)"}},
    }}


def _error_statuses(call):
    statuses = ["400", "414", "500"]
    if call.passphrase:
        statuses.append("401")
    if call.throttled:
        statuses.append("429")
    if call.not_found:
        statuses.append("404")
    if call.search:
        statuses.append("503")
    return sorted(statuses)
