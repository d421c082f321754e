"""The OpenAPI description of archive API v1, from the calls' declarations (gateway.v1.CALLS)."""
from .. import v1
from ..models import PROJECT_KINDS
from ..results import _XML_ILLEGAL
from . import answers
from .common import BINARY, TEXT, VALUES, json_content, new_spec, one_of, retry_after_header

TITLE = "Imaging research gateway: archive API v1"
DESCRIPTION = (
    "Hospitals and screening programmes upload DICOM images into projects and archives, browse patients, "
    "studies and series, download a series as a zip, and read and store algorithm results and reporting forms. "
    "Every call signs in with the headers X-USERNAME and X-PASSWORD (both), needs its api_* permission and "
    "membership of the project, and names a Project and an Archive; errors come in this order: credentials, "
    "permission, parameters, project and archive, then the object asked for. Every call's URL ends with a "
    "slash: without it the answer is a 308 to the right one."
)
SECURITY = {
    "username": {"type": "apiKey", "in": "header", "name": "X-USERNAME", "description": "the user's name"},
    "password": {"type": "apiKey", "in": "header", "name": "X-PASSWORD", "description": "the user's password"},
}
ARCHIVE_PARAMETERS = ("Project", "Archive")
# Each error status the calls answer, with what it means; every error body is a V1Error.
_ERRORS = {
    "400": "invalid_get_value (GET, DELETE) or invalid_post_value (POST): missing_parameter, invalid_parameter (a NUL"
           " or a lone surrogate), no_data_submitted, invalid_dicom, invalid_type, invalid_form_submission,"
           " invalid_value",
    "401": "not_authenticated: X-USERNAME or X-PASSWORD missing or wrong",
    "403": "api_call_not_allowed: the user lacks the call's permission, or the project's upload right",
    "404": "object_not_found: project_not_found (also for a project the user is not a member of), archive_not_found,"
           " patient_not_found, study_not_found, series_not_found, no_dicom_available, result_not_found,"
           " form_not_found",
    "409": "invalid_post_value conflicting_instance (an upload that contradicts what is stored), or"
           " multiple_objects_found multiple_forms_found (a FormName that matches several forms ignoring case)",
    "413": "invalid_post_value file_too_large: a body larger than the gateway accepts",
    "429": "not_authenticated too_many_failures: this client or account failed to sign in too often lately",
    "500": "internal_error: an error of the gateway itself; it is logged",
}
_EVERY_CALL = ("400", "401", "403", "404", "429", "500")
_CONFLICTS = {"upload_instance", "add_form_submission"}
_PARAMETER_TEXT = {**TEXT, "minLength": 1}
# The characters a result's texts may not hold (gateway.results: they go into results.xml), escaped for JSON Schema
_NOT_XML = "".join(character if character == "-" else f"\\u{ord(character):04x}"
                   for character in _XML_ILLEGAL.pattern.strip("[]"))
_XML_TEXT = f"^[^{_NOT_XML}]*$"
_NAME_END = f"[^,\\s\\u0085{_NOT_XML}]"  # a Name holds no comma, and no space at either end
# Form fields that hold JSON text
_JSON_FIELDS = {"FormSubmission": {"type": "object", "description": "the submission, checked against the form's fields"}}
_PARAMETERS = {  # else _PARAMETER_TEXT
    "Type": {"type": "string", "enum": list(PROJECT_KINDS)},
    "Results": {"type": "string", "pattern": VALUES, "description": "result names, comma-separated"},
    "Name": {"type": "string", "maxLength": 200, "pattern": f"^({_NAME_END}|{_NAME_END}[^,{_NOT_XML}]*{_NAME_END})$"},
    "Algorithm": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": _XML_TEXT},
    "Value": {"type": "string", "pattern": _XML_TEXT,
              "description": "an integer or a decimal is stored as a number, anything else as text"},
}


def build():
    spec = new_spec(TITLE, DESCRIPTION, SECURITY)
    spec.components.schema("V1Error", schema=answers.V1Error)
    for status, description in _ERRORS.items():
        error = {"description": description, "content": json_content("V1Error")}
        if status == "429":
            error["headers"] = retry_after_header()
        spec.components.response(f"Error{status}", error)
    spec.components.response("Redirect", {
        "description": "moved_permanently: the call's URL is the one with a trailing slash",
        "headers": {"Location": {"description": "the call's URL", "schema": {"type": "string"}}},
        "content": json_content("V1Error"),
    })
    for endpoint, call in v1.CALLS.items():
        name = endpoint.rpartition(".")[2]
        path = v1.bp.url_prefix + call.rule
        spec.path(path=path, operations={
            method.lower(): _operation(name, call, method, index) for index, method in enumerate(call.methods)
        })
        spec.path(path=path.rstrip("/"), operations={
            method.lower(): _redirect(name, call, method, index) for index, method in enumerate(call.methods)
        })
    return spec.to_dict()


def _operation_id(name, method, index):
    return name if index == 0 else f"{name}_with_{method.lower()}"


def _operation(name, call, method, index):
    operation = {
        "operationId": _operation_id(name, method, index),
        "summary": call.summary,
        "description": f"Needs the permission {call.permission}.",
        "tags": ["archive"],
        "security": [{"username": [], "password": []}],
        "responses": {"200": _success(name, call), **{status: {"$ref": f"#/components/responses/Error{status}"}
                                                       for status in _error_statuses(name, method)}},
    }
    names = (*ARCHIVE_PARAMETERS, *call.parameters)
    if method == "POST":
        operation["requestBody"] = _form_body(call, names)
    else:
        operation["parameters"] = [
            {"name": parameter, "in": "query", "required": True, "schema": _parameter(parameter)} for parameter in names
        ] + [{"name": parameter, "in": "query", "schema": _parameter(parameter)} for parameter in call.optional]
    return operation


def _redirect(name, call, method, index):
    return {
        "operationId": f"{_operation_id(name, method, index)}_unslashed",
        "summary": f"{call.summary} (without the trailing slash: a redirect)",
        "tags": ["archive"],
        "security": [],
        "responses": {"308": {"$ref": "#/components/responses/Redirect"},
                      "414": {"$ref": "#/components/responses/Error414"}},
    }


def _parameter(name):
    return _PARAMETERS.get(name, _PARAMETER_TEXT)


def _error_statuses(name, method):
    statuses = [*_EVERY_CALL, "414"]
    if method == "POST":
        statuses.append("413")
    if name in _CONFLICTS:
        statuses.append("409")
    return sorted(statuses)


def _form_body(call, names):
    """Multipart form fields (and, without a file, urlencoded ones); a JSON field is an application/json part."""
    properties = {parameter: _parameter(parameter) for parameter in names}
    properties.update({parameter: _parameter(parameter) for parameter in call.optional})
    json_fields = [parameter for parameter in names if parameter in _JSON_FIELDS]
    # any other field is read too (and refused with a NUL)
    form = {"type": "object", "properties": properties, "required": list(names), "additionalProperties": TEXT}
    multipart = {**form, "properties": {**properties, **{name: _JSON_FIELDS[name] for name in json_fields}}}
    urlencoded = {**form, "properties": {**properties, **{name: {
        "type": "string", "contentMediaType": "application/json", "contentSchema": _JSON_FIELDS[name]}
        for name in json_fields}}}
    if call.file:
        multipart["properties"]["file"] = BINARY
        if call.file == "required":
            multipart["required"] = [*names, "file"]
        else:  # a file instead of the optional parameters
            multipart["oneOf"] = [{"required": list(call.optional)}, {"required": ["file"]}]
            urlencoded["required"] = [*names, *call.optional]
    content = {"multipart/form-data": {"schema": multipart}}
    if json_fields:
        content["multipart/form-data"]["encoding"] = {name: {"contentType": "application/json"} for name in json_fields}
    if call.file != "required":
        content["application/x-www-form-urlencoded"] = {"schema": urlencoded}
    return {"required": True, "content": content}


def _success(name, call):
    content = json_content(one_of(call.answer)) if call.answer else {}
    answer = {"description": call.summary, "content": content}
    if call.zip_answer:
        content["application/zip"] = {"schema": BINARY}
        answer["headers"] = {"Content-Disposition": {
            "description": "attachment; filename=\"….zip\"", "schema": {"type": "string"}}}
    if name in _LINKS:
        answer["links"] = _LINKS[name]
    return answer


# --- links: what an answer lets the next call ask for (a stateful test tool follows them) -------------------

_ARCHIVE_OF_REQUEST = {parameter: f"$request.body#/{parameter}" for parameter in ARCHIVE_PARAMETERS}
_SERIES_OF_REQUEST = {**_ARCHIVE_OF_REQUEST, **{parameter: f"$request.body#/{parameter}" for parameter in v1.SERIES}}


def _upload_links():
    """To each call that names no more than the uploaded objects (with their keys as parameters), and to each
    that adds to the uploaded series (with them in its body)."""
    links = {}
    for endpoint, call in v1.CALLS.items():
        name = endpoint.rpartition(".")[2]
        keys = {**_ARCHIVE_OF_REQUEST, **{key: f"$response.body#/{key}" for key in v1.SERIES if key in call.parameters}}
        for index, method in enumerate(call.methods):
            operation_id = _operation_id(name, method, index)
            if call.parameters and set(call.parameters) <= set(v1.SERIES):
                links[operation_id] = {"operationId": operation_id, "parameters": keys}
            elif method == "POST" and set(v1.SERIES) <= set(call.parameters):
                links[operation_id] = {"operationId": operation_id, "requestBody": keys}
    return links


_LINKS = {
    "upload_instance": _upload_links(),
    "add_series_result": {
        "get_series_results": {"operationId": "get_series_results", "parameters": {
            **_SERIES_OF_REQUEST, "Type": "$request.body#/Type", "Results": "$response.body#/name"}},
        "get_series": {"operationId": "get_series", "parameters": _SERIES_OF_REQUEST},
    },
    "add_form_submission": {
        "list_form_submissions": {"operationId": "list_form_submissions", "parameters": _SERIES_OF_REQUEST},
    },
}
