"""The annotation API (`/api/…`) through the Flask test client and gunicorn, on both stores.

The fixture store (tests/conftest.py, `annotated`): documents 1.1 … 1.8; C0000001 (Chest) expands within
its semantic group to documents 1.1, 1.2, 1.3 and 1.7; pneumonia (C0000030) is in 1.3 and 1.7 (ruled out
in 1.6); the report texts that mention pneumonia are those of 1.3, 1.6 and 1.7.
"""
import hashlib
import json
import re
import shutil
import tracemalloc
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
import requests
from sqlalchemy import select

from gateway import create_app
from gateway.annotations.store import Document, import_documents
from gateway.db import db, utcnow
from gateway.models import search_transactions
from tests.conftest import release_connections

PASSPHRASE = "open sesame"
DIGEST = hashlib.sha256(PASSPHRASE.encode()).hexdigest()
CHEST = ["1.1", "1.2", "1.3", "1.7"]
PNEUMONIA = ["1.3", "1.7"]
MAPPING_FIXTURE = Path(__file__).parent / "fixtures" / "mappings" / "chest.json"

# Every call, as a path without the trailing slash, and what it answers on the fixture store.
CALLS = {
    "docs": {"success": True, "num_results": 8, "results": [f"1.{n}" for n in range(1, 9)]},
    "need_passphrase": False,
    "check_phrase/anything": False,  # no passphrase is set, so none is right
    "mappings": ["chest", "chest findings"],
    "search_anns/C0000001": {"success": True, "num_results": 4, "results": CHEST},
    "search_anns/233604007": {"success": True, "num_results": 2, "results": PNEUMONIA},  # SNOMED CT id
    "search_anns/chest%20wall": {"success": True, "num_results": 2, "results": ["1.1", "1.7"]},  # free text
    "search_anns_by_mapping/C0000001/chest%20findings": {"success": True, "num_results": 4, "results": CHEST},
    "search_docs/pneumonia": {"success": True, "num_results": 3, "results": ["1.3", "1.6", "1.7"]},
}
PROTECTED_PATHS = [
    "docs",
    "doc_detail/1.1",
    "getDocDetail/1.1",
    "doc_content_mapping/1.3/chest",
    "mappings",
    "search_anns/C0000001",
    "search_anns_by_mapping/C0000001/chest",
    "search_docs/pneumonia",
]
# January 2017, C0000002 (Chest wall) and what it expands to: 1.7 (2016-12-31) is left out.
QUERY = {
    "terms": [{"q": "C0000002"}],
    "filter": {"start_date": "2017-01-01", "end_date": "2017-01-31"},
    "returnFields": "SOPInstanceUID",
}
QUERY_RESULTS = ["1.1", "1.2", "1.3"]


@pytest.fixture
def mappings_dir(tmp_path):
    """The chest mapping twice: as `chest` and as `chest findings` (a name with a space)."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    shutil.copy(MAPPING_FIXTURE, folder / "chest.json")
    shutil.copy(MAPPING_FIXTURE, folder / "chest findings.json")
    return folder


@pytest.fixture
def client(annotated, mappings_dir):
    annotated.config["MAPPINGS_DIR"] = str(mappings_dir)
    return annotated.test_client()


@pytest.fixture
def bare_client(app):
    """A store without documents, for what is refused before any search runs."""
    return app.test_client()


@pytest.fixture
def protected_app(annotated, mappings_dir):
    """A second app over the same store, with GATEWAY_PASSPHRASE set."""
    config = {key: annotated.config[key] for key in ("TESTING", "DATABASE_URL", "STORAGE_DIR")}
    app = create_app({**config, "PASSPHRASE": PASSPHRASE, "MAPPINGS_DIR": str(mappings_dir)})
    yield app
    release_connections(app)


@pytest.fixture
def protected(protected_app):
    return protected_app.test_client()


def json_body(response, status=200):
    """The JSON of an annotation API answer, which is never HTML and always allows any origin."""
    assert response.mimetype == "application/json", response.get_data(as_text=True)[:300]
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    return json.loads(response.get_data())


def error_message(response, status):
    body = json_body(response, status)
    assert set(body) == {"success", "message"} and body["success"] is False, body
    assert body["message"] and "Traceback" not in body["message"]
    return body["message"]


def results(response):
    body = json_body(response)
    assert body["success"] is True and body["num_results"] == len(body["results"])
    uuid.UUID(body["transactionId"], version=4)
    return body["results"]


def jsonp(response, name):
    """The JSON inside a JSONP answer `name(json)`."""
    assert response.status_code == 200 and response.mimetype == "application/javascript"
    text = response.get_data(as_text=True)
    assert text.startswith(f"{name}(") and text.endswith(")"), text[:200]
    return json.loads(text[len(name) + 1 : -1])


# --- every call --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(CALLS))
def test_every_call_answers_with_and_without_the_trailing_slash(client, path):
    for slash in ("", "/"):
        body = json_body(client.get(f"/api/{path}{slash}"))
        expected = CALLS[path]
        if isinstance(expected, dict):
            uuid.UUID(body.pop("transactionId"), version=4)
        assert body == expected


@pytest.mark.store_independent
def test_booleans_are_json_literals(client):
    assert client.get("/api/need_passphrase/").get_data() == b"false"
    assert client.get("/api/check_phrase/x/").get_data() == b"false"


@pytest.mark.parametrize("path", ["doc_detail/1.1", "doc_detail/1.1/", "getDocDetail/1.1", "getDocDetail/1.1/"])
def test_doc_detail_and_its_alias(client, path):
    body = json_body(client.get(f"/api/{path}"))
    assert body["content"] == "The chest wall is intact. No fracture."
    assert body["anns"]["SOPInstanceUID"] == "1.1" and body["anns"]["ContentDate"] == "20170101"
    assert [annotation["cui"] for annotation in body["anns"]["annotations"]] == ["C0000002"]


@pytest.mark.parametrize("mapping", ["chest", "chest%20findings"])
def test_doc_content_mapping_keeps_the_mapped_annotations(client, mapping):
    for path in (f"/api/doc_content_mapping/1.3/{mapping}", f"/api/doc_content_mapping/1.3/{mapping}/"):
        anns = json_body(client.get(path))["anns"]
        # the first rib (C0000005) is narrower than the mapped rib, but mapping CUIs are taken as listed
        assert [(a["cui"], a["mapped"]) for a in anns["annotations"]] == [("C0000030", "pneumonia")]
        assert anns["mapping_name"] == mapping.replace("%20", " ")


def test_docs_pages(client):
    assert results(client.get("/api/docs?offset=2&limit=3")) == ["1.3", "1.4", "1.5"]
    for bad in ("offset=-1", "limit=0", "limit=10001", "limit=ten", f"offset={2**63}"):
        error_message(client.get(f"/api/docs?{bad}"), 400)


@pytest.mark.parametrize(
    "path, status",
    [
        ("doc_detail/9.9", 404),
        ("doc_content_mapping/9.9/chest", 404),
        ("doc_content_mapping/1.1/no%20such%20mapping", 404),
        ("search_anns_by_mapping/C0000001/no%20such%20mapping", 404),
        ("no_such_call", 404),
        ("search_anns", 404),  # QUERY is part of the path
        ("", 404),
    ],
)
def test_unknown_objects_and_calls_are_json_404s(client, path, status):
    error_message(client.get(f"/api/{path}"), status)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
@pytest.mark.store_independent
def test_other_methods_are_json_405s(client, method):
    assert "method" in error_message(client.open("/api/search_anns/C0000001/", method=method), 405)


@pytest.mark.store_independent
def test_the_archive_api_keeps_its_own_errors(client):
    response = client.get("/api/v1/no_such_call/")
    assert response.status_code == 404
    assert set(response.get_json()) == {"error_type", "suberror_type", "message"}
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.store_independent
def test_an_unexpected_error_is_a_json_500_without_its_details(client, monkeypatch):
    def broken(_uid):
        raise RuntimeError("internal detail")

    monkeypatch.setattr("gateway.annotations.api.store.doc_detail", broken)
    assert "internal detail" not in error_message(client.get("/api/doc_detail/1.1"), 500)


# --- the query: path, ?j=, JSON body, form -----------------------------------------------------------------


def test_without_j_the_path_query_is_the_single_term(client):
    assert results(client.get("/api/search_anns/C0000030/")) == PNEUMONIA
    assert results(client.get("/api/search_anns/C0000030,C0000004/")) == ["1.2", "1.3", "1.7"]


def test_the_query_as_j_as_a_json_body_and_as_a_form_gives_one_answer(client):
    text = json.dumps(QUERY)
    # the path's QUERY (pneumonia) is ignored whenever a query comes with the request
    assert results(client.get("/api/search_anns/C0000030/", query_string={"j": text})) == QUERY_RESULTS
    assert results(client.post("/api/search_anns/C0000030/", json=QUERY)) == QUERY_RESULTS
    assert results(client.post("/api/search_anns/C0000030/", data=text, content_type="text/plain")) == QUERY_RESULTS
    assert results(client.post("/api/search_anns/C0000030/", data={"j": text})) == QUERY_RESULTS
    # jQuery's extra parameters are accepted
    assert results(client.get("/api/search_anns/x/", query_string={"j": text, "_": "1700000000000"})) == QUERY_RESULTS


def test_return_fields_as_a_list_or_a_string(client):
    query = {"terms": [{"q": "C0000030"}], "returnFields": ["SOPInstanceUID", "ContentDate", "PatientID"]}
    assert results(client.post("/api/search_anns/x/", json=query)) == [
        {"SOPInstanceUID": "1.3", "ContentDate": "20170103", "PatientID": "P3"},
        {"SOPInstanceUID": "1.7", "ContentDate": "20161231", "PatientID": "P7"},
    ]
    query["returnFields"] = "SeriesInstanceUID"
    assert results(client.get("/api/search_anns/x/", query_string={"j": json.dumps(query)})) == ["2.1.3", "2.1.7"]


def test_warnings_come_with_the_answer(client):
    body = json_body(client.get("/api/search_anns/C0205076/"))
    assert body["results"] == [] and body["num_results"] == 0
    assert "C0205076" in body["warnings"][0]
    assert "warnings" not in json_body(client.get("/api/search_anns/C0000001/"))


def test_search_docs_takes_the_same_query_forms(client):
    query = {"terms": [{"q": "pneumonia"}], "filter": {"modalities": ["CT"]}}
    assert results(client.post("/api/search_docs/x/", json=query)) == ["1.7"]
    assert results(client.get("/api/search_docs/x/", query_string={"j": json.dumps(query)})) == ["1.7"]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "j, expected",
    [
        ("not json", "j is not JSON"),
        ('{"terms": [{"q": "C0000001"}]', "j is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("null", "must be a JSON object"),
        ('{"terms": "C0000001"}', "terms"),
        ('{"terms": []}', "terms"),
        ('{"terms": [{"q": 5}]}', "terms[0].q"),
        ('{"terms": [{"q": "C0000001", "qdepth": "2"}]}', "terms[0].qdepth"),
        ('{"terms": [{"q": "C0000001", "qstop": ["nonsense"]}]}', "terms[0].qstop"),
        ('{"terms": [{"q": "C0000001", "negation": "Maybe"}]}', "terms[0].negation"),
        ('{"terms": [{"q": "C0000001"}], "colour": "red"}', "colour"),
        ('{"terms": [{"q": "C0000001", "colour": "red"}]}', "terms[0].colour"),
        ('{"terms": [{"q": "C0000001"}], "filter": {"start_date": "2017-13-01"}}', "filter.start_date"),
        ('{"terms": [{"q": "C0000001"}], "filter": {"end_date": "01/02/2017"}}', "filter.end_date"),
        ('{"terms": [{"q": "C0000001"}], "filter": {"start_date": "2018-01-01", "end_date": "2017-01-01"}}',
         "start_date is after end_date"),
        ('{"terms": [{"q": "C0000001"}], "filter": {"modalities": 7}}', "filter.modalities"),
        ('{"terms": [{"q": "C0000001"}], "returnFields": ["PatientName"]}', "returnFields"),
        ('{"terms": [{"q": "-C0000001"}]}', "only of exclusions"),
        (json.dumps({"terms": [{"q": "C0000001" + "x" * 1_000_000}]}), "longer than 1,000,000 bytes"),
        (DEEP, "nested too deeply"),
        ('{"terms": [{"q": ' + DEEP + "}]}", "nested too deeply"),
    ],
)
@pytest.mark.store_independent
def test_a_malformed_query_is_a_400_that_names_the_problem(bare_client, j, expected):
    assert expected in error_message(bare_client.get("/api/search_anns/C0000001/", query_string={"j": j}), 400)
    if j:  # the same text as a POSTed body, and as a form field
        posted = bare_client.post("/api/search_anns/C0000001/", data=j.encode(), content_type="application/json")
        form = bare_client.post("/api/search_anns/C0000001/", data={"j": j})
        if len(j) > 1_000_000:
            assert "larger than" in error_message(posted, 400)
            assert "larger than" in error_message(form, 400)
        else:
            assert expected.replace("j is", "the POSTed body is") in error_message(posted, 400)
            assert expected in error_message(form, 400)


def test_a_whole_number_written_with_a_fraction_is_an_integer(client):
    """As JSON Schema's integer (the description's): qdepth 1.0 is qdepth 1, 1.5 is no integer."""
    def posted(qdepth):
        return client.post("/api/search_anns/x/", json={"terms": [{"q": "C0000001", "qdepth": qdepth}]})

    assert results(posted(1.0)) == results(posted(1))
    assert "terms[0].qdepth" in error_message(posted(1.5), 400)


@pytest.mark.store_independent
def test_a_body_that_is_not_utf8_is_a_400(client):
    response = client.post("/api/search_anns/x/", data=b"\xff\xfe\x00{", content_type="application/json")
    assert "not JSON" in error_message(response, 400)


# --- passphrase -----------------------------------------------------------------------------------------------


def test_without_a_passphrase_set_none_is_needed_and_any_is_ignored(client):
    assert results(client.get("/api/search_anns/C0000001/?passphrase=whatever")) == CHEST


def test_need_and_check_passphrase(protected):
    assert json_body(protected.get("/api/need_passphrase/")) is True
    assert json_body(protected.get(f"/api/check_phrase/{DIGEST}/")) is True
    assert json_body(protected.get(f"/api/check_phrase/{DIGEST.upper()}")) is True
    assert json_body(protected.get(f"/api/check_phrase/{quote(PASSPHRASE)}/")) is False  # the digest, not the text


@pytest.mark.parametrize("path", PROTECTED_PATHS)
def test_every_other_call_needs_the_passphrase(protected, path):
    assert "passphrase" in error_message(protected.get(f"/api/{path}/"), 401)
    assert "wrong" in error_message(protected.get(f"/api/{path}/?passphrase={'0' * 64}"), 401)
    json_body(protected.get(f"/api/{path}/?passphrase={DIGEST}"))
    json_body(protected.post(f"/api/{path}/", json={"passphrase": DIGEST}))


def test_the_passphrase_in_the_query_string_or_the_body(protected):
    search = "/api/search_anns/x/"
    assert results(protected.get(search, query_string={"j": json.dumps(QUERY), "passphrase": DIGEST})) == QUERY_RESULTS
    # a GET's j may carry it too
    with_passphrase = json.dumps({**QUERY, "passphrase": DIGEST})
    assert results(protected.get(search, query_string={"j": with_passphrase})) == QUERY_RESULTS
    assert results(protected.post(search, json={**QUERY, "passphrase": DIGEST})) == QUERY_RESULTS
    assert results(protected.post(f"{search}?passphrase={DIGEST}", json=QUERY)) == QUERY_RESULTS
    assert results(protected.post(search, data={"j": json.dumps(QUERY), "passphrase": DIGEST})) == QUERY_RESULTS
    # the body's passphrase is the one checked
    error_message(protected.post(f"{search}?passphrase={DIGEST}", json={**QUERY, "passphrase": "0" * 64}), 401)
    for wrong in (PASSPHRASE, 12345, None, ["x"], {"a": 1}):
        error_message(protected.post("/api/search_anns/x/", json={**QUERY, "passphrase": wrong}), 401)
    error_message(protected.post("/api/search_anns/x/", json=QUERY), 401)
    error_message(protected.post("/api/search_anns/x/", data={"j": json.dumps(QUERY)}), 401)


# --- JSONP and CORS --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jQuery3410_1700000000000", "$cb", "_", "window.app.on_results", "a$.b1"])
def test_jsonp_wraps_answers(client, name):
    body = jsonp(client.get(f"/api/search_anns/C0000001/?callback={name}&_=1700000000000"), name)
    assert body["results"] == CHEST
    assert jsonp(client.get(f"/api/need_passphrase/?callback={name}"), name) is False
    assert jsonp(client.get(f"/api/doc_detail/1.1/?callback={name}"), name)["anns"]["SOPInstanceUID"] == "1.1"


def test_jsonp_wraps_errors_with_status_200(client, protected):
    name = "cb"
    assert jsonp(client.get(f"/api/doc_detail/9.9/?callback={name}"), name)["success"] is False
    assert jsonp(client.get(f"/api/no_such_call/?callback={name}"), name)["success"] is False
    assert "not JSON" in jsonp(client.get(f"/api/search_anns/x/?callback={name}&j=nonsense"), name)["message"]
    assert jsonp(protected.get(f"/api/search_anns/x/?callback={name}"), name)["success"] is False


@pytest.mark.parametrize(
    "name", ["", "1cb", "alert(1)", "a-b", "a b", "cb;alert(1)", "<script>", "é", "cb()", "a[0]", "x\u2028"]
)
@pytest.mark.store_independent
def test_an_invalid_callback_is_a_plain_json_400(bare_client, name):
    response = bare_client.get("/api/search_anns/C0000001/", query_string={"callback": name})
    assert "callback" in error_message(response, 400)


def test_cors_headers_on_answers_and_errors(client, protected):
    for response in (
        client.get("/api/search_anns/C0000001/", buffered=True),
        client.get("/api/doc_detail/9.9/"),
        client.get("/api/no_such_call"),
        protected.get("/api/docs", buffered=True),
    ):
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
        assert response.headers["Access-Control-Allow-Headers"] == "Content-Type"


@pytest.mark.parametrize("path", ["search_anns/C0000001/", "docs", "doc_detail/1.1"])
@pytest.mark.store_independent
def test_a_preflight_needs_no_passphrase(protected, path):
    response = protected.options(
        f"/api/{path}",
        headers={"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"},
    )
    assert response.status_code == 204 and response.get_data() == b""
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "Content-Type"


# --- hostile input --------------------------------------------------------------------------------------------

INJECTIONS = [
    "' OR '1'='1",
    "1.1' OR 1=1 --",
    '"; DROP TABLE documents; --',
    "') UNION SELECT password_hash FROM users --",
    "C0000001' OR 'a'='a",
    "%",
    "_",
    "*",
    "\\",
    "1.1%",
    'chest" OR "wall',
    "NEAR(chest wall)",
    "1.1;DELETE FROM documents",
]
# As annotation free text, a word search: these find the names that hold their words (the quoted " OR " is
# a stop word, so chest and wall), the others none.
INJECTIONS_AS_WORDS = {'chest" OR "wall': ["1.1", "1.7"]}


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_strings_find_nothing_extra_and_break_nothing(client, text, store):
    quoted = quote(text, safe="")
    # as q (a free-text item), in the path and in j
    as_words = INJECTIONS_AS_WORDS.get(text, [])
    assert results(client.get(f"/api/search_anns/{quoted}/")) == as_words
    assert results(client.get("/api/search_anns/x/", query_string={"j": json.dumps({"terms": [{"q": [text]}]})})) == as_words
    assert results(client.post("/api/search_anns/x/", json={"terms": [{"q": ["C0000001", text]}]})) == CHEST
    # in a full-text search only the words count: quotes, operators and wildcards add nothing
    words = " ".join(re.findall(r"[^\W_]+", text))  # words as the full-text index splits them
    docs = client.get(f"/api/search_docs/{quoted}/")
    if words:
        assert results(docs) == results(client.get(f"/api/search_docs/{quote(words)}/"))
    else:
        assert "word" in error_message(docs, 400)
    # as filter values
    for key in ("sopinstanceuid", "seriesinstanceuid", "studyinstanceuid", "modalities"):
        query = {"terms": [{"q": "C0000001"}], "filter": {key: [text]}}
        assert results(client.post("/api/search_anns/x/", json=query)) == []
        assert results(client.post("/api/search_docs/x/", json={**query, "terms": [{"q": "pneumonia"}]})) == []
    # as a return field, a document id, a mapping name, a callback, a paging value
    error_message(client.post("/api/search_anns/x/", json={"terms": [{"q": "C0000001"}], "returnFields": [text]}), 400)
    for path in (f"doc_detail/{quoted}", f"getDocDetail/{quoted}", f"doc_content_mapping/{quoted}/chest",
                 f"doc_content_mapping/1.1/{quoted}", f"search_anns_by_mapping/C0000001/{quoted}"):
        error_message(client.get(f"/api/{path}/"), 404)
    if not text.isidentifier():
        error_message(client.get("/api/search_anns/C0000001/", query_string={"callback": text}), 400)
    error_message(client.get("/api/docs", query_string={"offset": text}), 400)
    # and the store is as it was
    assert results(client.get("/api/docs")) == CALLS["docs"]["results"]
    assert results(client.get("/api/search_anns/C0000001/")) == CHEST


# --- transactions -------------------------------------------------------------------------------------------------


def stored_transactions(app):
    app.extensions["gateway.search_log"].flush()
    with app.app_context():
        rows = db.session.execute(select(search_transactions)).all()
    return {row.id: row for row in rows}


def test_every_search_is_recorded(protected_app, protected):
    before = utcnow()
    # buffered: each answer is read to its end (where it is recorded) before the next request
    answers = {
        "search_anns": protected.post("/api/search_anns/x/", json={**QUERY, "passphrase": DIGEST}, buffered=True),
        "search_anns_by_mapping": protected.get(
            f"/api/search_anns_by_mapping/C0000001/chest/?passphrase={DIGEST}", buffered=True
        ),
        "search_docs": protected.get(
            "/api/search_docs/x/",
            query_string={"j": json.dumps({"terms": [{"q": "pneumonia"}]}), "passphrase": DIGEST},
            environ_base={"REMOTE_ADDR": "2001:db8::7"},
            buffered=True,
        ),
        "docs": protected.get(f"/api/docs/?limit=3&passphrase={DIGEST}", buffered=True),
    }
    # refused searches are not
    error_message(protected.get("/api/search_anns/C0000001/"), 401)
    error_message(protected.get(f"/api/search_anns/x/?j=nonsense&passphrase={DIGEST}"), 400)
    recorded = stored_transactions(protected_app)
    assert len(recorded) == len(answers)
    queries = {
        "search_anns": QUERY,  # without the passphrase
        "search_anns_by_mapping": {"terms": [{"q": "C0000001"}]},
        "search_docs": {"terms": [{"q": "pneumonia"}]},
        "docs": {"offset": 0, "limit": 3},
    }
    for call, response in answers.items():
        body = json_body(response)
        row = recorded[body["transactionId"]]
        assert row.call == call
        assert json.loads(row.query) == queries[call] and DIGEST not in row.query
        assert row.num_results == body["num_results"]
        assert row.client_address == ("2001:db8::7" if call == "search_docs" else "127.0.0.1")
        assert before <= row.created_at <= utcnow()

    listed = protected_app.test_cli_runner().invoke(args=["transactions", "list", "--limit", "2"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    newest = sorted(recorded.values(), key=lambda row: row.created_at, reverse=True)[:2]
    assert [line.split("\t")[1] for line in lines] == [row.id for row in newest]
    time_text, _id, call, address, count, query = lines[-1].split("\t")
    assert (call, int(count), json.loads(query)) == (newest[-1].call, newest[-1].num_results, queries[newest[-1].call])
    assert time_text.endswith("Z") and address


# --- streaming ----------------------------------------------------------------------------------------------------

BIG = 20_000


@pytest.fixture
def big_store(client, annotated):
    """BIG more documents mentioning the chest wall, with long UIDs (so that the answer is large)."""
    with annotated.app_context():
        for start in range(0, BIG, 5_000):
            import_documents([
                Document(f"1.2.826.0.1.3680043.8.498.{10**20 + number}.{number}",
                         [{"cui": "C0000002", "pref": "Chest wall"}])
                for number in range(start, start + 5_000)
            ])
    return client


def test_a_large_answer_is_streamed_not_built(big_store, annotated, monkeypatch):
    # Rows come from the database a batch at a time; small batches make the bound visible at this size.
    monkeypatch.setattr("gateway.annotations.query._STREAM_BATCH", 200)
    response = big_store.get("/api/search_anns/C0000002/", buffered=False)
    assert response.status_code == 200 and response.is_streamed
    tracemalloc.start()
    try:
        chunks = body_size = 0
        text_parts = []
        for chunk in response.response:
            chunks += 1
            body_size += len(chunk)
            text_parts.append(chunk if chunks < 3 else b"")  # keep just the head, to check the shape
            last = chunk
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        response.close()
    assert chunks > BIG // 2_000  # written a batch at a time, never as one body
    assert body_size > 1_000_000 and peak < body_size / 3, (body_size, peak)  # built whole: > body_size
    assert b"".join(text_parts).startswith(b'{"success": true, "transactionId": "')
    assert last.endswith(f'], "num_results": {BIG + 4}}}'.encode())  # and 1.1, 1.2, 1.3, 1.7 of the fixtures
    recorded = list(stored_transactions(annotated).values())
    assert [row.num_results for row in recorded] == [BIG + 4]


def test_a_client_that_goes_away_is_recorded_with_what_it_got(big_store, annotated):
    response = big_store.get("/api/search_anns/C0000002/", buffered=False)
    stream = iter(response.response)
    next(stream), next(stream)  # the head and the first batch of results
    response.close()
    (row,) = stored_transactions(annotated).values()
    assert 0 < row.num_results < BIG


def test_a_streamed_answer_keeps_its_own_connection_after_the_request_ends(big_store, annotated):
    """The request's session is closed when the view returns, before the answer is sent; a stream that
    read on the session's connection would share it with whichever request the pool hands it to next."""
    response = big_store.get("/api/search_anns/C0000002/", buffered=False)
    stream = iter(response.response)
    next(stream), next(stream)
    with annotated.app_context():
        assert db.engine.pool.checkedout() == 1  # the stream's, out of the pool until it ends
    response.close()
    with annotated.app_context():
        assert db.engine.pool.checkedout() == 0


# --- through gunicorn ---------------------------------------------------------------------------------------------


@pytest.fixture
def served(annotated, gunicorn, mappings_dir):
    base_url, _log = gunicorn(
        annotated, {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_MAPPINGS_DIR": str(mappings_dir)}
    )
    return base_url + "/api"


def test_requests_against_gunicorn(served):
    assert requests.get(f"{served}/need_passphrase/", timeout=10).json() is True
    assert requests.get(f"{served}/check_phrase/{DIGEST}/", timeout=10).json() is True
    answer = requests.get(
        f"{served}/search_anns/json/", params={"j": json.dumps(QUERY), "passphrase": DIGEST}, timeout=10
    )
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert answer.json()["results"] == QUERY_RESULTS
    posted = requests.post(f"{served}/search_anns/x", json={**QUERY, "passphrase": DIGEST}, timeout=10)
    assert posted.json()["results"] == QUERY_RESULTS
    mapped = requests.get(
        f"{served}/search_anns_by_mapping/C0000001/chest findings", params={"passphrase": DIGEST}, timeout=10
    )
    assert mapped.json()["results"] == CHEST
    script = requests.get(
        f"{served}/search_anns/C0000030/", params={"passphrase": DIGEST, "callback": "cb"}, timeout=10
    )
    assert script.headers["Content-Type"].startswith("application/javascript")
    assert json.loads(script.text[3:-1])["results"] == PNEUMONIA
    refused = requests.get(f"{served}/search_anns/C0000001/", params={"passphrase": "0" * 64}, timeout=10)
    assert refused.status_code == 401 and refused.json()["success"] is False


def test_urllib_against_gunicorn(served):
    query = urlencode({"j": json.dumps(QUERY), "passphrase": DIGEST})
    with urllib.request.urlopen(f"{served}/search_anns/{quote('chest wall')}/?{query}", timeout=10) as answer:
        assert json.load(answer)["results"] == QUERY_RESULTS
    post = urllib.request.Request(
        f"{served}/search_anns/x/",
        data=json.dumps({**QUERY, "passphrase": DIGEST}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(post, timeout=10) as answer:
        assert json.load(answer)["num_results"] == len(QUERY_RESULTS)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{served}/doc_detail/1.1/", timeout=10)
    with refused.value as error:
        assert error.code == 401 and json.load(error)["success"] is False
