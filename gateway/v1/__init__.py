"""The archive API v1 blueprint (`/api/v1/…`): a thin layer over gateway.archive."""
import dataclasses
import logging

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect
from werkzeug.utils import secure_filename

from .. import archive as archive_store
from .. import forms, results
from ..auth.users import authenticate
from ..errors import GatewayError, InvalidValue, NotAllowed, NotAuthenticated
from ..openapi import answers
from ..projects import archive_ref
from ..validation import check_parameters, storable_text

log = logging.getLogger(__name__)

bp = Blueprint("v1", __name__, url_prefix="/api/v1")

PATIENT = ("PatientID",)
STUDY = ("PatientID", "StudyInstanceUID")
SERIES = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
DELETE_METHODS = ("GET", "DELETE")
# A body up to this size (or the upload limit, if smaller) is read before the credentials are checked,
# which spares small uploads a query (a stranger costs no more than answering them); a larger or
# unsized one waits for the credentials and the call's permission.
_SMALL_BODY_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Call:
    """A call as its view and its OpenAPI description (gateway.openapi.v1) both read it."""

    rule: str
    methods: tuple
    permission: str
    parameters: tuple  # required besides Project and Archive, in the order the view is given them
    summary: str
    answer: tuple = ()  # the marshmallow schemas its JSON answer is one of
    optional: tuple = ()  # parameters the view reads itself
    file: str = None  # the multipart part `file`: "required", or "optional" (instead of the optional parameters)
    zip_answer: bool = False  # it answers application/zip (as well as JSON, when `answer` has schemas)


CALLS = {}  # by endpoint


def _call(rule, permission, *parameters, methods=("GET",), **description):
    """Route a view as the call that this declares (a Call), which _authorised_call reads for it."""

    def register(view):
        call = CALLS[f"{bp.name}.{view.__name__}"] = Call(rule, methods, permission, parameters, **description)
        bp.add_url_rule(rule, view_func=view, methods=methods)
        if "DELETE" in call.methods:
            # not the HEAD that werkzeug adds to every rule with GET: a HEAD must never delete. Taken off
            # the rule itself, so routing refuses it and no Allow header or OPTIONS lists it.
            bp.record(lambda state: _drop_head(state.app, f"{state.name}.{view.__name__}"))
        return view

    return register


def _authorised_call(check_body=None):
    """Credentials, then permission, then the parameters of the call's declaration (and `check_body`),
    then project and archive: the spec's error order."""
    call = CALLS[request.endpoint]
    permission, parameters = call.permission, call.parameters
    username, password = request.headers.get("X-USERNAME"), request.headers.get("X-PASSWORD")
    if not username or not password:  # answered before an upload's body is read
        raise NotAuthenticated(None, "X-USERNAME and X-PASSWORD headers are required")
    if request.method != "GET" and _body_waits_for_credentials():  # werkzeug reads a form for every other method
        authenticate(username, password, permission)  # so a stranger's body is never spooled
    values = [request.values.get(name) for name in ("Project", "Archive", *parameters)]
    project, archive = (_stored_name_or_none(value) for value in values[:2])
    access = authenticate(username, password, permission, project, archive)
    for name, value in zip(("Project", "Archive", *parameters), values):
        if not value:
            raise InvalidValue("missing_parameter", f"the parameter {name} is required")
    check_parameters(request.values.items(multi=True))
    if check_body is not None:
        check_body()
    return access.id, archive_ref(access, values[0], values[1]), values[2:]


def _stored_name_or_none(value):
    """`value` if a stored name could equal it; the stores refuse some text (a NUL) outright."""
    try:
        return storable_text(value, "name")
    except ValueError:
        return None


def _body_waits_for_credentials():
    length = request.content_length
    return length is None or length > min(_SMALL_BODY_BYTES, current_app.config["MAX_CONTENT_LENGTH"])


def _drop_head(app, endpoint):
    for url_rule in app.url_map.iter_rules(endpoint):
        url_rule.methods.discard("HEAD")


def _uploaded_file():
    """The multipart part `file` as (open temp file, client's filename, size), or None."""
    upload = request.files.get("file")
    if upload is None:
        return None
    upload.stream.seek(0, 2)
    return upload.stream, upload.filename, upload.stream.tell()


def _require_file():
    upload = _uploaded_file()
    if upload is None or upload[2] == 0:
        raise InvalidValue("no_data_submitted", "no file was submitted (a multipart field named 'file' is expected)")


@_call("/instance/upload/", "api_instance_upload", methods=("POST",), file="required", answer=(answers.Uploaded,),
       summary="Upload a DICOM Part 10 file: its PatientID and UIDs")
def upload_instance():
    _user_id, archive, _ = _authorised_call(check_body=_require_file)
    if not archive.can_upload:
        raise NotAllowed(None, "uploading to this project needs the upload right (upload_project)")
    handle, filename, size = _uploaded_file()
    return jsonify(archive_store.store_instance(archive, handle, size, filename))


@_call("/patient/get/", "api_get_patient", *PATIENT, answer=(answers.Patient,), summary="A patient")
def get_patient():
    _user_id, archive, params = _authorised_call()
    return jsonify(archive_store.get_patient(archive, *params))


@_call("/patient/delete/", "api_delete_patient", *PATIENT, methods=DELETE_METHODS, answer=(answers.Deleted,),
       summary="Delete a patient with everything below it")
def delete_patient():
    _user_id, archive, params = _authorised_call()
    archive_store.delete_patient(archive, *params)
    return jsonify(status="Ok")


@_call("/study/get/", "api_get_study", *STUDY, answer=(answers.Study,), summary="A study")
def get_study():
    _user_id, archive, params = _authorised_call()
    return jsonify(archive_store.get_study(archive, *params))


@_call("/patient/studies/list/", "api_list_studies", *PATIENT, answer=(answers.Study(many=True),),
       summary="A patient's studies")
def list_studies():
    _user_id, archive, params = _authorised_call()
    return jsonify(archive_store.list_studies(archive, *params))


@_call("/study/delete/", "api_delete_study", *STUDY, methods=DELETE_METHODS, answer=(answers.Deleted,),
       summary="Delete a study with everything below it")
def delete_study():
    _user_id, archive, params = _authorised_call()
    archive_store.delete_study(archive, *params)
    return jsonify(status="Ok")


@_call("/series/get/", "api_get_series", *SERIES, answer=(answers.Series,), summary="A series")
def get_series():
    _user_id, archive, params = _authorised_call()
    return jsonify(archive_store.get_series(archive, *params))


@_call("/patient/study/series/list/", "api_list_series", *STUDY, answer=(answers.Series(many=True),),
       summary="A study's series")
def list_series():
    _user_id, archive, params = _authorised_call()
    return jsonify(archive_store.list_series(archive, *params))


@_call("/dicom/get/", "api_dicom_get", *SERIES, zip_answer=True,
       summary="A zip of the series' instances, one <SOPInstanceUID>.dcm each")
def get_series_dicom():
    _user_id, archive, params = _authorised_call()
    chunks = archive_store.series_zip(archive, *params)
    filename = secure_filename(params[-1]) or "series"
    return Response(
        chunks, mimetype="application/zip", headers={"Content-Disposition": f'attachment; filename="{filename}.zip"'}
    )


@_call("/series/delete/", "api_delete_series", *SERIES, methods=DELETE_METHODS, answer=(answers.Deleted,),
       summary="Delete a series with its instances, results and form submissions")
def delete_series():
    _user_id, archive, params = _authorised_call()
    archive_store.delete_series(archive, *params)
    return jsonify(status="Ok")


@_call("/series/results/add/", "api_add_series_results", *SERIES, "Type", "Name", "Algorithm", methods=("POST",),
       optional=("Value",), file="optional", answer=(answers.ScalarResult, answers.FileResult),
       summary="Store a result of the series: a scalar Value or a file, replacing one of the same Name")
def add_series_result():
    _user_id, archive, params = _authorised_call()
    value = request.form.get("Value")
    return jsonify(results.add_result(archive, *params, value=value, upload=_uploaded_file()))


@_call("/series/results/", "api_series_results", *SERIES, "Type", "Results", answer=(answers.ScalarResult(many=True),),
       zip_answer=True, summary="Results of the series by name: JSON for scalars, a zip when any is a file")
def get_series_results():
    _user_id, archive, params = _authorised_call()
    kind, answer = results.get_results(archive, *params)
    if kind == "json":
        return jsonify(answer)
    return Response(answer, mimetype="application/zip", headers={"Content-Disposition": 'attachment; filename="results.zip"'})


@_call("/patient/study/series/forms/list/", "api_list_forms", *SERIES, answer=(answers.FormSubmission(many=True),),
       summary="The series' form submissions")
def list_form_submissions():
    _user_id, archive, params = _authorised_call()
    return jsonify(forms.list_submissions(archive, *params))


@_call("/patient/study/series/forms/add/", "api_add_form_submission", *SERIES, "FormName", "FormSubmission",
       methods=("POST",), answer=(answers.FormSubmission,), summary="Submit a reporting form for the series")
def add_form_submission():
    user_id, archive, params = _authorised_call()
    return jsonify(forms.add_submission(archive, user_id, *params))


# --- error bodies ----------------------------------------------------------------------------------------

_HTTP_ERRORS = {
    308: ("moved_permanently", None, "this call's URL ends with a slash: {location}"),
    400: (None, None, "the request could not be read"),
    404: ("object_not_found", "unknown_call", "there is no such API call"),
    405: ("method_not_allowed", None, "this call does not accept the {method} method"),
    413: ("invalid_post_value", "file_too_large", "the upload is larger than the gateway accepts"),
}


def _error_body(status, error_type, suberror_type, message):
    response = jsonify(error_type=error_type, suberror_type=suberror_type, message=message)
    response.status_code = status
    return response


def _value_error_type():
    return "invalid_post_value" if request.method == "POST" else "invalid_get_value"


def register_error_handlers(app):
    """JSON error bodies for everything under /api/v1/, never an HTML page or a stack trace."""

    def in_v1():
        return request.path.startswith(bp.url_prefix + "/") or request.path == bp.url_prefix

    @app.errorhandler(GatewayError)
    def gateway_error(error):
        error_type = error.error_type
        if error_type == "invalid_value":
            error_type = _value_error_type()
        response = _error_body(error.status, error_type, error.suberror_type, error.message)
        response.headers.update(error.headers)
        return response

    @app.errorhandler(HTTPException)
    def http_error(error):
        if not in_v1():
            return error
        location = getattr(error, "new_url", None)  # a RequestRedirect's
        error_type, suberror_type, template = _HTTP_ERRORS.get(error.code, ("http_error", None, None))
        # only our own templates are formatted: a description can quote the client's bytes, braces too
        message = template.format(method=request.method, location=location) if template else None
        if message is None or (error.code == 400 and error.description != BadRequest.description):
            message = error.description or error.name
        elif error.code == 413:
            message += f" ({app.config['MAX_UPLOAD_MB']:g} MB)"
        response = _error_body(error.code, error_type or _value_error_type(), suberror_type, message)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
        if location:
            response.headers["Location"] = location
        return response

    @app.before_request
    def unslashed_method_not_allowed():
        """Routing answers a method that a call does not take, on the call's path without its trailing
        slash, as no call at all (404): it is that call's 405, with the methods it takes."""
        if isinstance(request.routing_exception, NotFound) and in_v1() and not request.path.endswith("/"):
            methods = app.create_url_adapter(request).allowed_methods(request.path + "/")
            if methods:
                return http_error(MethodNotAllowed(valid_methods=methods))
        return None

    @app.before_request
    def redirect_in_json():
        """Routing answers a path without its trailing slash with a redirect, which no handler sees."""
        if isinstance(request.routing_exception, RequestRedirect) and in_v1():
            return http_error(request.routing_exception)
        return None

    @app.errorhandler(Exception)
    def unexpected_error(error):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error_body(500, "internal_error", None, "the gateway failed to answer; the error is logged")
