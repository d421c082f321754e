"""Hostile but legal queries through the annotation API, on both stores: each limit of the query engine
holds just inside (the right answer) and just outside (a 400 that names it); text that a store could not
keep is refused; a search that works too long is stopped with a 503. Never a 500 or a hung worker.

The fixture store (tests/conftest.py, `annotated`): pneumonia (C0000030) is annotated in 1.3 and 1.7;
Chest wall (C0000002) expands to 1.1, 1.2, 1.3 and 1.7; the reports of 1.3, 1.6 and 1.7 mention pneumonia;
ModalitiesInStudy: 1.1 CT\\SR, 1.2 MR, 1.3 CR\\DX, 1.4 CT, 1.5 US, 1.7 CT, 1.8 CT\\PT.
"""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import event, text

from gateway.annotations import query as query_module
from gateway.annotations.mappings import load_mappings
from gateway.annotations.query import MAX_CONCEPTS, MAX_ITEMS, MAX_QUERY_ITEMS, MAX_TERMS, MAX_TEXT, MAX_UIDS
from gateway.annotations.store import Document, import_documents
from gateway.db import bulk_insert, db, write_transaction
from gateway.models import concept_relations, concepts
from tests.conftest import ANNOTATION_FIXTURES, FIXTURE_CONCEPTS

EVERYTHING = {"q": "C0000001,C0000030,C0000020,C9999999", "qonlysty": False}  # every fixture document
PNEUMONIA = ["1.3", "1.7"]
PNEUMONIA_TEXT = ["1.3", "1.6", "1.7"]


@pytest.fixture
def client(annotated):
    return annotated.test_client()


def search(client, query, call="search_anns"):
    """(status, body) of a query POSTed as JSON."""
    response = client.post(f"/api/{call}/x", data=json.dumps(query), content_type="application/json")
    return response.status_code, response.get_json()


def results(client, query, call="search_anns"):
    status, body = search(client, query, call)
    assert status == 200, body
    return body["results"]


def refusal(client, query, call="search_anns"):
    status, body = search(client, query, call)
    assert status == 400 and body["success"] is False, body
    return body["message"]


def names(count, prefix="no such name"):
    """count free-text items that match nothing (and, as words, no report)."""
    return [f"{prefix} {number}" for number in range(count)]


def words(count):
    return [f"nosuchword{number}" for number in range(count)]


# --- text that a store could not keep ------------------------------------------------------------------------------

UNSTORABLE = {"NUL": ("\x00", "holds a NUL character"), "lone surrogate": ("\ud800", "lone surrogate")}


@pytest.mark.parametrize("character", UNSTORABLE, ids=list(UNSTORABLE))
@pytest.mark.parametrize(
    "call, query, named",
    [
        ("search_anns", lambda bad: {"terms": [{"q": f"pneu{bad}monia"}]}, "terms[0].q"),
        ("search_anns", lambda bad: {"terms": [{"q": "C0000030"}, {"q": ["C0000002", f"-Rib{bad}"]}]}, "terms[1].q"),
        ("search_docs", lambda bad: {"terms": [{"q": f"pneumonia{bad}"}]}, "terms[0].q"),
        ("search_anns", lambda bad: {"terms": [{"q": "C0000002", "qstop": f"C0000004,{bad}"}]}, "terms[0].qstop"),
        ("search_anns", lambda bad: {"terms": [EVERYTHING], "filter": {"modalities": ["MR", f"CT{bad}"]}},
         "filter.modalities"),
        ("search_docs", lambda bad: {"terms": [{"q": "pneumonia"}], "filter": {"modalities": f"{bad}CT"}},
         "filter.modalities"),
        ("search_anns", lambda bad: {"terms": [EVERYTHING], "filter": {"sopinstanceuid": [f"1.1{bad}"]}},
         "filter.sopinstanceuid"),
        ("search_anns", lambda bad: {"terms": [EVERYTHING], "filter": {"seriesinstanceuid": [f"2.1{bad}.1"]}},
         "filter.seriesinstanceuid"),
        ("search_anns", lambda bad: {"terms": [EVERYTHING], "filter": {"studyinstanceuid": f"3.1.1,{bad}"}},
         "filter.studyinstanceuid"),
        ("search_anns", lambda bad: {"terms": [EVERYTHING], "returnFields": ["PatientID", f"SOP{bad}"]},
         "returnFields"),
    ],
)
@pytest.mark.store_independent
def test_text_that_a_store_could_not_keep_is_refused_naming_its_key(client, call, query, named, character):
    bad, reason = UNSTORABLE[character]
    message = refusal(client, query(bad), call)
    assert message.startswith(named + ":") and reason in message, message


@pytest.mark.parametrize("character", UNSTORABLE, ids=list(UNSTORABLE))
@pytest.mark.store_independent
def test_unstorable_text_in_a_get_query_or_a_path_is_refused(client, character):
    bad, reason = UNSTORABLE[character]
    response = client.get("/api/search_anns/x", query_string={"j": json.dumps({"terms": [{"q": f"Rib{bad}"}]})})
    assert response.status_code == 400 and reason in response.get_json()["message"]
    if bad == "\x00":  # a path holds only what UTF-8 can encode: no lone surrogate
        response = client.get("/api/search_anns/pneu%00monia")
        assert response.status_code == 400 and reason in response.get_json()["message"]


# --- the limits: just inside, just outside ---------------------------------------------------------------------------


def test_free_text_items_of_one_term_up_to_the_limit(client):
    assert results(client, {"terms": [{"q": names(MAX_ITEMS - 1) + ["PNEUMONIA"]}]}) == PNEUMONIA
    message = refusal(client, {"terms": [{"q": names(MAX_ITEMS) + ["PNEUMONIA"]}]})
    assert message.startswith("terms[0].q:") and f"at most {MAX_ITEMS:,}" in message


def test_excluded_free_text_items_up_to_the_limit(client):
    excluded = ",".join(names(MAX_QUERY_ITEMS - 2) + ["pneumonia"])
    assert results(client, {"terms": [{"q": "C0000002"}, {"q": f"-{excluded}"}]}) == ["1.1", "1.2"]
    one_by_one = ["C0000002"] + [f"-{name}" for name in names(MAX_QUERY_ITEMS - 2)] + ["-pneumonia"]
    assert results(client, {"terms": [{"q": one_by_one}]}) == ["1.1", "1.2"]


def test_items_of_all_terms_up_to_the_limit(client):
    per_term = MAX_QUERY_ITEMS // 4
    terms = [{"q": names(per_term - 1, f"term {number}") + ["Pneumonia"]} for number in range(4)]
    assert results(client, {"terms": terms}) == PNEUMONIA
    terms[-1]["q"].append("Chest wall")
    message = refusal(client, {"terms": terms})
    assert message.startswith("terms:") and f"{MAX_QUERY_ITEMS + 1:,} q items" in message
    assert f"at most {MAX_QUERY_ITEMS:,}" in message


@pytest.mark.parametrize("call", ["search_anns", "search_docs"])
@pytest.mark.store_independent
def test_a_huge_query_is_refused_at_once(client, call):
    # 100 terms of 600 free-text items (650 KB) held a worker for 30 s, of 1,000 full-text items grew it to 505 MB
    for per_term, item in ((600, "word {}"), (MAX_ITEMS, "w{}")):
        terms = [{"q": ",".join(item.format(number) for number in range(per_term))} for _term in range(MAX_TERMS)]
        started = time.monotonic()
        message = refusal(client, {"terms": terms}, call)
        assert time.monotonic() - started < 2 and f"a query may have at most {MAX_QUERY_ITEMS:,}" in message


def test_full_text_items_up_to_the_limit(client):
    assert results(client, {"terms": [{"q": words(MAX_ITEMS - 1) + ["pneumonia"]}]}, "search_docs") == PNEUMONIA_TEXT
    excluded = words(MAX_QUERY_ITEMS - 2) + ["history"]  # the report of 1.6
    query = {"terms": [{"q": "pneumonia"}, {"q": "-" + ",".join(excluded)}]}
    assert results(client, query, "search_docs") == PNEUMONIA
    message = refusal(client, {"terms": [{"q": words(MAX_ITEMS + 1)}]}, "search_docs")
    assert message.startswith("terms[0].q:") and f"at most {MAX_ITEMS:,}" in message


def test_full_text_items_of_many_words_each(client):
    many_words = " ".join(words(MAX_TEXT // 13))  # as long as an item may be
    items = [many_words] * (MAX_ITEMS - 1) + ["Pneumonia"]
    assert results(client, {"terms": [{"q": items}]}, "search_docs") == PNEUMONIA_TEXT


def test_terms_up_to_the_limit(client):
    for call, expected in (("search_anns", PNEUMONIA), ("search_docs", PNEUMONIA_TEXT)):
        terms = [{"q": ["pneumonia", f"-nosuchword{number}"]} for number in range(MAX_TERMS)]
        assert results(client, {"terms": terms}, call) == expected
        message = refusal(client, {"terms": terms + [{"q": "pneumonia"}]}, call)
        assert message.startswith("terms:") and f"at most {MAX_TERMS} terms" in message


def test_modalities_up_to_the_limit(client):
    modalities = [f"M{number}" for number in range(MAX_ITEMS - 1)]
    assert results(client, {"terms": [EVERYTHING], "filter": {"modalities": modalities + ["dx"]}}) == ["1.3"]
    message = refusal(client, {"terms": [EVERYTHING], "filter": {"modalities": modalities + ["DX", "CT"]}})
    assert message.startswith("filter.modalities:") and f"at most {MAX_ITEMS:,}" in message


def test_a_backslash_or_a_wildcard_in_a_modality_is_a_plain_character(client):
    # PostgreSQL's LIKE takes the backslash as its escape character unless told otherwise
    assert results(client, {"terms": [EVERYTHING], "filter": {"modalities": ["CT\\SR"]}}) == ["1.1"]
    assert results(client, {"terms": [EVERYTHING], "filter": {"modalities": ["C_", "%", "/", "CT\\_R"]}}) == []


@pytest.mark.parametrize("key, matching", [("sopinstanceuid", "1.4"), ("studyinstanceuid", "3.1.4")])
def test_uid_lists_up_to_the_limit(client, key, matching):
    uids = [f"9.9.{number}" for number in range(MAX_UIDS - 1)] + [matching]
    assert results(client, {"terms": [EVERYTHING], "filter": {key: uids}}) == ["1.4"]
    message = refusal(client, {"terms": [EVERYTHING], "filter": {key: uids + ["9.8"]}})
    assert message.startswith(f"filter.{key}:") and f"at most {MAX_UIDS:,}" in message


def test_a_value_up_to_the_longest_text(client):
    assert results(client, {"terms": [{"q": ["Pneumonia", "x" * MAX_TEXT]}]}) == PNEUMONIA
    message = refusal(client, {"terms": [{"q": ["Pneumonia", "x" * (MAX_TEXT + 1)]}]})
    assert message.startswith("terms[0].q:") and f"longer than {MAX_TEXT} characters" in message


ROOT = "C0000050"


@pytest.fixture
def wide_dictionary(annotated):
    """ROOT, without a semantic group, with MAX_CONCEPTS - 1 narrower concepts; the last one in document 1.9."""
    children = [f"C3{number:06d}" for number in range(MAX_CONCEPTS - 1)]
    with annotated.app_context():
        with write_transaction() as session:
            bulk_insert(session, concepts, ["cui", "pref"], [(cui, cui) for cui in [ROOT, *children]])
            bulk_insert(session, concept_relations, ["parent_cui", "child_cui"], [(ROOT, cui) for cui in children])
        import_documents([Document("1.9", [{"cui": children[-1], "pref": "Last child"}])])
    return annotated.test_client()


def test_concepts_after_expansion_up_to_the_limit(wide_dictionary):
    assert results(wide_dictionary, {"terms": [{"q": ROOT}]}) == ["1.9"]
    # one concept more, in the term or in another: counted over all terms
    for terms in ([{"q": [ROOT, "C0000030"]}], [{"q": ROOT}, {"q": "-pneumonia,C0000030"}]):
        message = refusal(wide_dictionary, {"terms": terms})
        assert f"more than {MAX_CONCEPTS:,} concepts after expansion" in message
    assert results(wide_dictionary, {"terms": [{"q": [ROOT, "C0000030"], "qdepth": 0}]}) == PNEUMONIA


# --- items looked up a kind at a time, expanded together ----------------------------------------------------------------


def _answers_alone_and_together(client, items, **settings):
    alone = set()
    for item in items:
        alone |= set(results(client, {"terms": [{"q": item, **settings}]}))
    return alone, set(results(client, {"terms": [{"q": items, **settings}]}))


@pytest.mark.parametrize(
    "settings",
    [{}, {"qonlysty": False}, {"qdepth": 1}, {"qdepth": 2, "qonlysty": False}, {"qstop": ["C0000004", "C0000031"]}],
    ids=["default", "any group", "depth 1", "depth 2, any group", "qstop"],
)
def test_roots_expanded_together_find_what_each_finds_alone(client, settings):
    # roots of several semantic groups (Chest wall ANAT below Chest ANAT; Lung lesion DISO, with Lung apex
    # ANAT below it), one reachable from another, and a cycle (Cycle A <> Cycle B)
    roots = [cui for cui, _pref, _group in FIXTURE_CONCEPTS] + ["233604007", "78904004"]
    alone, together = _answers_alone_and_together(client, roots, **settings)
    assert together == alone
    alone, together = _answers_alone_and_together(client, ["C0000001", "C0000031"], **settings)
    assert together == alone
    if not settings:  # Lung apex (1.5) is of neither's group below its own root
        assert together == {"1.1", "1.2", "1.3", "1.7"}


def test_items_are_looked_up_a_kind_at_a_time(annotated, client):
    with annotated.app_context():
        load_mappings(ANNOTATION_FIXTURES.parent / "mappings")  # "chest findings", "chest"
    unknown_cuis = [f"C8{number:06d}" for number in range(200)]
    unknown_snomed = [str(900_000 + number) for number in range(200)]
    items = (
        [cui for cui, _pref, _group in FIXTURE_CONCEPTS] + unknown_cuis + ["233604007"] + unknown_snomed
        + ["chest findings"] + names(200) + ["Lung apex"]
    )
    statements = []
    with annotated.app_context():
        event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    status, body = search(client, {"terms": [{"q": items, "qonlysty": False}]})
    assert status == 200, body
    assert body["results"] == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7"]
    assert len(body["warnings"]) == 400 and "C8000000" in body["warnings"][0] and "900000" in body["warnings"][200]
    # existing CUIs, SNOMED ids, mapping names, semantic groups, one per level of the walk, the search:
    # not several per item
    assert len(statements) < 20, len(statements)


# --- the time budget -------------------------------------------------------------------------------------------------

SLOW_DOCS = 5_000


@pytest.fixture
def many_documents(annotated):
    """SLOW_DOCS more documents annotated with pneumonia; their UIDs are 1.20.N."""
    with annotated.app_context():
        import_documents([
            Document(f"1.20.{number}", [{"cui": "C0000030", "pref": "Pneumonia"}], modalities_in_study="CT")
            for number in range(SLOW_DOCS)
        ])
    return annotated


# every matched document against 1,000 LIKE patterns: a second or so, all of it in the database
SLOW_QUERY = {"terms": [{"q": "C0000030"}], "filter": {"modalities": [f"M{number}" for number in range(MAX_ITEMS)]}}


def test_a_search_longer_than_its_budget_is_stopped_with_a_503(many_documents):
    client = many_documents.test_client()
    started = time.monotonic()
    assert results(client, SLOW_QUERY) == []
    unbounded = time.monotonic() - started
    # a budget well inside the query's own time, however fast this machine runs it
    budget = round(unbounded / 8, 3)
    assert budget >= 0.01, f"the slow query ({unbounded:.3f} s) is too fast to show the budget"
    many_documents.config["SEARCH_SECONDS"] = budget
    started = time.monotonic()
    status, body = search(client, SLOW_QUERY)
    elapsed = time.monotonic() - started
    assert status == 503 and body == {
        "success": False,
        "message": f"the search took longer than {budget:g} s, the most a search may take; narrow it (fewer items"
                   " or concepts, a date range, fewer documents) or try again later",
    }
    assert elapsed < unbounded / 2, (elapsed, unbounded)


def test_a_slow_client_is_not_cut_off(many_documents, monkeypatch):
    # The budget is the database's per batch: a client that takes longer than it between batches
    # still gets every result.
    monkeypatch.setattr(query_module, "_STREAM_BATCH", 500)
    budget = many_documents.config["SEARCH_SECONDS"] = 0.5
    response = many_documents.test_client().get("/api/search_anns/C0000030/", buffered=False)
    assert response.status_code == 200
    chunks = []
    for chunk in response.response:
        chunks.append(chunk)
        time.sleep(budget * 1.2)
    response.close()
    assert len(chunks) >= 3  # the head, and rows of at least two batches read after a pause
    assert json.loads(b"".join(chunks))["num_results"] == SLOW_DOCS + len(PNEUMONIA)


# a statement that takes longer than any budget the tests give (0.3 s or more on either store)
SLOW_STATEMENT = text("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) SELECT count(*) FROM n")


def test_no_budget_stays_on_a_pooled_connection(many_documents):
    client = many_documents.test_client()
    many_documents.config["SEARCH_SECONDS"] = 0.01
    assert search(client, SLOW_QUERY)[0] == 503
    many_documents.config["SEARCH_SECONDS"] = 0.1
    assert results(client, {"terms": [{"q": "C0000002"}]}) == ["1.1", "1.2", "1.3", "1.7"]
    response = client.get("/api/search_anns/C0000030/", buffered=False)
    next(iter(response.response))
    response.close()  # the client went away in the middle of the answer
    with many_documents.app_context():
        idle = [db.engine.connect() for _connection in range(db.engine.pool.checkedin())]
        try:
            for connection in idle:
                assert connection.execute(SLOW_STATEMENT).scalar_one() == 1_000_000
        finally:
            for connection in idle:
                connection.close()


def test_through_gateway_serve_four_costly_searches_leave_room_for_a_simple_one(many_documents, gunicorn):
    """Four searches that would each keep the database busy for longer than the budget are stopped by it,
    and while they run a simple search still answers within 3 s."""
    # more documents, until each search has seconds of work, however fast this machine and store are
    many_documents.config["SEARCH_SECONDS"] = 60
    added, unbounded = 0, 0
    while unbounded < 1.5:
        more = max(added, SLOW_DOCS)  # doubles the documents each round
        with many_documents.app_context():
            import_documents([
                Document(f"1.21.{number}", [{"cui": "C0000030", "pref": "Pneumonia"}], modalities_in_study="CT")
                for number in range(added, added + more)
            ])
        added += more
        started = time.monotonic()
        assert results(many_documents.test_client(), SLOW_QUERY) == []
        unbounded = time.monotonic() - started
    budget = round(unbounded / 3, 1)  # each search would run three times as long as the budget allows
    base_url, log_path = gunicorn(many_documents, {"GATEWAY_SEARCH_SECONDS": str(budget)}, via_cli=True)
    def costly_search():
        started = time.monotonic()
        response = requests.post(f"{base_url}/api/search_anns/x", json=SLOW_QUERY, timeout=60)
        return response.status_code, time.monotonic() - started

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(costly_search) for _ in range(4)]
        time.sleep(0.5)  # all four are at work
        simple = []
        while not all(search.done() for search in running):
            started = time.monotonic()
            answer = requests.get(f"{base_url}/api/search_anns/C0000002/", timeout=30)
            simple.append((answer.status_code, time.monotonic() - started))
        finished = [search.result() for search in running]
    assert [status for status, _ in finished] == [503] * 4, log_path.read_text()[-2000:]
    assert max(seconds for _, seconds in finished) < 4 * budget  # four at once on two cores
    assert simple and all(status == 200 for status, _ in simple)
    assert max(seconds for _, seconds in simple) < 3, simple
