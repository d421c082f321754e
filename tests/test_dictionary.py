"""The concept dictionary loaders (UMLS RRF files, SemEHR CSV files, the built-in sample) and
`gateway concepts load`, against both stores."""
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.annotations.dictionary import (
    SAMPLE_DIRECTORY,
    DictionarySummary,
    dictionary_summary,
    load_sample,
    load_semehr_csv,
    load_umls,
    semantic_groups,
)
from gateway.db import db
from gateway.models import concept_relations, concept_snomed, concept_synonyms, concept_types, concepts

FIXTURES = Path(__file__).resolve().parent / "fixtures"
UMLS_DIR = FIXTURES / "umls"
SEMEHR_DIR = FIXTURES / "semehr_csv"

ANAT, DISO = "ANAT", "DISO"
BODY_PART, BODY_REGION = "Body Part, Organ, or Organ Component", "Body Location or Region"

# What tests/fixtures/umls holds: C9000001 names itself in several rows (the ENG P/PF/Y one wins),
# C9000002 has no preferred English row (its first English one is taken), C9000003 only a German name.
UMLS_CONCEPTS = {
    ("C9000001", "Chest wall"),
    ("C9000002", "Rib cage"),
    ("C9000004", "Rib fracture"),
    ("C9000005", "Heart"),
    ("C9000006", "Heart disease"),
    ("C9000007", "Heart Ventricles"),
    ("C9000008", "Cardiomyopathy"),
}
UMLS_TYPES = {  # C9000003 and C9000009 have no English name, so no types
    ("C9000001", "T029", BODY_REGION, ANAT),
    ("C9000002", "T023", BODY_PART, ANAT),
    ("C9000004", "T037", "Injury or Poisoning", DISO),
    ("C9000005", "T023", BODY_PART, ANAT),
    ("C9000006", "T047", "Disease or Syndrome", DISO),
    ("C9000006", "T033", "Finding", DISO),
    ("C9000007", "T023", BODY_PART, ANAT),
    ("C9000008", "T047", "Disease or Syndrome", DISO),
}
# RN and CHD rows of MTH and SNOMEDCT_US; RB, PAR, RO, a self relation and the MSH rows left out; the
# cycle C9000006 <-> C9000008 kept; C9000001 -> C9000002 comes from both sources and is stored once.
UMLS_RELATIONS = {
    ("C9000001", "C9000002"),
    ("C9000002", "C9000004"),
    ("C9000001", "C9000005"),
    ("C9000005", "C9000006"),
    ("C9000006", "C9000008"),
    ("C9000008", "C9000006"),
    ("C9000005", "C9000003"),
}
UMLS_MSH_RELATIONS = {("C9000005", "C9000007"), ("C9000006", "C9000004")}
# Obsolete (O) and editor-suppressed (E) SNOMED CT atoms left out, suppressible (Y) ones kept.
# The other English names of atoms that are not suppressed: "Thoracic wall" by its MSH atom (its SNOMED CT atom
# is suppressible), not "Fracture of rib" (obsolete) nor "Thorax cage" (editor-suppressed)
UMLS_SYNONYMS = {
    ("C9000001", "Thoracic wall"),
    ("C9000001", "Chest wall structure"),
    ("C9000002", "Thoracic cage"),
    ("C9000005", "Entire heart"),
}
UMLS_SNOMED = {
    ("78904004", "C9000001"),
    ("8050005", "C9000002"),
    ("80891009", "C9000005"),
    ("302509004", "C9000005"),
}

SEMEHR_CONCEPTS = {  # C9999999 has no label: no English name
    ("C0018787", "Heart"),
    ("C0018799", "Heart Diseases"),
    ("C0035522", "Rib Fractures"),
    ("C0205076", "Chest wall"),
    ("C0222762", "Thoracic cage structure"),
}
SEMEHR_TYPES = {
    ("C0018787", "T023", BODY_PART, ANAT),
    ("C0018799", "T047", "Disease or Syndrome", DISO),
    ("C0018799", "T033", "Finding", DISO),
    ("C0035522", "T037", "Injury or Poisoning", DISO),
    ("C0205076", "T029", BODY_REGION, ANAT),
    ("C0222762", "T023", BODY_PART, ANAT),
}
SEMEHR_RELATIONS = {  # the RB row and the self relation left out
    ("C0018787", "C0018799"),
    ("C0205076", "C0222762"),
    ("C0205076", "C0018787"),
    ("C0222762", "C0035522"),
    ("C9999999", "C0018799"),
}
SEMEHR_SNOMED = {
    ("33737001", "C0035522"),
    ("56265001", "C0018799"),
    ("78904004", "C0205076"),
    ("80891009", "C0018787"),
}


def dictionary_rows():
    """Every row of the dictionary tables, a set of tuples per table."""
    queries = {
        "concepts": select(concepts.c.cui, concepts.c.pref),
        "types": select(concept_types.c.cui, concept_types.c.tui, concept_types.c.sty, concept_types.c.semantic_group),
        "relations": select(concept_relations.c.parent_cui, concept_relations.c.child_cui),
        "snomed": select(concept_snomed.c.snomed_id, concept_snomed.c.cui),
        "synonyms": select(concept_synonyms.c.cui, concept_synonyms.c.name),
    }
    return {name: set(map(tuple, db.session.execute(query))) for name, query in queries.items()}


def expected(concept_rows, type_rows, relation_rows, snomed_rows, synonym_rows=frozenset()):
    return {"concepts": concept_rows, "types": type_rows, "relations": relation_rows, "snomed": snomed_rows,
            "synonyms": synonym_rows}


UMLS_DICTIONARY = expected(UMLS_CONCEPTS, UMLS_TYPES, UMLS_RELATIONS, UMLS_SNOMED, UMLS_SYNONYMS)
SEMEHR_DICTIONARY = expected(SEMEHR_CONCEPTS, SEMEHR_TYPES, SEMEHR_RELATIONS, SEMEHR_SNOMED)  # no synonyms in CSV


def test_the_semantic_groups_table_has_every_semantic_type():
    groups = semantic_groups()
    assert len(groups.group_of_tui) == 127
    assert set(groups.group_of_tui.values()) == {
        "ACTI", "ANAT", "CHEM", "CONC", "DEVI", "DISO", "GENE", "GEOG",
        "LIVB", "OBJC", "OCCU", "ORGA", "PHEN", "PHYS", "PROC",
    }
    assert groups.group_of_tui["T047"] == "DISO" and groups.type_of_tui["T047"] == "Disease or Syndrome"
    assert groups.group_of_tui["T060"] == "PROC"
    assert groups.group_of_type[BODY_PART] == ANAT
    assert groups.group_of_type["Sign or Symptom"] == DISO


def test_umls_files_load_as_they_read(app):
    with app.app_context():
        summary = load_umls(UMLS_DIR)
        assert dictionary_rows() == UMLS_DICTIONARY
        assert summary == DictionarySummary(concepts=7, types=8, relations=7, snomed_ids=4, synonyms=4)


def test_other_sources_add_their_narrower_relations(app):
    with app.app_context():
        load_umls(UMLS_DIR, sources=("MTH", "SNOMEDCT_US", "MSH"))
        assert dictionary_rows()["relations"] == UMLS_RELATIONS | UMLS_MSH_RELATIONS
        load_umls(UMLS_DIR, sources=("MSH",))
        assert dictionary_rows()["relations"] == UMLS_MSH_RELATIONS


def test_semehr_csv_files_load_as_they_read(app):
    with app.app_context():
        summary = load_semehr_csv(SEMEHR_DIR)
        assert dictionary_rows() == SEMEHR_DICTIONARY
        assert summary == DictionarySummary(concepts=5, types=6, relations=5, snomed_ids=4, synonyms=0)


def test_each_load_replaces_the_whole_dictionary(app):
    with app.app_context():
        load_umls(UMLS_DIR)
        load_semehr_csv(SEMEHR_DIR)
        assert dictionary_rows() == SEMEHR_DICTIONARY
        load_umls(UMLS_DIR)
        assert dictionary_rows() == UMLS_DICTIONARY


def test_progress_is_reported_in_bytes_up_to_the_total(app):
    reports = []
    with app.app_context():
        load_semehr_csv(SEMEHR_DIR, progress=lambda done, total: reports.append((done, total)))
    total = sum(path.stat().st_size for path in SEMEHR_DIR.iterdir())
    assert reports[-1] == (total, total)


def broken_copy(tmp_path, source, file_name, edit):
    directory = tmp_path / source.name
    shutil.copytree(source, directory)
    path = directory / file_name
    path.write_bytes(edit(path.read_bytes()))
    return directory


def replace_line(number, text):
    def edit(content):
        lines = content.split(b"\n")
        lines[number - 1] = text
        return b"\n".join(lines)

    return edit


@pytest.mark.parametrize(
    "load, source, file_name, edit, message",
    [
        (load_umls, UMLS_DIR, "MRREL.RRF",
         replace_line(3, b"C9000002|A9000021|SCUI|RB|C9000001|A9000014|SCUI||R9000003||MTH|MTH|||N|"),
         "MRREL.RRF line 3: 15 fields where 16 are expected"),
        (load_umls, UMLS_DIR, "MRREL.RRF",
         replace_line(2, b"C9000002|A9000024|SCUI|CHD|9000004|A9000042|SCUI|isa|R9000002||SNOMEDCT_US|SNOMEDCT_US|0|Y|N|256|"),
         "MRREL.RRF line 2: CUI2 '9000004' is not valid"),
        (load_umls, UMLS_DIR, "MRCONSO.RRF",
         replace_line(12, b"C9000001|GER|P|L9000031|PF|S9000031|Y|A9000031||M9000003|D900003|MSHGER|MH|D900003|Rippe|3|N||"),
         "MRCONSO.RRF line 12: C9000001 after C9000002: the file must be sorted by CUI"),
        (load_umls, UMLS_DIR, "MRCONSO.RRF", lambda content: content.replace(b"\xc3\xa1", b"\xe1"),
         "MRCONSO.RRF line 8: not UTF-8"),
        (load_umls, UMLS_DIR, "MRSTY.RRF", lambda content: content.replace(b"|T037|", b"|T999|"),
         "MRSTY.RRF line 4: semantic type 'T999' is not in the semantic groups table"),
        (load_semehr_csv, SEMEHR_DIR, "rel.csv", replace_line(4, b"C0205076|RN|C0222762,heart"),
         "rel.csv line 4: CUI 'heart' is not valid"),
        (load_semehr_csv, SEMEHR_DIR, "cui.csv", replace_line(3, b"C0018799|T047,T033|DISO"),
         "cui.csv line 3: 3 fields where 4 are expected"),
        (load_semehr_csv, SEMEHR_DIR, "cui.csv", replace_line(4, b"C0035522|T184|DISO|Rib Fractures"),
         "cui.csv line 4: semantic type 'T184' is not in sty.csv"),
        (load_semehr_csv, SEMEHR_DIR, "snomed.csv", replace_line(3, b"33737001x|C0035522"),
         "snomed.csv line 3: SNOMED CT id '33737001x' is not valid"),
        (load_semehr_csv, SEMEHR_DIR, "sty.csv", replace_line(2, b"T023|Anatomy|Anatomy"),
         "sty.csv line 2: semantic group 'Anatomy' is not one of the UMLS semantic groups"),
    ],
)
def test_a_malformed_line_is_reported_and_the_previous_dictionary_stays(app, tmp_path, load, source, file_name,
                                                                       edit, message):
    directory = broken_copy(tmp_path, source, file_name, edit)
    with app.app_context():
        load_sample()
        before = dictionary_rows()
        with pytest.raises(ValueError) as raised:
            load(directory)
        assert str(raised.value) == message
        assert dictionary_rows() == before


@pytest.mark.parametrize("load, missing", [(load_umls, "MRSTY.RRF"), (load_semehr_csv, "snomed.csv")])
def test_a_missing_file_is_reported_before_anything_changes(app, tmp_path, load, missing):
    source = UMLS_DIR if load is load_umls else SEMEHR_DIR
    directory = tmp_path / "dictionary"
    shutil.copytree(source, directory)
    (directory / missing).unlink()
    with app.app_context():
        load_semehr_csv(SEMEHR_DIR)
        with pytest.raises(ValueError, match=f"^no {missing} in {directory}$"):
            load(directory)
        assert dictionary_rows() == SEMEHR_DICTIONARY


def narrower_closure(relations, cui):
    reached, frontier = set(), {cui}
    while frontier:
        frontier = {child for parent, child in relations if parent in frontier} - reached
        reached |= frontier
    return reached


def test_the_sample_is_a_clean_radiology_dictionary(app):
    with app.app_context():
        summary = load_sample()
        rows = dictionary_rows()
    names = dict(rows["concepts"])
    assert summary == DictionarySummary(len(rows["concepts"]), len(rows["types"]), len(rows["relations"]),
                                        len(rows["snomed"]), 0)
    assert summary.concepts >= 300 and summary.relations >= 250 and summary.snomed_ids >= 250
    assert names["C0205076"] == "Chest wall"
    assert ("78904004", "C0205076") in rows["snomed"]
    assert {"C0222762", "C0035561", "C0038293", "C0035522"} <= narrower_closure(rows["relations"], "C0205076")
    assert {"C0035298", "C0010031", "C0022077"} <= narrower_closure(rows["relations"], "C0015392")  # eye
    assert {"C0032285", "C0041327", "C0242379"} <= narrower_closure(rows["relations"], "C0024109")  # lung

    relation_ends = {cui for relation in rows["relations"] for cui in relation}
    assert relation_ends <= set(names)
    assert {cui for _snomed_id, cui in rows["snomed"]} <= set(names)
    assert len({snomed_id for snomed_id, _cui in rows["snomed"]}) == len(rows["snomed"])
    groups = semantic_groups()
    typed = {cui for cui, _tui, _sty, _group in rows["types"]}
    assert typed == set(names)
    for _cui, tui, sty, group in rows["types"]:
        assert (groups.type_of_tui[tui], groups.group_of_tui[tui]) == (sty, group)
    # no cycles: the sample is clean (cycles are tested with the UMLS fixture)
    assert all(cui not in narrower_closure(rows["relations"], cui) for cui in relation_ends)


def test_the_sample_ships_in_the_semehr_csv_format():
    assert sorted(path.name for path in SAMPLE_DIRECTORY.iterdir()) == ["cui.csv", "rel.csv", "snomed.csv", "sty.csv"]


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def run(*args):
        return runner.invoke(args=["concepts", "load", *args])

    return run


@pytest.mark.parametrize(
    "args, dictionary",
    [
        (("--umls-dir", str(UMLS_DIR)), UMLS_DICTIONARY),
        (("--umls-dir", str(UMLS_DIR), "--sources", "MTH, SNOMEDCT_US,MSH"),
         {**UMLS_DICTIONARY, "relations": UMLS_RELATIONS | UMLS_MSH_RELATIONS}),
        (("--semehr-csv-dir", str(SEMEHR_DIR)), SEMEHR_DICTIONARY),
    ],
)
def test_the_load_command_reads_each_source(app, cli, args, dictionary):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert dictionary_rows() == dictionary
        assert f"concept dictionary loaded: {dictionary_summary()}" in result.output


def test_the_load_command_loads_the_sample(app, cli):
    result = cli("--sample")
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert ("C0205076", "Chest wall") in dictionary_rows()["concepts"]
        assert result.output.splitlines()[-1] == f"concept dictionary loaded: {dictionary_summary()}"


@pytest.mark.parametrize(
    "args, reason",
    [
        ((), "give exactly one of --umls-dir, --semehr-csv-dir and --sample"),
        (("--sample", "--umls-dir", str(UMLS_DIR)), "give exactly one of --umls-dir, --semehr-csv-dir and --sample"),
        (("--sample", "--sources", "MTH"), "--sources goes with --umls-dir"),
        (("--umls-dir", str(UMLS_DIR), "--sources", " , "), "--sources names no source"),
        (("--semehr-csv-dir", str(UMLS_DIR)), f"no sty.csv in {UMLS_DIR}"),
    ],
)
def test_the_load_command_refuses_bad_input_with_a_reason(app, cli, args, reason):
    with app.app_context():
        load_sample()
        before = dictionary_rows()
    result = cli(*args)
    assert result.exit_code != 0
    assert f"Error: {reason}" in result.output
    with app.app_context():
        assert dictionary_rows() == before
