"""The OpenAPI descriptions of both APIs (gateway.openapi): valid OpenAPI 3.1, listing exactly the routes the
app has, served with a Swagger UI page that loads from the gateway alone, and describing real answers."""
import json
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import jsonschema
import pytest
from openapi_spec_validator import validate

from gateway.annotations.query import _QuerySchema
from gateway.forms import create_form
from tests.conftest import PROJECT_ROOT, assert_error, credentials, instance

DESCRIPTIONS = {"/openapi/v1.json": "/api/v1/", "/openapi/annotations.json": "/api/"}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SERIES_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


def described(client):
    """{description URL: the description} as the app serves them."""
    documents = {}
    for url in DESCRIPTIONS:
        response = client.get(url)
        assert response.status_code == 200 and response.mimetype == "application/json", url
        documents[url] = response.get_json()
    return documents


def described_routes(document):
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item if method in METHODS}


def app_routes(app, prefix):
    """(path, method) of every call the app routes under `prefix`, its paths written as OpenAPI writes them.

    HEAD (which werkzeug adds to every GET) is left out, and so is the OPTIONS that Flask answers itself; a
    rule that takes its path with and without the trailing slash counts twice, and a v1 path without its
    trailing slash is a call of its own too: routing answers it with a 308 to the rule's path.
    """
    routes = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(prefix) or (prefix == "/api/" and rule.rule.startswith("/api/v1/")):
            continue
        methods = rule.methods - {"HEAD"} - ({"OPTIONS"} if rule.provide_automatic_options else set())
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        forms = {path.rstrip("/"), path.rstrip("/") + "/"} if not rule.strict_slashes or path.endswith("/") else {path}
        routes |= {(form, method) for form in forms for method in methods}
    return routes


def route_differences(app, documents):
    """What the app routes and no description lists, and the reverse."""
    unlisted, unrouted = set(), set()
    for url, prefix in DESCRIPTIONS.items():
        routed, listed = app_routes(app, prefix), described_routes(documents[url])
        unlisted |= routed - listed
        unrouted |= listed - routed
    return unlisted, unrouted


# --- the descriptions and the routes -----------------------------------------------------------------------


@pytest.mark.store_independent
def test_each_description_is_valid_openapi_3_1(app):
    for url, document in described(app.test_client()).items():
        assert document["openapi"] == "3.1.0", url
        validate(document)  # raises, naming the first error


@pytest.mark.store_independent
def test_the_app_routes_exactly_the_calls_the_descriptions_list(app):
    unlisted, unrouted = route_differences(app, described(app.test_client()))
    assert not unlisted, f"routes that no description lists: {sorted(unlisted)}"
    assert not unrouted, f"described calls that the app does not route: {sorted(unrouted)}"
    assert len(app_routes(app, "/api/v1/")) == 2 * 17  # each of the 14 calls' methods, with the slash and without


@pytest.mark.store_independent
def test_a_route_added_without_a_description_is_found(app):
    app.add_url_rule("/api/v1/patient/rename/", "rename", lambda: "", methods=["POST"])
    app.add_url_rule("/api/undescribed", "undescribed", lambda: "", methods=["GET"], strict_slashes=False)
    unlisted, _unrouted = route_differences(app, described(app.test_client()))
    assert unlisted == {("/api/v1/patient/rename/", "POST"), ("/api/v1/patient/rename", "POST"),
                        ("/api/undescribed", "GET"), ("/api/undescribed/", "GET")}


@pytest.mark.store_independent
def test_a_v1_path_without_its_slash_answers_the_documented_redirect(app):
    client = app.test_client()
    document = described(client)["/openapi/v1.json"]
    unslashed = [(path, method) for path, method in described_routes(document) if not path.endswith("/")]
    assert len(unslashed) == 17
    for path, method in unslashed:
        assert set(document["paths"][path][method.lower()]["responses"]) == {"308", "414"}
        response = client.open(path, method=method)
        assert_error(response, 308, "moved_permanently", None)
        assert urlsplit(response.headers["Location"]).path == path + "/"


@pytest.mark.store_independent
def test_every_link_leads_to_a_described_call_with_parameters_it_takes(app):
    followed = 0
    for document in described(app.test_client()).values():
        operations = {operation["operationId"]: operation for item in document["paths"].values()
                      for method, operation in item.items() if method in METHODS}
        links = [link for operation in operations.values() for answer in operation["responses"].values()
                 for link in answer.get("links", {}).values()]
        followed += len(links)
        for link in links:
            target = operations[link["operationId"]]
            taken = {parameter["name"] for parameter in target.get("parameters", [])}
            for content in target.get("requestBody", {}).get("content", {}).values():
                taken |= set(content["schema"]["properties"])
            assert set(link.get("parameters", {})) | set(link.get("requestBody", {})) <= taken, link
    assert followed == 15 + 2 + 1  # from an upload, a result and a form submission


def test_the_v1_parameters_described_are_those_each_call_requires(api):
    """Each call refuses a request without any one of the parameters that its description requires, naming it;
    with all of them it goes on to look for the project."""
    document = described(api.client)["/openapi/v1.json"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if "200" not in operation["responses"]:
                continue  # a path without its slash: a redirect
            body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema")
            required = body["required"] if body else [p["name"] for p in operation["parameters"] if p["required"]]
            for left_out in [*required, None]:
                values = {name: ("x.dcm", b"x") if name == "file" else "x" for name in required if name != left_out}
                if body:
                    response = api.post(path.removeprefix("/api/v1/"), values)
                else:
                    response = api.client.open(path, method=method.upper(), query_string=values, headers=api.headers)
                value_error = "invalid_post_value" if body else "invalid_get_value"
                if left_out is None:
                    assert_error(response, 404, "object_not_found", "project_not_found")
                elif left_out == "file":
                    assert_error(response, 400, value_error, "no_data_submitted")
                else:
                    assert_error(response, 400, value_error, "missing_parameter")
                    assert left_out in response.get_json()["message"]


@pytest.mark.store_independent
def test_the_annotation_query_is_the_schema_that_parse_query_loads(app):
    """The description's query lists the keys of the marshmallow schema itself, so the two cannot drift."""
    schemas = described(app.test_client())["/openapi/annotations.json"]["components"]["schemas"]
    query = _QuerySchema()
    assert set(schemas["PostedQuery"]["properties"]) == set(query.fields) | {"passphrase"}
    assert set(schemas["Term"]["properties"]) == set(query.fields["terms"].inner.schema.fields)
    assert set(schemas["Filter"]["properties"]) == set(query.fields["filter"].schema.fields)
    assert schemas["PostedQuery"]["additionalProperties"] is False  # as the schema refuses unknown keys


# --- the pages -------------------------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attributes):
        self.urls += [value for name, value in attributes if name in ("href", "src")]


def page_urls(response):
    parser = _Links()
    parser.feed(response.get_data(as_text=True))
    return parser.urls


@pytest.mark.store_independent
def test_the_front_page_links_the_page_and_both_descriptions(app):
    response = app.test_client().get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert set(page_urls(response)) == {"/openapi/", *DESCRIPTIONS}


@pytest.mark.store_independent
def test_the_swagger_ui_page_loads_from_the_gateway_alone_and_offers_both_descriptions(app):
    client = app.test_client()
    page = client.get("/openapi/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assets = page_urls(page)
    assert len(assets) == 5  # the style sheet, the icon, Swagger UI's two scripts and its initializer
    for url in assets:
        assert not urlsplit(url).netloc and url.startswith("/openapi/"), f"{url} is not the gateway's own"
        asset = client.get(url)
        assert asset.status_code == 200 and asset.data, url
    initializer = client.get("/openapi/initializer.js").get_data(as_text=True)
    assert not re.search(r"https?://", page.get_data(as_text=True) + initializer)
    assert "validatorUrl: null" in initializer  # Swagger UI would otherwise send the descriptions away
    offered = json.loads(re.search(r"urls: (\[.*?\]),", initializer).group(1))
    assert [entry["url"] for entry in offered] == list(DESCRIPTIONS)


# --- real answers against the descriptions -----------------------------------------------------------------


def assert_described(document, path, method, response):
    """The answer's status and media type are documented for the call, and a JSON body is one of its schema."""
    operation = document["paths"][path][method.lower()]
    answers = operation["responses"]
    assert str(response.status_code) in answers, f"{method} {path}: {response.status_code} is not documented"
    answer = answers[str(response.status_code)]
    if "$ref" in answer:
        answer = document["components"]["responses"][answer["$ref"].rpartition("/")[2]]
    content = answer.get("content", {})
    if response.status_code == 204:
        assert not content and not response.data
        return
    assert response.mimetype in content, f"{method} {path} {response.status_code}: {response.mimetype} not documented"
    if response.mimetype == "application/json":
        schema = {**content["application/json"]["schema"], "components": document["components"]}
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(
            json.loads(response.get_data()))


def test_archive_answers_are_as_described(api, seeded):
    document = described(api.client)["/openapi/v1.json"]
    with seeded.app_context():
        create_form("alpha", "Reading", json.dumps({"fields": [
            {"name": "quality", "type": "choice", "choices": ["good", "poor"], "required": True},
            {"name": "score", "type": "integer"}, {"name": "read_on", "type": "date"}]}))
    uploaded = api.upload(instance())
    keys = {"Project": "alpha", "Archive": "main", **{key: uploaded.get_json()[key] for key in SERIES_KEYS}}
    series = {**keys, "Type": "cad4tb"}

    def get(call, *parameters, **params):
        return api.get(call, Project="alpha", Archive="main", **{key: keys[key] for key in parameters}, **params)

    def add_form(submission):
        return api.post("patient/study/series/forms/add/", {
            **keys, "FormName": "Reading", "FormSubmission": json.dumps(submission)})

    answers = [  # (method, path, response, the status it must be)
        ("POST", "/api/v1/instance/upload/", uploaded, 200),
        ("POST", "/api/v1/series/results/add/", api.post("series/results/add/", {
            **series, "Name": "score", "Algorithm": "A", "Value": "0.5"}), 200),
        ("POST", "/api/v1/series/results/add/", api.post("series/results/add/", {
            **series, "Name": "map", "Algorithm": "A", "file": ("map.png", b"png")}), 200),
        ("POST", "/api/v1/patient/study/series/forms/add/", add_form({"quality": "good", "read_on": "2024-05-01"}), 200),
        ("POST", "/api/v1/patient/study/series/forms/add/", add_form({"score": "7"}), 400),
        ("POST", "/api/v1/instance/upload/", api.upload(instance(), project="beta"), 404),
        ("GET", "/api/v1/patient/get/", get("patient/get/", "PatientID"), 200),
        ("GET", "/api/v1/patient/get/", get("patient/get/"), 400),
        ("GET", "/api/v1/patient/get/", api.get("patient/get/", headers=credentials(password="wrong"),
                                                Project="alpha", Archive="main", PatientID="PAT-1"), 401),
        ("GET", "/api/v1/patient/studies/list/", get("patient/studies/list/", "PatientID"), 200),
        ("GET", "/api/v1/study/get/", get("study/get/", *SERIES_KEYS[:2]), 200),
        ("GET", "/api/v1/patient/study/series/list/", get("patient/study/series/list/", *SERIES_KEYS[:2]), 200),
        ("GET", "/api/v1/series/get/", get("series/get/", *SERIES_KEYS), 200),
        ("GET", "/api/v1/patient/study/series/forms/list/", get("patient/study/series/forms/list/", *SERIES_KEYS), 200),
        ("GET", "/api/v1/dicom/get/", get("dicom/get/", *SERIES_KEYS), 200),
        ("GET", "/api/v1/series/results/", get("series/results/", *SERIES_KEYS, Type="cad4tb", Results="score"), 200),
        ("GET", "/api/v1/series/results/", get("series/results/", *SERIES_KEYS, Type="cad4tb", Results="score,map"),
         200),
        ("GET", "/api/v1/series/results/", get("series/results/", *SERIES_KEYS, Type="cad4tb", Results="none"), 404),
        ("DELETE", "/api/v1/series/delete/", api.client.delete("/api/v1/series/delete/", query_string=keys,
                                                               headers=api.headers), 200),
        ("GET", "/api/v1/series/get/", get("series/get/", *SERIES_KEYS), 404),
        ("GET", "/api/v1/patient/delete/", get("patient/delete/", "PatientID"), 200),
    ]
    assert [response.status_code for *_call, response, _status in answers] == [status for *_, status in answers]
    assert {response.mimetype for *_call, response, _status in answers} == {"application/json", "application/zip"}
    for method, path, response, _status in answers:
        assert_described(document, path, method, response)


@pytest.fixture
def annotation_client(annotated):
    annotated.config["MAPPINGS_DIR"] = str(PROJECT_ROOT / "tests" / "fixtures" / "mappings")
    return annotated.test_client()


def test_annotation_answers_are_as_described(annotation_client):
    document = described(annotation_client)["/openapi/annotations.json"]
    query = {"terms": [{"q": "C0000001", "negation": "Any"}], "returnFields": ["SOPInstanceUID", "ContentDate"]}
    answers = [
        ("GET", "/api/need_passphrase/", {}),
        ("GET", "/api/check_phrase/{phrase}", {"phrase": "0" * 64}),
        ("GET", "/api/docs/", {"query_string": {"offset": 2, "limit": 3}}),
        ("GET", "/api/docs", {"query_string": {"limit": 0}}),
        ("GET", "/api/mappings", {}),
        ("POST", "/api/doc_detail/{docid}/", {"docid": "1.3"}),
        ("GET", "/api/getDocDetail/{docid}", {"docid": "1.1"}),
        ("GET", "/api/doc_detail/{docid}", {"docid": "nothing"}),
        ("GET", "/api/doc_content_mapping/{docid}/{mapping_name}/", {"docid": "1.3", "mapping_name": "chest"}),
        ("GET", "/api/search_anns/{text}/", {"text": "C0000001"}),
        ("GET", "/api/search_anns/{text}/", {"text": "json", "query_string": {"j": json.dumps(query)}}),
        ("POST", "/api/search_anns/{text}", {"text": "json", "json": {**query, "returnFields": "PatientID"}}),
        ("POST", "/api/search_docs/{text}/", {"text": "pneumonia", "data": {"j": json.dumps({"terms": [{"q": "x"}]})}}),
        ("GET", "/api/search_anns_by_mapping/{text}/{mapping_name}", {"text": "C9999999", "mapping_name": "chest"}),
        ("GET", "/api/search_anns_by_mapping/{text}/{mapping_name}", {"text": "C0000001", "mapping_name": "none"}),
        ("GET", "/api/search_anns/{text}", {"text": "x", "query_string": {"j": '{"terms": []}'}}),
        ("GET", "/api/search_anns/{text}", {"text": "x", "query_string": {"callback": "show"}}),
        ("OPTIONS", "/api/search_docs/{text}/", {"text": "x"}),
    ]
    responses = []
    for method, path, options in answers:
        options = dict(options)
        url = re.sub(r"\{(\w+)\}", lambda match: options.pop(match.group(1)), path)
        response = annotation_client.open(url, method=method, **options)
        assert_described(document, path, method, response)
        responses.append(response)
    statuses = [response.status_code for response in responses]
    assert statuses == [200, 200, 200, 400, 200, 200, 200, 404, 200, 200, 200, 200, 200, 200, 404, 400, 200, 204]
    assert responses[-2].mimetype == "application/javascript"
    assert "warnings" in responses[13].get_json()  # a code not in the dictionary
