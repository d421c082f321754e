"""Free text in annotation queries: a word search over each annotation's preferred name, as PostgreSQL's
`websearch_to_tsquery('english', q) @@ to_tsvector('english', pref)` has it (PRODUCT.md), the same on both
stores; through the annotation API, and words() / parse() checked against PostgreSQL itself.

The corpus of these tests:

    doc  annotations (negation / experiencer)
    2.1  Lung nodule (Affirmed / Patient)
    2.2  Nodule of rib (Negated / Patient)
    2.3  Rib nodule (Affirmed / Other)
    2.4  Pleural effusion (Affirmed / Patient)
    2.5  Nodule of the rib (Affirmed / Patient)
    2.6  Lung nodule (Negated / Patient), Pleural effusion (Affirmed / Patient)
    2.7  Non-small cell lung cancer (Affirmed / Patient)
    2.8  LUNG NODULES (Affirmed / Patient), the same concept as 2.1's under another spelling
    2.9  Hydrothorax, the concept of 2.4's pleural effusion under another name, and 2.3's concept without a name
"""
import json

import pytest
import sqlalchemy

from gateway.annotations.store import Document, import_documents, rebuild_pref_words
from gateway.annotations.words import parse, words
from gateway.db import write_engine
from gateway.models import annotation_pref_words

CORPUS = {
    "2.1": [("C0100001", "Lung nodule", "Affirmed", "Patient")],
    "2.2": [("C0100002", "Nodule of rib", "Negated", "Patient")],
    "2.3": [("C0100003", "Rib nodule", "Affirmed", "Other")],
    "2.4": [("C0100004", "Pleural effusion", "Affirmed", "Patient")],
    "2.5": [("C0100005", "Nodule of the rib", "Affirmed", "Patient")],
    "2.6": [("C0100001", "Lung nodule", "Negated", "Patient"), ("C0100004", "Pleural effusion", "Affirmed", "Patient")],
    "2.7": [("C0100007", "Non-small cell lung cancer", "Affirmed", "Patient")],
    "2.8": [("C0100001", "LUNG NODULES", "Affirmed", "Patient")],
    "2.9": [("C0100004", "Hydrothorax", "Affirmed", "Patient"), ("C0100003", None, "Affirmed", "Patient")],
}
NODULE = ["2.1", "2.2", "2.3", "2.5", "2.6", "2.8"]
LUNG_NODULE = ["2.1", "2.6", "2.8"]


def document(uid, annotations):
    return Document(
        uid,
        [
            {"cui": cui, "pref": pref, "negation": negation, "experiencer": experiencer, "temporality": "Recent"}
            for cui, pref, negation, experiencer in annotations
        ],
    )


@pytest.fixture
def client(app):
    with app.app_context():
        import_documents([document(uid, annotations) for uid, annotations in CORPUS.items()])
    return app.test_client()


def answer(client, *terms, status=200):
    response = client.post("/api/search_anns/x/", json={"terms": list(terms)})
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


def found(client, *terms):
    return answer(client, *terms)["results"]


def test_a_word_finds_every_name_that_holds_it_in_any_case_and_form(client):
    assert found(client, {"q": "nodule"}) == NODULE
    assert found(client, {"q": "NODULES"}) == NODULE  # English stems: nodules, nodule → nodul
    assert found(client, {"q": "Nodular"}) == []  # a word of its own (nodular), not a prefix
    assert found(client, {"q": "nodul"}) == NODULE  # what a word is stemmed to is itself such a word
    # the path's QUERY, as the existing clients send it
    assert client.get("/api/search_anns/nodules/").get_json()["results"] == NODULE


def test_every_word_must_be_in_the_same_name_in_any_order(client):
    assert found(client, {"q": "pleural effusion"}) == ["2.4", "2.6"]
    assert found(client, {"q": "effusion pleural"}) == ["2.4", "2.6"]
    assert found(client, {"q": "rib nodule"}) == ["2.2", "2.3", "2.5"]
    # 2.6 has a lung nodule and a pleural effusion, but no one name with both words
    assert found(client, {"q": "lung effusion"}) == []


def test_a_quoted_phrase_keeps_its_order_and_stop_words_keep_their_places(client):
    assert found(client, {"q": '"rib nodule"'}) == ["2.3"]
    assert found(client, {"q": '"nodule rib"'}) == []
    # "of" is not searched but holds a place: nodule, one word, rib
    assert found(client, {"q": '"nodule of rib"'}) == ["2.2"]
    assert found(client, {"q": '"nodule the rib"'}) == ["2.2"]  # any stop word holds it
    assert found(client, {"q": '"nodule of the rib"'}) == ["2.5"]
    assert found(client, {"q": 'lung "nodules"'}) == LUNG_NODULE


def test_or_between_words_ors_them(client):
    assert found(client, {"q": "effusion or cancer"}) == ["2.4", "2.6", "2.7"]
    assert found(client, {"q": "pleural effusion OR rib nodule"}) == ["2.2", "2.3", "2.4", "2.5", "2.6"]
    assert found(client, {"q": 'effusion or "rib nodule"'}) == ["2.3", "2.4", "2.6"]
    assert found(client, {"q": "or effusion or"}) == ["2.4", "2.6"]  # an `or` with nothing on one side


def test_a_minus_inside_free_text_leaves_out_the_names_with_that_word(client):
    assert found(client, {"q": "nodule -rib"}) == LUNG_NODULE
    assert found(client, {"q": 'nodule -"rib nodule"'}) == ["2.1", "2.2", "2.5", "2.6", "2.8"]
    message = answer(client, {"q": "effusion or -rib"}, status=400)["message"]
    assert "only excluded words" in message and "effusion or -rib" in message


def test_a_leading_minus_excludes_the_item_or_the_term_as_before(client):
    # an item: the documents with a name that has both words are left out
    assert found(client, {"q": ["nodule", "-rib nodule"]}) == LUNG_NODULE
    assert found(client, {"q": "nodule"}, {"q": "-pleural effusion"}) == ["2.1", "2.2", "2.3", "2.5", "2.8"]
    assert found(client, {"q": "nodule"}, {"q": "-rib,cancer"}) == LUNG_NODULE


def test_hyphenated_words_are_found_whole_and_by_their_parts(client):
    for q in ("non-small cell", "small cell", '"non-small cell lung"', '"small cell lung cancer"', "NON-SMALL"):
        assert found(client, {"q": q}) == ["2.7"], q
    assert found(client, {"q": '"non cell"'}) == []


def test_a_concept_is_found_by_the_names_it_was_annotated_under_not_by_its_other_names(client):
    assert found(client, {"q": "effusion"}) == ["2.4", "2.6"]
    assert found(client, {"q": "hydrothorax"}) == ["2.9"]
    assert found(client, {"q": "effusion or hydrothorax"}) == ["2.4", "2.6", "2.9"]
    assert found(client, {"q": "rib nodule"}) == ["2.2", "2.3", "2.5"]  # not 2.9's nameless annotation


def test_the_qualifiers_constrain_the_annotation_whose_name_matched(client):
    assert found(client, {"q": "nodule", "negation": "Affirmed"}) == ["2.1", "2.3", "2.5", "2.8"]
    assert found(client, {"q": "nodule", "negation": "Negated"}) == ["2.2", "2.6"]
    assert found(client, {"q": "nodule", "experiencer": "Other"}) == ["2.3"]
    # 2.6's negated annotation is its lung nodule, not its pleural effusion
    assert found(client, {"q": "effusion", "negation": "Negated"}) == []


def test_free_text_of_stop_words_only_finds_nothing_with_a_warning(client):
    body = answer(client, {"q": "the"})
    assert body["results"] == []
    assert body["warnings"] == ["free text 'the' has no word to search for (stop words are not searched)"]
    assert found(client, {"q": "the nodule"}) == NODULE
    body = answer(client, {"q": ["of", "effusion"]})
    assert body["results"] == ["2.4", "2.6"] and "'of'" in body["warnings"][0]
    assert "warnings" not in answer(client, {"q": "nodule"})


def test_a_name_that_an_import_brings_is_found_and_a_replaced_one_is_not(client, app):
    assert found(client, {"q": "calcified"}) == []
    with app.app_context():
        import_documents([document("3.1", [("C0100009", "Calcified granuloma", "Affirmed", "Patient")])])
        import_documents([document("2.1", [("C0100010", "Lung mass", "Affirmed", "Patient")])])  # replaces 2.1
    assert found(client, {"q": "calcified"}) == ["3.1"]
    assert found(client, {"q": "granulomas"}) == ["3.1"]
    assert found(client, {"q": "lung mass"}) == ["2.1"]
    # the old name's words stay in the index; the annotation's own name is what counts
    assert found(client, {"q": "lung nodule"}) == ["2.6", "2.8"]


def test_letters_beyond_ascii_match_in_any_case_on_both_stores(client, app):
    # SQLite's lower() leaves Ö as it is: the index and the check agree all the same
    with app.app_context():
        import_documents([document("4.1", [("C0100011", "Sjögren syndrome", "Affirmed", "Patient")])])
    for q in ("sjögren", "SJÖGREN", '"Sjögren syndrome"'):
        assert found(client, {"q": q}) == ["4.1"], q
    assert found(client, {"q": "sjogren"}) == []


def test_the_index_is_rebuilt_from_the_recorded_names(client, app):
    """As a migration does it for a store whose annotations were imported before the word index."""
    with app.app_context():
        with write_engine().begin() as connection:
            connection.execute(annotation_pref_words.delete())
        assert found(client, {"q": "nodule"}) == []
        with write_engine().begin() as connection:
            rebuild_pref_words(connection)
            rebuild_pref_words(connection)  # again: the same index
    assert found(client, {"q": "nodule"}) == NODULE
    assert found(client, {"q": '"nodule of the rib"'}) == ["2.5"]


def test_words_are_stems_at_their_positions():
    assert words("Nodule of the rib") == [(1, "nodul"), (4, "rib")]
    assert words("LUNG NODULES") == [(1, "lung"), (2, "nodul")]
    assert words("X-ray of chest") == [(1, "x-ray"), (2, "x"), (3, "ray"), (5, "chest")]
    # tokens with digits are kept as they are; a number after a hyphen is signed
    assert words("T2-weighted 1.5 COVID-19") == [
        (1, "t2-weighted"), (2, "t2"), (3, "weight"), (4, "1.5"), (5, "covid"), (6, "-19")
    ]
    assert words("Crohn's disease") == [(1, "crohn"), (3, "diseas")]  # the "s" is a stop word
    assert words("the of and") == []


def test_parse_reads_websearch_syntax():
    free_text = parse('lung "nodule of rib" -mass or effusion')
    ((lung, phrase, mass), (effusion,)) = free_text.groups
    assert (lung.words, lung.excluded) == (((1, "lung"),), False)
    assert phrase.words == ((1, "nodul"), (3, "rib"))
    assert (mass.words, mass.excluded) == (((1, "mass"),), True)
    assert effusion.words == ((1, "effus"),)
    assert parse("the or of").groups == ()


# --- the reference: PostgreSQL's own text search ---------------------------------------------------------------

NAMES = [
    "Lung nodule", "Nodule of rib", "Rib nodule", "Nodule of the rib", "Pleural effusion", "Pleural effusions",
    "Effusion, pleural", "Pleural effusion (disorder)", "Non-small cell lung carcinoma", "Crohn's disease of the ileum",
    "Alzheimer's disease - late onset", "Sjögren's syndrome", "Naïve T-cell", "X-ray of chest", "Has had an X-ray",
    "COVID-19", "5-fluorouracil", "1,2-dichloroethane", "Type 2 diabetes mellitus", "Fracture of C2 vertebra",
    "C3-C4 disc herniation", "T2-weighted imaging", "Lesion 1.5 cm", "10.5cm mass", "45-year-old", "Grade-2 tumour",
    "Vitamin B12 deficiency", "3D reconstruction", "Left-to-right shunt", "Right-sided heart failure",
    "Post-operative state", "Status post-op", "Anti-Ro antibodies", "Non-Hodgkin's lymphoma", "Ear-nose-throat",
    "Structure of lateral ventricle", "Internal carotid artery", "Malignant neoplasm of lung, upper lobe",
    "Cerebrovascular accident [CVA]", "History of: hypertension", "Pain in left knee & hip", "Emphysema; pulmonary",
    "Dilated (enlarged) heart", "Degenerative joint disease, multiple sites", "Ground glass opacity",
    "Ground-glass opacities", "Abnormal findings on diagnostic imaging of lung", "Organising pneumonia",
    "Universal precautions", "Interval change", "Emergency department", "Paste", "Added", "Lungs", "Under_score",
]
QUERIES = [
    "nodule", "nodules", "NODULE", "rib nodule", '"rib nodule"', '"nodule rib"', '"nodule of rib"', '"nodule the rib"',
    '"nodule of the rib"', "nodule or lung", "nodule -rib", 'nodule -"of rib"', "pleural effusion",
    '"pleural effusion"', '"effusion pleural"', "x-ray", "ray", '"x ray"', "covid-19", "non-small", '"small cell"',
    "cell lung", "the nodule", "nodule or the", "lung(nodule)", "lung,nodule", "lung&nodule", '"lung',
    "disease of ileum",
    'lung"nodule rib"', "or nodule or", "nodule - rib", '"disease of ileum"', "crohn's", "T2", "c3-c4", "c4", "1.5",
    "b12", "t-cell", "left-sided", "sided", '"post op"', "post-op", "ground-glass", '"ground glass"', "glass ground",
    "Sjögren", "naive", "naïve", "lateral", "internal", "interval", "organizing", "universe", "emergency", "pasted",
    "adding", "lung", "score", "heart or lung -malignant", "NEAR(chest wall)", "Pneumonia' OR 1=1 --",
]


@pytest.fixture
def postgresql(postgres_server):
    """A connection to the test server: its text search functions need no database of the gateway's."""
    with postgres_server.engine.connect() as connection:
        yield connection


def test_words_agree_with_postgresql_to_tsvector(postgresql):
    for name in NAMES:
        lexemes = postgresql.execute(
            sqlalchemy.text(
                "SELECT position, lexeme FROM unnest(to_tsvector('english', :name)), unnest(positions) AS position"
            ),
            {"name": name},
        )
        assert sorted(words(name)) == sorted(lexemes), name


def test_free_text_matches_as_postgresql_websearch_to_tsquery(postgresql):
    postings = {}  # {stem: {name: {positions}}}, as the query engine reads them from annotation_pref_words
    for name in NAMES:
        for position, stem in words(name):
            postings.setdefault(stem, {}).setdefault(name, set()).add(position)
    for query in QUERIES:
        matched = postgresql.execute(
            sqlalchemy.text(
                "SELECT name FROM unnest(CAST(:names AS text[])) AS name"
                " WHERE websearch_to_tsquery('english', :query) @@ to_tsvector('english', name)"
            ),
            {"names": NAMES, "query": query},
        )
        assert parse(query).pref_keys(postings) == set(matched.scalars()), query


def test_json_and_path_queries_agree(client):
    """The path's QUERY and j's q are the same free text."""
    via_j = client.get("/api/search_anns/x/", query_string={"j": json.dumps({"terms": [{"q": '"rib nodule"'}]})})
    assert via_j.get_json()["results"] == ["2.3"]
    assert client.get("/api/search_anns/%22rib%20nodule%22/").get_json()["results"] == ["2.3"]
