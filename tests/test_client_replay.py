"""The existing clients' requests, replayed byte for byte as they send them, and the answers they need.

- The SMI vis page (its js/api.js over jQuery 3): every call a GET of `/api/CALL/PART/`, with
  `?passphrase=DIGEST` when one is needed, `callback=jQuery…_N` (dataType "jsonp") and `_=N` (cache: false);
  its data is `undefined=` once per path part (jQuery.param of a list of strings), or for a search the
  form's query as `j=JSON` pasted unencoded into the URL, which the browser then percent-encodes. The form
  sends every key: "Any" for a qualifier, a semantic type or a modality the user left alone, "" for an
  empty date, [] for an empty multi-select of return fields.
- RESTful_service/test_api.py (urllib): `search_anns/x/?&j=` followed by the JSON as it is, the last one blank.
- R httr and curl: need_passphrase, then check_phrase/DIGEST/.
- The vis page itself, served from GATEWAY_VIS_DIR.

The store is the fixture corpus (tests/conftest.py) with UMLS semantic types given to its concepts (TYPES).
"""
import hashlib
import json
import mimetypes
import string
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from sqlalchemy import update

from gateway import create_app
from gateway.annotations.query import MAX_ITEMS, MAX_TEXT, parse_query
from gateway.db import write_engine
from gateway.errors import InvalidValue
from gateway.models import concept_types
from tests.conftest import release_connections
from tests.test_annotation_api import error_message, json_body, jsonp, results

PASSPHRASE = "open sesame"
DIGEST = hashlib.sha256(PASSPHRASE.encode()).hexdigest()
FIXTURES = Path(__file__).parent / "fixtures"
VIS_DIR = FIXTURES / "vis"
CALLBACK = "jQuery31004215826737458261_1700000000000"
CHEST = ["1.1", "1.2", "1.3", "1.7"]  # C0000001 (Chest) expanded within its group ANAT
PNEUMONIA = ["1.3", "1.7"]

# cui: (TUI, semantic type name); the fixture dictionary gives its concepts only a group.
TYPES = {
    "C0000001": ("T029", "Body Location or Region"),  # Chest
    "C0000002": ("T029", "Body Location or Region"),  # Chest wall
    "C0000003": ("T023", "Body Part, Organ, or Organ Component"),  # Lung
    "C0000004": ("T023", "Body Part, Organ, or Organ Component"),  # Rib
    "C0000005": ("T023", "Body Part, Organ, or Organ Component"),  # First rib
    "C0000006": ("T029", "Body Location or Region"),  # Lung apex
    "C0000010": ("T184", "Sign or Symptom"),  # Chest pain
    "C0000011": ("T184", "Sign or Symptom"),  # Pleuritic chest pain
    "C0000020": ("T047", "Disease or Syndrome"),  # Cycle A
    "C0000021": ("T047", "Disease or Syndrome"),  # Cycle B
    "C0000030": ("T047", "Disease or Syndrome"),  # Pneumonia
    "C0000031": ("T033", "Finding"),  # Lung lesion
}


def _set_types(types):
    with write_engine().begin() as connection:
        for cui, (tui, name) in types.items():
            connection.execute(update(concept_types).where(concept_types.c.cui == cui).values(tui=tui, sty=name))


@pytest.fixture
def typed(annotated):
    """The annotated store (the test's own) with TYPES and the `chest` mapping (Rib, Pneumonia, Lung apex)."""
    with annotated.app_context():
        _set_types(TYPES)
    annotated.config["MAPPINGS_DIR"] = str(FIXTURES / "mappings")
    return annotated


@pytest.fixture
def page(typed):
    return typed.test_client()


@pytest.fixture
def protected_app(typed):
    """A second app over the same store, with GATEWAY_PASSPHRASE set."""
    config = {key: typed.config[key] for key in ("TESTING", "DATABASE_URL", "STORAGE_DIR", "MAPPINGS_DIR")}
    app = create_app({**config, "PASSPHRASE": PASSPHRASE})
    yield app
    release_connections(app)


# What a browser leaves as it is in a URL's query (the WHATWG query percent-encode set encodes the rest).
_LEFT_AS_IS = "".join(c for c in string.printable[:94] if c not in "\"#<>'%")


def jquery_get(client, *path, query=None, passphrase=None, nonce=1700000000001):
    """The vis page's call of `path` (its sendData list): the URL as js/api.js and jQuery make it."""
    url = "/api/" + "/".join(path) + "/"
    if passphrase:
        url += "?passphrase=" + passphrase
    url += ("&" if "?" in url else "?") + "callback=" + CALLBACK
    if query is None:
        data = "&".join(["undefined="] * len(path))
    else:  # JSON.stringify's text, pasted as it is
        data = "j=" + json.dumps(query, separators=(",", ":"))
    url += "&" + quote(data, safe=_LEFT_AS_IS) + f"&_={nonce}"
    return jsonp(client.get(url), CALLBACK)


def form_query(q, negation="Any", experiencer="Any", temporality="Any", semantictype="Any", modality="Any",
               start_date="", end_date="", return_fields=()):
    """The query that the vis page's submitForm() builds from its form."""
    return {
        "terms": [{"q": q, "negation": negation, "experiencer": experiencer, "temporality": temporality,
                   "semantictype": semantictype}],
        "filter": {"modalities": [modality], "start_date": start_date, "end_date": end_date},
        "returnFields": list(return_fields),
    }


def found(answer):
    """The results of a search answer, checked for the shape the vis page reads."""
    assert answer["success"] is True and answer["num_results"] == len(answer["results"]), answer
    return answer["results"]


# --- the vis page's search ----------------------------------------------------------------------------------


def test_the_vis_page_start_up_calls(page):
    assert jquery_get(page, "need_passphrase") is False
    assert found(jquery_get(page, "docs")) == [f"1.{n}" for n in range(1, 9)]
    assert jquery_get(page, "mappings") == ["chest"]
    assert jquery_get(page, "doc_detail", "1.1")["anns"]["SOPInstanceUID"] == "1.1"
    assert [a["mapped"] for a in jquery_get(page, "doc_content_mapping", "1.3", "chest")["anns"]["annotations"]] == [
        "pneumonia"
    ]


NOTHING_CHOSEN = [
    ("C0000001", CHEST),
    ("C0000030", PNEUMONIA),
    ("233604007", PNEUMONIA),  # Pneumonia's SNOMED CT id
    ("chest wall", ["1.1", "1.7"]),  # free text
    ("chest", ["1.2", "1.3", "1.5", "1.7"]),  # the mapping
]


def test_the_vis_page_search_with_nothing_chosen_is_the_plain_search(page):
    cases = NOTHING_CHOSEN
    assert search_each(page, cases, form_query) == as_expected(cases)
    plain = [[[q], results(page.post("/api/search_anns/x/", json={"terms": [{"q": q}]}))] for q, _expected in cases]
    assert plain == as_expected(cases)


def test_the_vis_page_search_with_its_form_filled_in(page):
    def search(**form):
        return found(jquery_get(page, "search_anns", "C0000002", query=form_query("C0000002", **form)))

    # C0000002 (Chest wall) expands to Rib and First rib: documents 1.1, 1.2, 1.3 and 1.7
    assert search() == CHEST
    assert search(negation="Negated") == ["1.2", "1.7"]
    assert search(experiencer="Other") == ["1.3", "1.7"]
    assert search(temporality="historical") == ["1.3"]
    assert search(modality="CT") == ["1.1", "1.7"]
    assert search(modality="MR") == ["1.2"]
    assert search(start_date="2017-01-02") == ["1.2", "1.3"]
    assert search(end_date="2017-01-01") == ["1.1", "1.7"]
    assert search(start_date="2017-01-01", end_date="2017-01-02") == ["1.1", "1.2"]
    assert search(return_fields=["SeriesInstanceUID"]) == ["2.1.1", "2.1.2", "2.1.3", "2.1.7"]
    assert search(return_fields=["SOPInstanceUID", "StudyInstanceUID"], modality="CT") == [
        {"SOPInstanceUID": "1.1", "StudyInstanceUID": "3.1.1"},
        {"SOPInstanceUID": "1.7", "StudyInstanceUID": "3.1.7"},
    ]


def search_each(page, cases, query_of):
    """[arguments, what the vis page's search of query_of(*arguments) finds] of each case (*arguments, expected)."""
    answers = []
    for *arguments, _expected in cases:
        query = query_of(*arguments)
        answers.append([arguments, found(jquery_get(page, "search_anns", quote(query["terms"][0]["q"]), query=query))])
    return answers


def as_expected(cases):
    return [[arguments, expected] for *arguments, expected in cases]


SEMANTIC_TYPES_OF_CHEST = [
    ("T029", ["1.1", "1.7"]),  # Chest wall
    ("Body Location or Region", ["1.1", "1.7"]),
    ("body location or region", ["1.1", "1.7"]),
    ("Body Part, Organ, or Organ Component", ["1.2", "1.3"]),  # Rib, First rib: a name with commas
    ("T023,T029", CHEST),
    ("Body Part, Organ, or Organ Component,Body Location or Region", CHEST),
    (["T023", "Body Location or Region"], CHEST),
    ("ANAT", CHEST),
    ("anat", CHEST),
    ("DISO", []),  # with qonlysty, Chest expands within ANAT: the DISO concepts below it are left out first
    ("Disease or Syndrome", []),
]
SEMANTIC_TYPES_OF_CHEST_EXPANDED_ACROSS_GROUPS = [
    ("Any", ["1.1", "1.2", "1.3", "1.4", "1.5", "1.7"]),
    ("DISO", ["1.4"]),  # Pleuritic chest pain, below Chest pain (DISO) below Chest (ANAT)
    ("Sign or Symptom", ["1.4"]),
    ("Finding", []),  # Lung lesion, which no document mentions
    ("T033,T184", ["1.4"]),
    ("Body Location or Region", ["1.1", "1.5", "1.7"]),  # Lung apex, below Lung lesion, too
]
SEMANTIC_TYPES_OF_OTHER_ITEMS = [
    # a mapping's CUIs (chest: Rib, Pneumonia, Lung apex) are the term's concepts too
    ("chest", "Disease or Syndrome", PNEUMONIA),
    ("chest", "ANAT", ["1.2", "1.5"]),
    # free text: the annotations it finds, by the type of their CUI
    ("pneumonia", "DISO", PNEUMONIA),
    ("pneumonia", "T047", PNEUMONIA),
    ("pneumonia", "ANAT", []),
    ("chest wall", "T029", ["1.1", "1.7"]),
    ("chest wall", "Body Part, Organ, or Organ Component", []),
    # a CUI that the dictionary does not know (Ground glass opacity, in 1.8) has no type
    ("C9999999", "Any", ["1.8"]),
    ("C9999999", "DISO", []),
    ("ground glass opacity", "Any", ["1.8"]),
    ("ground glass opacity", "DISO", []),
    # the vis page's option of two types
    ("C0000030,C0000004", "Anatomical Abnormality,Disease or Syndrome", PNEUMONIA),
]


def test_semantictype_keeps_the_expanded_concepts_of_those_types(page):
    cases = SEMANTIC_TYPES_OF_CHEST
    assert search_each(page, cases, lambda types: form_query("C0000001", semantictype=types)) == as_expected(cases)


def test_semantictype_applies_after_expansion(page):
    cases = SEMANTIC_TYPES_OF_CHEST_EXPANDED_ACROSS_GROUPS
    answers = search_each(page, cases, lambda types: {
        "terms": [{"q": "C0000001", "qonlysty": False, "semantictype": types}]
    })
    assert answers == as_expected(cases)


def test_semantictype_of_mappings_free_text_and_unknown_cuis(page):
    cases = SEMANTIC_TYPES_OF_OTHER_ITEMS
    assert search_each(page, cases, lambda q, types: form_query(q, semantictype=types)) == as_expected(cases)


def test_semantictype_of_an_excluding_term(page):
    # -C0000002 of type T023 excludes what Rib and First rib are in (1.2, 1.3), not Chest wall's 1.1 and 1.7
    query = {"terms": [{"q": "C0000001"}, {"q": "-C0000002", "semantictype": "T023"}]}
    assert found(jquery_get(page, "search_anns", "C0000001", query=query)) == ["1.1", "1.7"]


# C0000002 (Chest wall, Rib, First rib) with a qualifier or a filter
QUALIFIERS_OF_CHEST_WALL = [
    ({"temporality": "Any"}, CHEST),
    ({"temporality": "any"}, CHEST),
    ({"temporality": ""}, CHEST),
    ({"temporality": ["Any"]}, CHEST),
    ({"temporality": ["historical"]}, ["1.3"]),
    ({"temporality": ["historical", "Any"]}, CHEST),
    ({"temporality": "historical,ANY"}, CHEST),
    ({"temporality": ["historical", "hypothetical"]}, ["1.3", "1.7"]),
    ({"negation": ""}, CHEST),
    ({"negation": "any"}, CHEST),
    ({"negation": "ANY"}, CHEST),
    ({"negation": "Negated"}, ["1.2", "1.7"]),
    ({"experiencer": ""}, CHEST),
    ({"experiencer": "any"}, CHEST),
    ({"semantictype": ""}, CHEST),
    ({"semantictype": "any"}, CHEST),
    ({"semantictype": ["T047", "Any"]}, CHEST),
]
FILTERS_OF_CHEST_WALL = [
    ({"modalities": ["Any"]}, CHEST),
    ({"modalities": ["any"]}, CHEST),
    ({"modalities": "Any"}, CHEST),
    ({"modalities": []}, CHEST),
    ({"modalities": ""}, CHEST),
    ({"modalities": ["CT", "Any"]}, CHEST),
    ({"modalities": ["CT"]}, ["1.1", "1.7"]),
    ({"start_date": "", "end_date": ""}, CHEST),
    ({"start_date": "", "end_date": "2017-01-01"}, ["1.1", "1.7"]),
]


def test_blank_or_any_qualifiers_are_no_constraint(page):
    cases = QUALIFIERS_OF_CHEST_WALL
    assert search_each(page, cases, lambda keys: {"terms": [{"q": "C0000002", **keys}]}) == as_expected(cases)


def test_empty_or_any_filters_are_no_constraint(page):
    cases = FILTERS_OF_CHEST_WALL
    answers = search_each(page, cases, lambda query_filter: {"terms": [{"q": "C0000002"}], "filter": query_filter})
    assert answers == as_expected(cases)


def test_an_empty_return_fields_list_is_the_default_field(page):
    query = {"terms": [{"q": "C0000030"}], "returnFields": []}
    assert found(jquery_get(page, "search_anns", "C0000030", query=query)) == PNEUMONIA


def test_the_vis_page_query_posted_as_a_json_body(page, protected_app):
    query = form_query("C0000001", semantictype="Body Part, Organ, or Organ Component")
    assert results(page.post("/api/search_anns/C0000001/", json=query)) == ["1.2", "1.3"]
    assert results(page.post("/api/search_anns_by_mapping/C0000001/chest/", json=query)) == ["1.2", "1.3"]
    # the spec's POST: the passphrase inside the body
    protected = protected_app.test_client()
    assert results(protected.post("/api/search_anns/x/", json={**query, "passphrase": DIGEST})) == ["1.2", "1.3"]


def test_the_vis_page_with_a_passphrase(protected_app):
    protected = protected_app.test_client()
    assert jquery_get(protected, "need_passphrase") is True
    assert jquery_get(protected, "check_phrase", "0" * 64) is False  # the page asks again
    assert jquery_get(protected, "check_phrase", DIGEST, passphrase=DIGEST) is True
    query = form_query("C0000001", modality="CT")
    assert found(jquery_get(protected, "search_anns", "C0000001", query=query, passphrase=DIGEST)) == ["1.1", "1.7"]
    assert "passphrase" in jquery_get(protected, "search_anns", "C0000001", query=query)["message"]


def term(**keys):
    return {"terms": [{"q": "C0000001", **keys}]}


REFUSED = [
    (term(semantictype=5), "terms[0].semantictype: must be a string or a list of strings"),
    (term(semantictype="T999"), "terms[0].semantictype: 'T999' is not a semantic type"),
    (term(semantictype="Disease or Syndrom"), "'Disease or Syndrom' is not a semantic type"),
    (term(semantictype="T047,Foo"), "'Foo' is not a semantic type"),
    (term(semantictype="Body Part, Organ"), "'Body Part' is not a semantic type"),
    (term(semantictype="DISO-ANAT"), "'DISO-ANAT' is not a semantic type"),
    (term(semantictype=","), "terms[0].semantictype: names no semantic type or group"),
    (term(semantictype=[]), "terms[0].semantictype: must not be empty"),
    (term(negation="Maybe"), "terms[0].negation: 'Maybe' is not one of"),
    (term(experiencer="Anyone"), "terms[0].experiencer: 'Anyone' is not one of"),
    (term(temporality=["Recent", "Anytime"]), "terms[0].temporality: 'Anytime' is not one of"),
    (term(temporality=["Recent", 5]), "terms[0].temporality: must be a string or a list of strings"),
    (term(temporality=[5, "Any"]), "terms[0].temporality: must be a string or a list of strings"),
    (term(temporality=[]), "terms[0].temporality: must not be empty"),
    ({**term(), "filter": {"start_date": "Any"}}, "filter.start_date"),
    ({**term(), "filter": {"modalities": [7, "Any"]}}, "filter.modalities"),
    ({**term(), "filter": {"sopinstanceuid": []}}, "filter.sopinstanceuid: must not be empty"),  # no "any"
    ({**term(), "returnFields": ""}, "returnFields: must not be empty"),
    ({**term(), "returnFields": ["Any"]}, "returnFields: 'Any' is not one of"),
]


def test_other_values_stay_400s_naming_them(make_app):
    client = make_app().test_client()  # refused before any search: no store needed
    for query, named in REFUSED:
        assert named in error_message(client.post("/api/search_anns/x/", json=query), 400), query
        answer = jquery_get(client, "search_anns", "C0000001", query=query)  # as JSONP, an error is a 200
        assert answer["success"] is False and named in answer["message"], query


def test_semantictype_has_the_limits_of_every_list():
    def types_of(value):
        return parse_query(term(semantictype=value)).terms[0].semantictype

    assert types_of(["T047"] * MAX_ITEMS).tuis == {"T047"}
    assert types_of("T047," * (MAX_TEXT // 5)).tuis == {"T047"}  # MAX_TEXT characters
    with pytest.raises(InvalidValue, match=f"semantictype: {MAX_ITEMS + 1:,} values; a list may hold at most"):
        types_of(["T047"] * (MAX_ITEMS + 1))
    with pytest.raises(InvalidValue, match=f"semantictype: value 'T047,T047,T047,T047,' is longer than {MAX_TEXT}"):
        types_of("T047," * (MAX_TEXT // 5) + "T")


# --- test_api.py, R and curl ----------------------------------------------------------------------------------


def test_test_api_py_queries_pasted_into_the_url(page):
    base = "/api/search_anns/x/?&j="
    assert results(page.get(base + '{"terms":[{"q":"C0000002","negation":"Any","temporality":["Recent"]}],'
                                   '"filter":{"modalities":["CT"]}}')) == ["1.1"]
    assert results(page.get(base + '{"terms":[{"q":"C0000002","negation":"Any","temporality":["Recent","historical"]}],'
                                   '"filter":{"modalities":["CT","MR"]},"returnFields":["StudyInstanceUID"]}')) == [
        "3.1.1", "3.1.2"
    ]
    assert results(page.get(base + '{"terms":[{"q":"C0000002","negation":"Any"}],"filter":{"start_date":'
                                   '"1989-01-01","end_date":"2022-01-01"},"returnFields":["SOPInstanceUID",'
                                   '"SeriesInstanceUID"]}')) == [
        {"SOPInstanceUID": uid, "SeriesInstanceUID": f"2.{uid}"} for uid in CHEST
    ]
    # its last query is blank: no j, so the path's QUERY, free text x, is the single term
    assert results(page.get(base)) == []


def test_a_blank_j_is_no_j(page):
    for blank in ("", "%20", "%20%0A"):
        for path in ("/api/search_anns/C0000010", "/api/search_anns/C0000010/"):
            assert results(page.get(f"{path}?j={blank}")) == ["1.4"]  # Chest pain, Pleuritic chest pain below it
        assert results(page.post("/api/search_anns/C0000030/", data={"j": unquote(blank)})) == PNEUMONIA
        assert results(page.get(f"/api/search_docs/pneumonia/?j={blank}")) == ["1.3", "1.6", "1.7"]


def test_need_and_check_phrase_without_a_passphrase(page):
    assert json_body(page.get("/api/need_passphrase/")) is False
    # as the existing service answers: with no passphrase set, no phrase is the right one
    for phrase in (DIGEST, "0" * 64, "anything"):
        assert json_body(page.get(f"/api/check_phrase/{phrase}/")) is False
        assert page.get(f"/api/check_phrase/{phrase}").get_data() == b"false"
    # and every other call needs none
    assert results(page.get(f"/api/search_anns/C0000030/?passphrase={DIGEST}")) == PNEUMONIA


def test_need_and_check_phrase_with_a_passphrase(protected_app):
    protected = protected_app.test_client()
    assert json_body(protected.get("/api/need_passphrase/")) is True
    assert json_body(protected.get(f"/api/check_phrase/{DIGEST}/")) is True
    assert json_body(protected.get(f"/api/check_phrase/{'0' * 64}/")) is False
    assert json_body(protected.get(f"/api/check_phrase/{quote(PASSPHRASE)}/")) is False  # the digest, not the text


# --- /vis/ ------------------------------------------------------------------------------------------------------


@pytest.fixture
def make_app(tmp_path):
    """create_app with settings over a throwaway SQLite store (the page reads nothing from it)."""
    apps = []

    def make(**settings):
        apps.append(create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'g.sqlite'}",
                                "STORAGE_DIR": str(tmp_path / "storage"), **settings}))
        return apps[-1]

    yield make
    for app in apps:
        release_connections(app)


def vis_error(response, status):
    """The JSON error of /vis/: the annotation API's body."""
    assert response.status_code == status and response.mimetype == "application/json", response.get_data()[:200]
    body = response.get_json()
    assert set(body) == {"success", "message"} and body["success"] is False
    return body["message"]


def test_vis_serves_the_folder(make_app):
    client = make_app(VIS_DIR=str(VIS_DIR)).test_client()
    index = client.get("/vis/")
    assert index.status_code == 200 and index.mimetype == "text/html"
    assert index.get_data() == (VIS_DIR / "index.html").read_bytes()
    assert client.get("/vis/index.html").get_data() == index.get_data()
    asset = client.get("/vis/js/api.js")
    assert asset.status_code == 200 and asset.mimetype == mimetypes.guess_type("api.js")[0] == "text/javascript"
    assert asset.get_data() == (VIS_DIR / "js" / "api.js").read_bytes()
    # /vis without its slash leads to /vis/, where the page's relative links work
    redirect = client.get("/vis")
    assert redirect.status_code == 308 and redirect.headers["Location"].endswith("/vis/")


def test_vis_needs_no_passphrase(make_app):
    client = make_app(VIS_DIR=str(VIS_DIR), PASSPHRASE=PASSPHRASE).test_client()
    assert client.get("/vis/").status_code == 200
    assert client.get("/vis/js/api.js").status_code == 200


@pytest.mark.parametrize("path", [
    "missing.html",
    "js/missing.js",
    "js/",
    # outside the folder: tests/fixtures/mappings/chest.json and tests/test_client_replay.py exist
    "%2e%2e/mappings/chest.json",
    "js/%2e%2e/%2e%2e/mappings/chest.json",
    "..%2fmappings%2fchest.json",
    "%2e%2e/%2e%2e/test_client_replay.py",
])
def test_vis_answers_a_missing_file_or_one_outside_the_folder_with_a_json_404(make_app, path):
    client = make_app(VIS_DIR=str(VIS_DIR)).test_client()
    assert "no file" in vis_error(client.get(f"/vis/{path}"), 404)


@pytest.mark.parametrize("path", ["/vis/", "/vis/index.html", "/vis/js/api.js"])
def test_vis_unset_is_a_json_404(make_app, path):
    client = make_app().test_client()
    assert "GATEWAY_VIS_DIR" in vis_error(client.get(path), 404)


def test_vis_takes_only_get(make_app):
    client = make_app(VIS_DIR=str(VIS_DIR)).test_client()
    assert "POST" in vis_error(client.post("/vis/"), 405)
    assert client.head("/vis/js/api.js").status_code == 200


def test_a_relative_vis_dir_is_taken_from_where_the_gateway_starts(make_app, monkeypatch):
    monkeypatch.chdir(FIXTURES)
    app = make_app(VIS_DIR="vis")
    assert app.config["VIS_DIR"] == str(VIS_DIR)
    monkeypatch.chdir("/")
    assert app.test_client().get("/vis/").get_data() == (VIS_DIR / "index.html").read_bytes()


def test_vis_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'env.sqlite'}")
    monkeypatch.setenv("GATEWAY_STORAGE_DIR", str(tmp_path / "storage"))
    monkeypatch.setenv("GATEWAY_VIS_DIR", str(VIS_DIR))
    app = create_app()
    assert app.test_client().get("/vis/js/api.js").status_code == 200
    release_connections(app)


@pytest.mark.parametrize("vis_dir", ["missing", "vis/index.html"])
def test_a_vis_dir_that_is_no_folder_stops_the_app_with_its_name(make_app, vis_dir):
    with pytest.raises(ValueError, match="^GATEWAY_VIS_DIR must name a folder; there is none at "):
        make_app(VIS_DIR=str(FIXTURES / vis_dir))
