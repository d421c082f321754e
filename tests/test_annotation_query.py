"""The cohort query engine on the fixture corpus (tests/conftest.py), on both stores.

The corpus, with the dictionary's narrower relations (Chest > Chest wall > Rib > First rib; Chest > Lung >
Lung lesion (DISO) > Lung apex; Chest > Chest pain (DISO) > Pleuritic chest pain; Cycle A <> Cycle B):

    doc  annotations (negation / experiencer / temporality)                   ContentDate  ModalitiesInStudy
    1.1  Chest wall (Affirmed / Patient / Recent)                             2017-01-01   CT\\SR
    1.2  Rib (Negated / Patient / Recent)                                     2017-01-02   MR
    1.3  First rib (Affirmed / Other / historical), Pneumonia (Negated / Patient / Recent)
                                                                              2017-01-03   CR\\DX
    1.4  Pleuritic chest pain (Affirmed / Patient / Recent)                   2017-01-04   CT
    1.5  Lung apex (Affirmed / Patient / Recent)                              2018-06-01   US
    1.6  Pneumonia (ruled out), Cycle B (Affirmed / Patient / Recent)         -            -
    1.7  Pneumonia (Affirmed / Patient / Recent), Chest wall (Negated / Other / hypothetical)
                                                                              2016-12-31   CT
    1.8  Ground glass opacity, C9999999, not in the dictionary (Affirmed)     2017-02-01   CT\\PT
"""
import json

import pytest
from sqlalchemy import func, select

from gateway.annotations.mappings import load_mappings
from gateway.annotations.query import parse_query, search_annotations, search_documents, single_term_query
from gateway.annotations.store import Document, import_documents
from gateway.db import db, write_engine
from gateway.errors import InvalidValue
from gateway.models import concept_relations, concept_types, concepts, documents
from tests.conftest import ANNOTATION_FIXTURES

# Items that together reach every document of the corpus.
EVERYTHING = {"q": "C0000001,C0000030,C0000020,C9999999", "qonlysty": False}


@pytest.fixture
def ctx(annotated):
    with annotated.app_context():
        yield annotated


def run(*terms, **query):
    return search_annotations(parse_query({"terms": list(terms), **query}))


def found(*terms, **query):
    return run(*terms, **query).all()


def found_text(*terms, **query):
    return search_documents(parse_query({"terms": list(terms), **query})).all()


def refused(query, search=search_annotations):
    with pytest.raises(InvalidValue) as raised:
        search(parse_query(query))
    return raised.value.message


# --- concepts and their expansion ----------------------------------------------------------------------


def test_a_cui_is_expanded_to_every_narrower_concept_of_its_semantic_group(ctx):
    # Chest pain and Lung lesion (DISO) are left out with Pleuritic chest pain and Lung apex below them
    assert found({"q": "C0000001"}) == ["1.1", "1.2", "1.3", "1.7"]
    assert found({"q": "C0000001", "qonlysty": True}) == ["1.1", "1.2", "1.3", "1.7"]
    assert found({"q": "C0000001", "qonlysty": False}) == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.7"]


def test_qonlysty_compares_with_the_queried_concept(ctx):
    # Pleuritic chest pain is below Chest pain, both DISO: kept
    assert found({"q": "C0000010"}) == ["1.4"]
    # Lung apex (ANAT) below Lung lesion (DISO): left out
    assert found({"q": "C0000031"}) == []
    assert found({"q": "C0000031", "qonlysty": False}) == ["1.5"]


def test_qdepth_limits_the_expansion(ctx):
    assert found({"q": "C0000002", "qdepth": 0}) == ["1.1", "1.7"]
    assert found({"q": "C0000002", "qdepth": 1}) == ["1.1", "1.2", "1.7"]
    assert found({"q": "C0000002", "qdepth": 2}) == ["1.1", "1.2", "1.3", "1.7"]
    assert found({"q": "C0000002"}) == ["1.1", "1.2", "1.3", "1.7"]
    assert found({"q": "C0000001", "qdepth": 0}) == []


def test_qstop_prunes_a_concept_and_what_is_reached_only_through_it(ctx):
    assert found({"q": "C0000001", "qstop": ["C0000004"]}) == ["1.1", "1.7"]
    assert found({"q": "C0000001", "qstop": "c0000031", "qonlysty": False}) == ["1.1", "1.2", "1.3", "1.4", "1.7"]
    assert found({"q": "C0000001", "qstop": ["C0000002", "C0000010"], "qonlysty": False}) == ["1.5"]
    # stopping the queried concept itself leaves nothing
    assert found({"q": "C0000002", "qstop": ["C0000002"]}) == []


def test_a_cycle_in_the_dictionary_is_harmless(ctx):
    assert found({"q": "C0000020"}) == ["1.6"]
    assert found({"q": "C0000021"}) == ["1.6"]
    assert found({"q": "C0000020", "qdepth": 5}) == ["1.6"]
    assert found({"q": "C0000020", "qdepth": 0}) == []


def test_a_snomed_id_stands_for_its_concept_expanded(ctx):
    assert found({"q": "78904004"}) == ["1.1", "1.2", "1.3", "1.7"]
    assert found({"q": "78904004", "qdepth": 0}) == ["1.1", "1.7"]
    # the ruled-out Pneumonia of 1.6 does not count
    assert found({"q": "233604007"}) == ["1.3", "1.7"]


def test_a_lower_case_cui_is_a_cui(ctx):
    assert found({"q": "c0000004"}) == ["1.2", "1.3"]


def test_unknown_codes_match_only_themselves_with_a_warning(ctx):
    search = run({"q": "C9999999"})
    assert search.all() == ["1.8"]
    assert len(search.warnings) == 1 and "C9999999" in search.warnings[0]
    search = run({"q": "123456"})
    assert search.all() == []
    assert len(search.warnings) == 1 and "123456" in search.warnings[0]
    assert run({"q": "C0000002"}).warnings == []


# --- mappings ----------------------------------------------------------------------------------------


def test_a_mapping_name_stands_for_its_cuis_as_listed(ctx, tmp_path):
    (tmp_path / "chest wall only.json").write_text(json.dumps({"chest wall": ["C0000002"]}), encoding="utf-8")
    load_mappings(tmp_path)
    load_mappings(ANNOTATION_FIXTURES.parent / "mappings")
    # not expanded: Rib (1.2) and First rib (1.3) are below Chest wall
    assert found({"q": "chest wall only"}) == ["1.1", "1.7"]
    # rib, pneumonia, lung apex
    assert found({"q": "chest"}) == ["1.2", "1.3", "1.5", "1.7"]
    assert found({"q": "chest", "negation": "Negated"}) == ["1.2", "1.3"]


def test_a_mapping_of_the_mappings_folder_is_a_query_item(ctx, tmp_path):
    ctx.config["MAPPINGS_DIR"] = str(tmp_path)
    (tmp_path / "lungs.json").write_text(json.dumps({"apex": ["C0000006\tLung apex\tBody Part"]}), encoding="utf-8")
    assert found({"q": "lungs"}) == ["1.5"]


# --- free text ----------------------------------------------------------------------------------------


def test_free_text_is_a_word_search_over_preferred_names_in_any_case(ctx):
    assert found({"q": "pneumonia"}) == ["1.3", "1.7"]
    assert found({"q": "PNEUMONIA"}) == ["1.3", "1.7"]
    assert found({"q": "Ground glass opacity"}) == ["1.8"]
    # a word of a name (Chest wall, Pleuritic chest pain), not expanded (Rib is below Chest wall)
    assert found({"q": "chest wall"}) == ["1.1", "1.7"]
    assert found({"q": "chest"}) == ["1.1", "1.4", "1.7"]
    assert found({"q": "glass"}) == ["1.8"]
    # whole words, not a prefix
    assert found({"q": "pneumoni"}) == []


# --- items, terms and exclusions ---------------------------------------------------------------------------


def test_items_of_a_term_are_ored(ctx):
    assert found({"q": "C0000004,C0000006"}) == ["1.2", "1.3", "1.5"]
    assert found({"q": "C0000004, lung apex"}) == ["1.2", "1.3", "1.5"]
    assert found({"q": ["C0000004", "Lung apex"]}) == ["1.2", "1.3", "1.5"]
    assert found({"q": ["233604007", "C0000011"]}) == ["1.3", "1.4", "1.7"]


def test_terms_are_anded(ctx):
    assert found({"q": "C0000030"}, {"q": "C0000002"}) == ["1.3", "1.7"]
    assert found({"q": "C0000030"}, {"q": "C0000002", "qdepth": 0}) == ["1.7"]
    assert found({"q": "C0000030"}, {"q": "C0000006"}) == []


def test_a_leading_minus_excludes_a_whole_term(ctx):
    assert found({"q": "C0000002"}, {"q": "-C0000030"}) == ["1.1", "1.2"]
    assert found({"q": "C0000002"}, {"q": "-C0000030,C0000006"}) == ["1.1", "1.2"]
    assert found({"q": "C0000002"}, {"q": "-pneumonia"}) == ["1.1", "1.2"]
    assert found({"q": "C0000001", "qonlysty": False}, {"q": "-C0000004,C0000031", "qonlysty": False}) == [
        "1.1", "1.4", "1.7"
    ]


def test_terms_of_several_items_anded_with_exclusions(ctx):
    assert found({"q": "C0000002,pneumonia"}, {"q": "C0000001,Pneumonia"}) == ["1.1", "1.2", "1.3", "1.7"]
    assert found({"q": "C0000002"}, {"q": "C0000001"}, {"q": "-C0000030"}) == ["1.1", "1.2"]
    assert found({"q": "C0000002,pneumonia"}, {"q": "-C0000004"}, {"q": "-Lung apex,Pleuritic chest pain"}) == ["1.1", "1.7"]
    assert found({"q": "C0000001,C0000030", "qonlysty": False}, {"q": "-C0000004"}, {"q": "-pneumonia"}) == [
        "1.1", "1.4", "1.5"
    ]


def test_a_minus_excludes_one_item_of_a_list(ctx):
    assert found({"q": "C0000002,-C0000030"}) == ["1.1", "1.2"]
    assert found({"q": ["C0000002", "-C0000030"]}) == ["1.1", "1.2"]
    assert found({"q": "C0000002, -C0000030, C0000006"}) == ["1.1", "1.2", "1.5"]


def test_an_exclusion_keeps_the_qualifiers_of_its_term(ctx):
    # only the document with a negated Pneumonia (1.3) goes
    assert found({"q": "C0000002"}, {"q": "-C0000030", "negation": "Negated"}) == ["1.1", "1.2", "1.7"]


def test_a_ruled_out_annotation_neither_matches_nor_excludes(ctx):
    assert found({"q": "C0000030"}) == ["1.3", "1.7"]
    assert found({"q": "C0000020"}, {"q": "-C0000030"}) == ["1.6"]


def test_a_query_of_exclusions_only_is_refused(ctx):
    for terms in ([{"q": "-C0000030"}], [{"q": "-C0000030,-C0000002"}], [{"q": ["-C0000030"]}]):
        assert "only of exclusions" in refused({"terms": terms})
    assert "only of exclusions" in refused({"terms": [{"q": "-pneumonia"}]}, search_documents)


# --- qualifiers ---------------------------------------------------------------------------------------------


def test_negation_constrains_the_annotation_that_matched(ctx):
    assert found({"q": "C0000002", "negation": "Negated"}) == ["1.2", "1.7"]
    assert found({"q": "C0000002", "negation": "affirmed"}) == ["1.1", "1.3"]
    assert found({"q": "C0000002", "negation": "Any"}) == ["1.1", "1.2", "1.3", "1.7"]


def test_qualifiers_on_other_annotations_of_a_document_do_not_match(ctx):
    # 1.7 has a negated, hypothetical Chest wall of another experiencer, and an affirmed Pneumonia
    assert found({"q": "C0000030", "negation": "Negated"}) == ["1.3"]
    assert found({"q": "C0000030", "experiencer": "Other"}) == []
    assert found({"q": "C0000030", "temporality": "hypothetical"}) == []
    assert found({"q": "C0000030", "negation": "Affirmed", "experiencer": "Patient", "temporality": "Recent"}) == ["1.7"]
    assert found({"q": "C0000002", "negation": "Negated", "experiencer": "Other"}) == ["1.7"]
    assert found({"q": "C0000002", "negation": "Negated", "experiencer": "Patient"}) == ["1.2"]


def test_experiencer(ctx):
    assert found({"q": "C0000002", "experiencer": "Patient"}) == ["1.1", "1.2"]
    assert found({"q": "C0000002", "experiencer": "OTHER"}) == ["1.3", "1.7"]
    assert found({"q": "C0000002", "experiencer": "Any"}) == ["1.1", "1.2", "1.3", "1.7"]


def test_temporality_one_value_or_several_ored(ctx):
    assert found({"q": "C0000002", "temporality": "Recent"}) == ["1.1", "1.2"]
    assert found({"q": "C0000002", "temporality": "HISTORICAL"}) == ["1.3"]
    assert found({"q": "C0000002", "temporality": ["historical", "hypothetical"]}) == ["1.3", "1.7"]
    assert found({"q": "C0000002", "temporality": "historical,hypothetical"}) == ["1.3", "1.7"]


# --- filters ------------------------------------------------------------------------------------------------


def test_dates_are_inclusive_at_both_ends(ctx):
    assert found(EVERYTHING, filter={"start_date": "2017-01-02", "end_date": "2017-01-03"}) == ["1.2", "1.3"]
    assert found(EVERYTHING, filter={"start_date": "2017-01-01", "end_date": "2017-01-01"}) == ["1.1"]


def test_a_start_date_or_an_end_date_alone(ctx):
    # 1.6 has no ContentDate: any date filter leaves it out
    assert found(EVERYTHING) == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8"]
    assert found(EVERYTHING, filter={"start_date": "2017-01-04"}) == ["1.4", "1.5", "1.8"]
    assert found(EVERYTHING, filter={"end_date": "2017-01-01"}) == ["1.1", "1.7"]
    assert found(EVERYTHING, filter={"start_date": "2018-06-02"}) == []


def test_modalities_match_any_value_of_modalities_in_study(ctx):
    assert found(EVERYTHING, filter={"modalities": ["CT"]}) == ["1.1", "1.4", "1.7", "1.8"]
    assert found(EVERYTHING, filter={"modalities": "MR,US"}) == ["1.2", "1.5"]
    assert found(EVERYTHING, filter={"modalities": ["DX"]}) == ["1.3"]
    assert found(EVERYTHING, filter={"modalities": ["sr", "pt"]}) == ["1.1", "1.8"]
    assert found(EVERYTHING, filter={"modalities": ["NM"]}) == []


def test_a_modality_is_a_whole_value_not_a_substring(ctx):
    import_documents([Document("1.9", [{"cui": "C0000030", "pref": "Pneumonia"}], modalities_in_study="OCT\\OP")])
    assert found({"q": "C0000030"}, filter={"modalities": ["CT"]}) == ["1.7"]
    assert found({"q": "C0000030"}, filter={"modalities": ["OCT"]}) == ["1.9"]
    assert found({"q": "C0000030"}, filter={"modalities": ["C"]}) == []
    # LIKE wildcards are plain characters
    assert found({"q": "C0000030"}, filter={"modalities": ["C_"]}) == []
    assert found({"q": "C0000030"}, filter={"modalities": ["%"]}) == []


def test_uid_filters_restrict_to_those_documents(ctx):
    assert found(EVERYTHING, filter={"sopinstanceuid": ["1.1", "1.7", "9.9"]}) == ["1.1", "1.7"]
    assert found(EVERYTHING, filter={"seriesinstanceuid": ["2.1.2"]}) == ["1.2"]
    assert found(EVERYTHING, filter={"studyinstanceuid": "3.1.3,3.1.4"}) == ["1.3", "1.4"]
    assert found(EVERYTHING, filter={"sopinstanceuid": ["1.1", "1.2"], "studyinstanceuid": ["3.1.2"]}) == ["1.2"]


def test_filters_together(ctx):
    query_filter = {"start_date": "2016-12-31", "end_date": "2017-01-03", "modalities": ["CT", "MR"]}
    assert found({"q": "C0000002"}, filter=query_filter) == ["1.1", "1.2", "1.7"]


# --- results ----------------------------------------------------------------------------------------------


def test_one_return_field_gives_strings(ctx):
    assert found({"q": "C0000002"}, returnFields="PatientID") == ["P1", "P2", "P3", "P7"]
    assert found({"q": "C0000002"}, returnFields=["StudyInstanceUID"]) == ["3.1.1", "3.1.2", "3.1.3", "3.1.7"]
    assert found({"q": "C0000002"}, returnFields="ContentDate") == ["20161231", "20170101", "20170102", "20170103"]


def test_several_return_fields_give_objects(ctx):
    assert found({"q": "C0000030"}, returnFields=["SOPInstanceUID", "ContentDate", "ModalitiesInStudy"]) == [
        {"SOPInstanceUID": "1.3", "ContentDate": "20170103", "ModalitiesInStudy": "CR\\DX"},
        {"SOPInstanceUID": "1.7", "ContentDate": "20161231", "ModalitiesInStudy": "CT"},
    ]


def test_results_are_distinct_in_a_stable_order(ctx):
    assert found(EVERYTHING, returnFields="SOPClassUID") == ["1.2.840.10008.5.1.4.1.1.88.11"]
    assert found(EVERYTHING, returnFields="ModalitiesInStudy") == ["CR\\DX", "CT", "CT\\PT", "CT\\SR", "MR", "US", None]
    assert found(EVERYTHING, returnFields=["ContentDate", "SOPInstanceUID"]) == [
        {"ContentDate": "20161231", "SOPInstanceUID": "1.7"},
        {"ContentDate": "20170101", "SOPInstanceUID": "1.1"},
        {"ContentDate": "20170102", "SOPInstanceUID": "1.2"},
        {"ContentDate": "20170103", "SOPInstanceUID": "1.3"},
        {"ContentDate": "20170104", "SOPInstanceUID": "1.4"},
        {"ContentDate": "20170201", "SOPInstanceUID": "1.8"},
        {"ContentDate": "20180601", "SOPInstanceUID": "1.5"},
        {"ContentDate": None, "SOPInstanceUID": "1.6"},
    ]
    # a document matched by several items and terms comes once
    assert found({"q": "C0000002,C0000030,Chest wall"}, {"q": "C0000001,pneumonia"}) == ["1.1", "1.2", "1.3", "1.7"]
    assert found({"q": "C0000002,C0000030"}, returnFields=["SOPClassUID", "PatientID"]) == [
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11", "PatientID": patient} for patient in ("P1", "P2", "P3", "P7")
    ]


def test_the_single_term_of_a_path(ctx):
    assert search_annotations(single_term_query("C0000004")).all() == ["1.2", "1.3"]
    assert search_annotations(single_term_query("C0000004,-pneumonia")).all() == ["1.2"]


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, named",
    [
        ({"terms": [{"q": "C0000002", "negate": "Negated"}]}, "terms[0].negate"),
        ({"terms": [{"q": "C0000002", "negation": "Maybe"}]}, "terms[0].negation: 'Maybe' is not one of"),
        ({"terms": [{"q": "C0000002", "experiencer": "Family"}]}, "terms[0].experiencer: 'Family'"),
        ({"terms": [{"q": "C0000002", "temporality": ["Recent", "future"]}]}, "terms[0].temporality: 'future'"),
        ({"terms": [{"q": "a"}, {"q": "C0000002", "qdepth": -1}]}, "terms[1].qdepth"),
        ({"terms": [{"q": "C0000002", "qdepth": "2"}]}, "terms[0].qdepth"),
        ({"terms": [{"q": "C0000002", "qdepth": 1.5}]}, "terms[0].qdepth"),
        ({"terms": [{"q": "C0000002", "qstop": ["C0000004", "rib"]}]}, "terms[0].qstop: not CUIs: rib"),
        ({"terms": [{"q": "C0000002", "qonlysty": "yes"}]}, "terms[0].qonlysty"),
        ({"terms": [{"q": ""}]}, "terms[0].q"),
        ({"terms": [{"q": 5}]}, "terms[0].q"),
        ({"terms": [{"qdepth": 1}]}, "terms[0].q: Missing data"),
        ({"terms": []}, "terms"),
        ({"filter": {}}, "terms: Missing data"),
        ({"terms": [{"q": "a"}], "filter": {"start_date": "2017-13-01"}}, "filter.start_date"),
        ({"terms": [{"q": "a"}], "filter": {"end_date": "20170101"}}, "filter.end_date"),
        ({"terms": [{"q": "a"}], "filter": {"start_date": "2017-02-01", "end_date": "2017-01-01"}},
         "start_date is after end_date"),
        ({"terms": [{"q": "a"}], "filter": {"modality": ["CT"]}}, "filter.modality"),
        ({"terms": [{"q": "a"}], "returnFields": ["SOPInstanceUID", "Name"]}, "returnFields: 'Name'"),
        ({"terms": [{"q": "a"}], "filters": {}}, "filters"),
    ],
)
def test_a_bad_query_is_refused_with_a_message_naming_the_bad_key_or_value(query, named):
    with pytest.raises(InvalidValue) as raised:
        parse_query(query)
    assert named in raised.value.message


def test_a_query_that_is_not_an_object_is_refused():
    with pytest.raises(InvalidValue, match="JSON object"):
        parse_query([{"q": "C0000002"}])


# --- size and safety ---------------------------------------------------------------------------------------


def test_thousands_of_cuis_from_a_mapping(ctx, tmp_path):
    cuis = [f"C1{number:06d}" for number in range(5_000)] + ["C0000030"]
    (tmp_path / "big.json").write_text(json.dumps({"many": cuis}), encoding="utf-8")
    load_mappings(tmp_path)
    assert found({"q": "big"}) == ["1.3", "1.7"]
    assert found({"q": "C0000002"}, {"q": "-big"}) == ["1.1", "1.2"]


def test_thousands_of_cuis_from_an_expansion(ctx):
    children = [f"C2{number:06d}" for number in range(5_000)]
    with write_engine().begin() as connection:
        connection.execute(concepts.insert(), [{"cui": cui, "pref": cui} for cui in ["C0000040", *children]])
        connection.execute(concept_types.insert(), [
            {"cui": cui, "sty": "Anat", "tui": None, "semantic_group": "ANAT"} for cui in ["C0000040", *children]
        ])
        connection.execute(concept_relations.insert(), [{"parent_cui": "C0000040", "child_cui": cui} for cui in children])
        # a second level below all of them
        connection.execute(concept_relations.insert(), [{"parent_cui": cui, "child_cui": "C0000005"} for cui in children])
    import_documents([Document("1.9", [{"cui": children[-1], "pref": "Last child"}])])
    assert found({"q": "C0000040"}) == ["1.3", "1.9"]
    assert found({"q": "C0000040", "qdepth": 1}) == ["1.9"]
    assert found({"q": "C0000040", "qstop": children[:1_000]}) == ["1.3", "1.9"]


@pytest.mark.parametrize(
    "term, query_filter",
    [
        ({"q": "x' OR '1'='1"}, {}),
        ({"q": "Pneumonia' AND 1=1 --"}, {}),  # as words: pneumonia and "1 1", in no name
        ({"q": "C0000002'); DELETE FROM documents; --"}, {}),
        (EVERYTHING, {"modalities": ["CT' OR '1'='1"]}),
        (EVERYTHING, {"sopinstanceuid": ["1.1' OR '1'='1", "') OR 1=1 --"]}),
        (EVERYTHING, {"studyinstanceuid": ['"]', "[", "null"]}),
    ],
)
def test_sql_in_values_is_only_text(ctx, term, query_filter):
    assert found(term, filter=query_filter) == []
    assert db.session.execute(select(func.count()).select_from(documents)).scalar_one() == 8


def test_sql_in_a_full_text_query_is_only_text(ctx):
    # were the quotes taken as syntax, "lung" OR "fracture" would find 1.1, 1.2, 1.3 and 1.8
    assert found_text({"q": 'lung" OR "fracture'}) == []
    assert found_text({"q": "pneumonia'; DROP TABLE documents; --"}) == []
    assert found_text({"q": "NEAR(chest wall)"}) == []
    assert db.session.execute(select(func.count()).select_from(documents)).scalar_one() == 8


# --- full text -----------------------------------------------------------------------------------------------


def test_full_text_finds_words_by_their_stem_in_any_case(ctx):
    assert found_text({"q": "fractures"}) == ["1.1", "1.2", "1.3"]
    assert found_text({"q": "FRACTURE"}) == ["1.1", "1.2", "1.3"]
    # ruled-out annotations do not matter to the text
    assert found_text({"q": "pneumonia"}) == ["1.3", "1.6", "1.7"]
    assert found_text({"q": "tumour"}) == []


def test_full_text_items_are_ored_and_the_words_of_an_item_anded(ctx):
    assert found_text({"q": "apex,opacity"}) == ["1.5", "1.8"]
    assert found_text({"q": ["apex", "ground glass"]}) == ["1.5", "1.8"]
    assert found_text({"q": "chest wall"}) == ["1.1", "1.7"]
    assert found_text({"q": "chest"}) == ["1.1", "1.4", "1.7"]


def test_full_text_terms_are_anded_and_minus_excludes(ctx):
    assert found_text({"q": "pneumonia"}, {"q": "chest"}) == ["1.7"]
    assert found_text({"q": "pneumonia"}, {"q": "-history"}) == ["1.3", "1.7"]
    assert found_text({"q": "pneumonia,-history"}) == ["1.3", "1.7"]
    assert found_text({"q": "pneumonia"}, {"q": "-history,rib"}) == ["1.7"]


def test_full_text_terms_and_exclusions_together(ctx):
    assert found_text({"q": "chest"}, {"q": "wall"}, {"q": "-pneumonia"}) == ["1.1"]
    assert found_text({"q": "chest,lung"}, {"q": "-pain"}, {"q": "-ground glass"}) == ["1.1", "1.5", "1.7"]


def test_full_text_with_filters_and_return_fields(ctx):
    assert found_text({"q": "fracture"}, filter={"modalities": "CT"}) == ["1.1"]
    assert found_text({"q": "fracture"}, filter={"end_date": "2017-01-02"}) == ["1.1", "1.2"]
    assert found_text({"q": "fracture"}, filter={"sopinstanceuid": ["1.2", "1.3"]}) == ["1.2", "1.3"]
    assert found_text({"q": "lung"}, returnFields=["PatientID", "ContentDate"]) == [
        {"PatientID": "P5", "ContentDate": "20180601"},
        {"PatientID": "P8", "ContentDate": "20170201"},
    ]


@pytest.mark.store_independent
def test_a_full_text_query_without_words_is_refused(ctx):
    for q in ("!!!", "...,--", ["?", "chest"]):
        assert "without any word" in refused({"terms": [{"q": q}]}, search_documents)
