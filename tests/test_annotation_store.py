"""The annotation store, the folder import and mappings, on both stores."""
import datetime
import json
import re
import shutil

import pytest
from sqlalchemy import func, inspect, select

from gateway.annotations import store
from gateway.annotations.importer import import_folder
from gateway.annotations.mappings import get_mapping, load_mappings, mapping_names, parse_mapping
from gateway.annotations.query import parse_query, search_annotations, search_documents
from gateway.annotations.store import (
    Document,
    delete_document,
    doc_detail,
    document_uids,
    import_documents,
    linked_instances,
)
from gateway.db import db
from gateway.errors import InvalidValue, ObjectNotFound
from gateway.models import annotation_prefs, annotations, documents, instances
from tests.conftest import ANNOTATION_FIXTURES, PROJECT_ROOT, instance

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the shared data folder ../shared/data is absent (looked in {SHARED_DATA})"
)


def count(table):
    return db.session.execute(select(func.count()).select_from(table)).scalar_one()


def annotation(cui, pref, **qualifiers):
    return {"cui": cui, "pref": pref, "str": pref.lower(), "start": 0, "end": len(pref), **qualifiers}


def write_json(path, value):
    path.write_text(json.dumps(value), encoding="utf-8")


def search(*terms, **query):
    return search_annotations(parse_query({"terms": list(terms), **query})).all()


# --- import ------------------------------------------------------------------------------------------


def _index_names():
    return {index["name"] for table in ("documents", "annotations") for index in inspect(db.engine).get_indexes(table)}


def test_a_bulk_load_builds_its_indexes_at_the_end_and_a_crashed_one_is_mended(app, monkeypatch):
    deferred = {"ix_annotations_concept", "ix_documents_search", "ix_documents_content_date"}
    with app.app_context():
        assert deferred <= _index_names()
        monkeypatch.setattr(store, "BULK_LOAD_MINIMUM", 5)
        seen_during_the_load = []
        real_import = store.import_documents

        def watching_import(*arguments):
            seen_during_the_load.append(_index_names())
            return real_import(*arguments)

        monkeypatch.setattr("gateway.annotations.importer.import_documents", watching_import)
        summary = import_folder(ANNOTATION_FIXTURES / "nlp", ANNOTATION_FIXTURES / "text", ANNOTATION_FIXTURES / "meta")
        assert summary.imported == 8
        assert seen_during_the_load and not deferred & seen_during_the_load[0]  # into an empty store: a bulk load
        assert deferred <= _index_names()
        assert search({"q": "C0000030"}) == ["1.3", "1.7"]

        # 8 more documents into a store of 8 is not a bulk load; an index that a crash left out comes back
        db.session.execute(db.text("DROP INDEX ix_annotations_concept"))
        db.session.commit()
        seen_during_the_load.clear()
        import_folder(ANNOTATION_FIXTURES / "nlp", ANNOTATION_FIXTURES / "text", ANNOTATION_FIXTURES / "meta")
        assert deferred <= seen_during_the_load[0]
        assert deferred <= _index_names()


def test_a_second_import_replaces_every_document(annotated):
    with annotated.app_context():
        assert (count(documents), count(annotations)) == (8, 11)
        calls = []
        summary = import_folder(
            ANNOTATION_FIXTURES / "nlp", ANNOTATION_FIXTURES / "text", ANNOTATION_FIXTURES / "meta",
            batch_size=3, progress=calls.append,
        )
        assert (summary.imported, summary.replaced, summary.skipped) == (0, 8, [])
        assert calls == [3, 3, 2]
        assert (count(documents), count(annotations)) == (8, 11)
        assert document_uids() == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8"]


def test_batches_read_at_once_are_written_in_file_order(app, tmp_path, monkeypatch):
    monkeypatch.setattr("gateway.annotations.importer._READERS", 3)
    monkeypatch.setattr("gateway.annotations.importer._BATCHES_AHEAD", 4)
    for number in range(6):  # one SOPInstanceUID in every file: each file replaces the one before it
        nlp = {"SOPInstanceUID": "7.7", "PatientID": f"P{number}", "annotations": [annotation("C0000030", "Pneumonia")]}
        write_json(tmp_path / f"report{number}.json", nlp)
    with app.app_context():
        summary = import_folder(tmp_path, batch_size=1)
        assert (summary.imported, summary.replaced, summary.skipped) == (1, 5, [])
        assert doc_detail("7.7")["anns"]["PatientID"] == "P5"


def test_a_document_twice_in_one_batch_is_stored_once_and_counted_as_replaced(app):
    with app.app_context():
        first = Document("9.1", [annotation("C0000030", "Pneumonia")])
        second = Document("9.1", [annotation("C0000002", "Chest wall")], patient_id="P9")
        assert import_documents([first, second]) == (1, 1)
        detail = doc_detail("9.1")["anns"]
        assert detail["PatientID"] == "P9"
        assert [item["cui"] for item in detail["annotations"]] == ["C0000002"]


def test_without_metadata_the_sop_instance_uid_is_the_file_stem(app, tmp_path):
    for stem in ("doc1", "doc2"):
        shutil.copy(ANNOTATION_FIXTURES / "nlp" / f"{stem}.json", tmp_path / f"{stem}.json")
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    shutil.copy(ANNOTATION_FIXTURES / "meta" / "doc1.json", meta_dir / "doc1.json")
    with app.app_context():
        summary = import_folder(tmp_path, meta_dir=meta_dir)
        assert (summary.imported, summary.skipped) == (2, [])
        assert document_uids() == ["1.1", "doc2"]
        detail = doc_detail("doc2")
        assert detail["content"] is None
        assert {key: detail["anns"][key] for key in ("SeriesInstanceUID", "ContentDate", "ModalitiesInStudy")} == {
            "SeriesInstanceUID": None, "ContentDate": None, "ModalitiesInStudy": None,
        }


def test_metadata_keys_at_the_top_level_of_the_nlp_file(app, tmp_path):
    nlp_dir, meta_dir = tmp_path / "nlp", tmp_path / "meta"
    nlp_dir.mkdir()
    meta_dir.mkdir()
    top_level = {"SOPInstanceUID": "5.5.5", "PatientID": "TOP", "ContentDate": "2019.03.04", "ModalitiesInStudy": "MR"}
    write_json(nlp_dir / "alone.json", {"annotations": [annotation("C0000030", "Pneumonia")], **top_level})
    # a meta file wins over the NLP file's own keys, which fill in what it lacks
    write_json(nlp_dir / "both.json", {"annotations": [], **top_level, "SOPInstanceUID": "6.6.6"})
    write_json(meta_dir / "both.json", {"PatientID": "META", "ContentDate": "20200102"})
    with app.app_context():
        assert import_folder(nlp_dir, meta_dir=meta_dir).skipped == []
        alone = doc_detail("5.5.5")["anns"]
        assert (alone["PatientID"], alone["ContentDate"], alone["ModalitiesInStudy"]) == ("TOP", "20190304", "MR")
        both = doc_detail("6.6.6")["anns"]
        assert (both["PatientID"], both["ContentDate"], both["ModalitiesInStudy"]) == ("META", "20200102", "MR")


def test_bad_files_are_skipped_with_their_reason_and_the_rest_imported(app, tmp_path):
    nlp_dir, text_dir, meta_dir = tmp_path / "nlp", tmp_path / "text", tmp_path / "meta"
    for folder in (nlp_dir, text_dir, meta_dir):
        folder.mkdir()
    good = [annotation("C0000030", "Pneumonia"), annotation("C0000002", "Chest wall", negation="negated")]
    for stem in ("a_good", "b_bad_annotation", "c_bad_date", "d_missing_text", "e_long_qualifier", "z_good"):
        write_json(nlp_dir / f"{stem}.json", {"annotations": good})
        write_json(meta_dir / f"{stem}.json", {"SOPInstanceUID": f"uid-{stem}", "ContentDate": "20170101"})
        if stem != "d_missing_text":
            (text_dir / f"{stem}.txt").write_text("Pneumonia. Chest wall normal.", encoding="utf-8")
    # the bad part comes after good ones, so a half-written document would show
    write_json(nlp_dir / "b_bad_annotation.json", {"annotations": good + [{"pref": "Rib", "str": "rib"}]})
    write_json(meta_dir / "c_bad_date.json", {"SOPInstanceUID": "uid-c", "ContentDate": "20171301"})
    write_json(nlp_dir / "e_long_qualifier.json",
               {"annotations": good + [annotation("C0000004", "Rib", temporality="x" * 40)]})
    (nlp_dir / "f_not_json.json").write_text('{"annotations": [', encoding="utf-8")
    write_json(nlp_dir / "g_no_annotations.json", {"SOPInstanceUID": "1.2.3"})
    write_json(nlp_dir / "h_not_an_object.json", [good])
    # values that one of the stores cannot keep (PostgreSQL: NUL; both: lone surrogates)
    write_json(nlp_dir / "i_nul_in_annotation.json", {"annotations": [annotation("C0000030", "Pneu\x00monia")]})
    write_json(nlp_dir / "j_surrogate_in_metadata.json", {"annotations": good, "PatientID": "P\ud800"})
    write_json(nlp_dir / "k_nul_in_text.json", {"annotations": good})
    (text_dir / "k_nul_in_text.txt").write_text("Pneumonia\x00", encoding="utf-8")
    for stem in ("f_not_json", "g_no_annotations", "h_not_an_object", "i_nul_in_annotation", "j_surrogate_in_metadata"):
        (text_dir / f"{stem}.txt").write_text("x", encoding="utf-8")
    with app.app_context():
        summary = import_folder(nlp_dir, text_dir, meta_dir)
        assert (summary.imported, summary.replaced) == (2, 0)
        reasons = dict(summary.skipped)
        assert set(reasons) == {
            "b_bad_annotation.json", "c_bad_date.json", "d_missing_text.json", "e_long_qualifier.json",
            "f_not_json.json", "g_no_annotations.json", "h_not_an_object.json", "i_nul_in_annotation.json",
            "j_surrogate_in_metadata.json", "k_nul_in_text.json",
        }
        assert reasons["b_bad_annotation.json"] == "annotation 2 has no 'cui'"
        assert reasons["c_bad_date.json"] == "ContentDate '20171301' is not a DICOM date (YYYYMMDD)"
        assert reasons["d_missing_text.json"] == "no d_missing_text.txt in the text folder"
        assert reasons["e_long_qualifier.json"] == "annotation 2: 'temporality' is longer than 16 characters"
        assert reasons["f_not_json.json"].startswith("f_not_json.json is not JSON: ")
        assert reasons["g_no_annotations.json"] == "no 'annotations': not an NLP result"
        assert reasons["h_not_an_object.json"] == "not a JSON object"
        assert reasons["i_nul_in_annotation.json"] == "annotation 0: 'pref' holds a NUL character"
        assert reasons["j_surrogate_in_metadata.json"] == "PatientID is not valid Unicode (a lone surrogate)"
        assert reasons["k_nul_in_text.json"] == "k_nul_in_text.txt holds a NUL character"
        # nothing of a skipped file was written
        assert document_uids() == ["uid-a_good", "uid-z_good"]
        assert count(annotations) == 4
        assert sorted(db.session.execute(select(annotation_prefs.c.pref_key)).scalars()) == ["chest wall", "pneumonia"]
        detail = doc_detail("uid-a_good")["anns"]
        # qualifiers are stored in SemEHR's spelling, whatever the case of the file
        assert [item["negation"] for item in detail["annotations"]] == [None, "Negated"]


@pytest.mark.store_independent
def test_a_missing_folder_is_refused_before_anything_is_read(app, tmp_path):
    with app.app_context(), pytest.raises(ValueError, match="is not a folder"):
        import_folder(ANNOTATION_FIXTURES / "nlp", text_dir=tmp_path / "nowhere")


# --- reading documents -------------------------------------------------------------------------------


def test_doc_detail_gives_metadata_annotations_and_text(annotated):
    with annotated.app_context():
        assert doc_detail("1.1") == {
            "anns": {
                "SOPInstanceUID": "1.1",
                "SeriesInstanceUID": "2.1.1",
                "StudyInstanceUID": "3.1.1",
                "PatientID": "P1",
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11",
                "ContentDate": "20170101",
                "ModalitiesInStudy": "CT\\SR",
                "annotations": [
                    {"start": 0, "end": 4, "str": "chest wall", "cui": "C0000002", "pref": "Chest wall", "sty": "T",
                     "negation": "Affirmed", "experiencer": "Patient", "temporality": "Recent"},
                ],
                "phenotypes": [{"minor_type": "x"}],
                "sentences": [{"start": 0, "end": 38}],
            },
            "content": "The chest wall is intact. No fracture.",
        }


def test_doc_detail_hides_ruled_out_annotations(annotated):
    with annotated.app_context():
        detail = doc_detail("1.6")
        assert [item["pref"] for item in detail["anns"]["annotations"]] == ["Cycle B"]
        assert detail["anns"]["ContentDate"] is None
        assert detail["content"] == "Pneumonia mentioned in history only."


def test_doc_detail_with_only_cuis_keeps_those_and_names_their_term(annotated):
    with annotated.app_context():
        detail = doc_detail("1.7", only_cuis={"C0000030": "pneumonia", "C0000004": "rib"})
        assert [(item["cui"], item["mapped"]) for item in detail["anns"]["annotations"]] == [("C0000030", "pneumonia")]
        assert doc_detail("1.6", only_cuis={"C0000030": "pneumonia"})["anns"]["annotations"] == []


def test_doc_detail_of_an_unknown_document(annotated):
    with annotated.app_context(), pytest.raises(ObjectNotFound, match="no document '9.9'"):
        doc_detail("9.9")


def test_document_uids_are_paged_in_uid_order(annotated):
    with annotated.app_context():
        assert document_uids(0, 3) == ["1.1", "1.2", "1.3"]
        assert document_uids(3, 3) == ["1.4", "1.5", "1.6"]
        assert document_uids(6, 3) == ["1.7", "1.8"]
        assert document_uids(8, 3) == []
        for offset, limit in ((-1, 10), (0, 0), (0, 10_001)):
            with pytest.raises(InvalidValue):
                document_uids(offset, limit)


def test_delete_document_removes_it_everywhere(annotated):
    with annotated.app_context():
        delete_document("1.3")
        with pytest.raises(ObjectNotFound):
            doc_detail("1.3")
        assert (count(documents), count(annotations)) == (7, 9)
        assert search({"q": "C0000030"}) == ["1.7"]
        # the full-text index forgets the text too
        assert search_documents(parse_query({"terms": [{"q": "pneumonia"}]})).all() == ["1.6", "1.7"]
        with pytest.raises(ObjectNotFound):
            delete_document("1.3")


def test_a_document_is_linked_to_the_archive_instance_with_its_sop_instance_uid(api, seeded):
    data = instance(7, patient="PAT-7")
    assert api.upload(data).status_code == 200
    sop_uid = "1.2.826.0.1.3680043.8.498.99.7.1.1.7"
    with seeded.app_context():
        import_documents([Document(sop_uid, [annotation("C0000030", "Pneumonia")])])
        import_documents([Document("1.2.3.4.5", [])])
        stored = db.session.execute(select(instances.c.archive_id, instances.c.id)).all()
        assert len(stored) == 1
        assert linked_instances(sop_uid) == stored
        assert linked_instances("1.2.3.4.5") == []


@needs_shared_data
def test_the_mtsamples_reports_import_with_generated_annotations(app, tmp_path):
    mtsamples = SHARED_DATA / "mtsamples"
    word = re.compile(r"\bchest\b", re.IGNORECASE)
    with_chest = set()
    for text_path in sorted((mtsamples / "docs").glob("*.txt")):
        match = word.search(text_path.read_text(encoding="utf-8"))
        found = [] if match is None else [
            {"start": match.start(), "end": match.end(), "str": match.group(), "cui": "C0000001", "pref": "Chest",
             "sty": "Body Location or Region", "negation": "Affirmed", "experiencer": "Patient",
             "temporality": "Recent", "ruled_by": []}
        ]
        write_json(tmp_path / f"{text_path.stem}.json", {"annotations": found, "phenotypes": [], "sentences": []})
        if found:
            with_chest.add(text_path.stem)
    with app.app_context():
        summary = import_folder(tmp_path, mtsamples / "docs", mtsamples / "meta", batch_size=1000)
        assert (summary.imported, summary.replaced, summary.skipped) == (4999, 0, [])
        assert count(documents) == 4999
        # the metadata's SOPInstanceUID is taken as given, even where it is no UID
        first = doc_detail("2.25.00001")
        assert first["anns"]["ContentDate"] == "20140613"
        assert first["anns"]["ModalitiesInStudy"] == "CT\\SR"
        assert first["content"].startswith("SUBJECTIVE:")
        assert doc_detail("doc0397.txt")["content"] == (mtsamples / "docs" / "doc0397.txt").read_text(encoding="utf-8")
        found = search({"q": "C0000001"}, returnFields=["SOPInstanceUID"])
        expected = {json.loads((mtsamples / "meta" / f"{stem}.json").read_text())["SOPInstanceUID"] for stem in with_chest}
        assert len(found) == len(set(found)) == len(expected) == 1298
        assert set(found) == expected


# --- mappings ----------------------------------------------------------------------------------------


def test_a_mapping_entry_may_carry_the_preferred_name_and_type():
    data = {"pneumonia": ["C0000030\tPneumonia\tDisease or Syndrome", "C0000030"], "rib": ["c0000004"]}
    assert parse_mapping(data, "m.json") == {"pneumonia": ["C0000030"], "rib": ["C0000004"]}
    for bad in ([], {"rib": "C0000004"}, {"rib": [4]}, {"rib": [" "]}):
        with pytest.raises(ValueError, match="m.json"):
            parse_mapping(bad, "m.json")


@pytest.mark.parametrize(
    "data, reason",
    [
        ({"rib": ["HP:0000001"]}, "m.json: term 'rib': 'HP:0000001' is not a CUI"),
        ({"rib": ["C" + "1" * 20]}, "is not a CUI"),
        ({"r" * 201: ["C0000004"]}, "m.json: term 'rrrr"),
    ],
)
def test_a_mapping_entry_that_the_store_cannot_keep_is_refused(app, tmp_path, data, reason):
    write_json(tmp_path / "m.json", data)
    with app.app_context():
        with pytest.raises(ValueError) as raised:
            load_mappings(tmp_path)
        assert reason in str(raised.value)
        assert mapping_names() == []


def test_load_mappings_names_each_by_its_stem(app, tmp_path):
    write_json(tmp_path / "chest findings.json", {"chest wall": ["C0000002"], "rib": ["C0000004", "C0000005"]})
    with app.app_context():
        assert load_mappings(ANNOTATION_FIXTURES.parent / "mappings") == {"chest": 3}
        assert load_mappings(tmp_path) == {"chest findings": 2}
        assert mapping_names() == ["chest", "chest findings"]
        assert get_mapping("chest findings") == {"chest wall": ["C0000002"], "rib": ["C0000004", "C0000005"]}
        # loading again replaces the mapping of that name
        write_json(tmp_path / "chest findings.json", {"rib": ["C0000004"]})
        assert load_mappings(tmp_path) == {"chest findings": 1}
        assert get_mapping("chest findings") == {"rib": ["C0000004"]}
        assert get_mapping("nothing") is None


def test_one_bad_mapping_file_stores_none(app, tmp_path):
    write_json(tmp_path / "a.json", {"rib": ["C0000004"]})
    (tmp_path / "b.json").write_text("{", encoding="utf-8")
    with app.app_context():
        with pytest.raises(ValueError, match="b.json is not JSON"):
            load_mappings(tmp_path)
        assert mapping_names() == []
        with pytest.raises(ValueError, match="no mapping files"):
            load_mappings(tmp_path / "missing")
        (tmp_path / "b.json").write_text("[" * 100_000, encoding="utf-8")
        with pytest.raises(ValueError, match="b.json is nested too deeply"):
            load_mappings(tmp_path)


def test_mapping_files_of_the_mappings_folder_are_seen_without_a_load(app, tmp_path):
    app.config["MAPPINGS_DIR"] = str(tmp_path)
    write_json(tmp_path / "eye terms.json", {"retina": ["C0035298"]})
    (tmp_path / "broken.json").write_text("[", encoding="utf-8")
    with app.app_context():
        assert mapping_names() == ["broken", "eye terms"]
        assert get_mapping("eye terms") == {"retina": ["C0035298"]}
        assert get_mapping("broken") is None
        write_json(tmp_path / "late.json", {"rib": ["C0000004"]})
        assert get_mapping("late") == {"rib": ["C0000004"]}
        # a stored mapping of the same name wins over the file
        stored = tmp_path / "stored"
        stored.mkdir()
        write_json(stored / "eye terms.json", {"cornea": ["C0010031"]})
        load_mappings(stored)
        assert get_mapping("eye terms") == {"cornea": ["C0010031"]}


@needs_shared_data
def test_the_shared_mapping_files_load(app):
    with app.app_context():
        assert load_mappings(SHARED_DATA / "mappings") == {"eye-hpo-umls-mapping": 815, "hpo-umls-mapping": 11618}
        assert get_mapping("hpo-umls-mapping")["HP:0000007"] == ["C0441748", "C4020899"]
        assert get_mapping("eye-hpo-umls-mapping")["HP:0001489"] == ["C0423361"]


def test_content_dates_are_stored_as_dates(annotated):
    with annotated.app_context():
        stored = db.session.execute(select(documents.c.content_date).where(documents.c.sop_instance_uid == "1.5"))
        assert stored.scalar_one() == datetime.date(2018, 6, 1)
