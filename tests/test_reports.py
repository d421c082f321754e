"""Reports to searchable annotations inside the gateway (gateway.reports): the text of an uploaded DICOM SR, its
queue, the worker, `gateway annotate`, and deletes, through the archive API and the annotation API."""
import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from click.testing import CliRunner
from flask.cli import ScriptInfo
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    DateContentItem,
    ImageContentItem,
    NumContentItem,
    PnameContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from gateway.annotations.dictionary import load_sample
from gateway.cli import main
from gateway.db import db
from gateway.models import annotations, documents, instances, report_jobs
from gateway.reports import jobs
from gateway.reports.annotating import StoreAnnotator, work_once
from gateway.reports.sr import report_text
from gateway.synthetic import make_instance
from tests.conftest import PASSWORD, PROJECT_ROOT, load_fixture_dictionary

CONTAINS = RelationshipTypeValues.CONTAINS
PATIENT = "PAT-7"
STUDY = "1.2.826.0.1.3680043.8.498.77.1"
IMAGE_SERIES = f"{STUDY}.1"
REPORT_SERIES = f"{STUDY}.9"
REPORT = f"{REPORT_SERIES}.1"
PNEUMONIA = "C0032285"  # in the sample dictionary
FINDINGS = "No evidence of pneumonia. The heart size is normal."


def concept(value, meaning, scheme="DCM"):
    return CodedConcept(value, scheme, meaning)


def image():
    return make_instance(PATIENT, STUDY, IMAGE_SERIES, f"{IMAGE_SERIES}.1")


def report_sr(findings=FINDINGS, sop_uid=REPORT, content_date="20190304", items=()):
    """A Comprehensive SR of the study (made with highdicom, as a reporting system would): a Findings section
    of one TEXT item, and `items` besides."""
    evidence = pydicom.dcmread(io.BytesIO(image()))
    evidence.StudyID, evidence.AccessionNumber, evidence.ReferringPhysicianName = "1", "", ""
    evidence.PatientName = "Doe^Jane"
    section = ContainerContentItem(name=concept("121070", "Findings"), relationship_type=CONTAINS)
    section.ContentSequence = [TextContentItem(name=concept("121071", "Finding"), value=findings,
                                               relationship_type=CONTAINS)]
    root = ContainerContentItem(name=concept("18748-4", "Diagnostic imaging report", "LN"))
    root.ContentSequence = [*items, section]
    sr = hd.sr.ComprehensiveSR(evidence=[evidence], content=root, series_instance_uid=REPORT_SERIES, series_number=9,
                               sop_instance_uid=sop_uid, instance_number=1, manufacturer="tests")
    sr.ContentDate = content_date
    written = io.BytesIO()
    sr.save_as(written)
    return written.getvalue()


@pytest.mark.filterwarnings("ignore:The string")  # highdicom on the synthetic image's one-part name
def test_a_report_is_read_as_text_with_its_headings_and_every_kind_of_value():
    items = [
        TextContentItem(name=concept("121060", "History"), value="<p>Cough&nbsp;for <b>two</b> weeks.<style>p {}</style></p>",
                        relationship_type=CONTAINS),
        CodeContentItem(name=concept("121071", "Finding"), value=concept("233604007", "Pneumonia", "SCT"),
                        relationship_type=CONTAINS),
        NumContentItem(name=concept("121206", "Distance"), value=12.5, unit=concept("mm", "millimeter", "UCUM"),
                       relationship_type=CONTAINS),
        PnameContentItem(name=concept("121008", "Person Observer Name"), value="Smith^Ann", relationship_type=CONTAINS),
        DateContentItem(name=concept("111060", "Study Date"), value="20190301", relationship_type=CONTAINS),
        ImageContentItem(name=concept("121200", "Illustration of ROI"), referenced_sop_class_uid=pydicom.uid.CTImageStorage,
                         referenced_sop_instance_uid=f"{IMAGE_SERIES}.1", relationship_type=CONTAINS),
    ]
    dataset = pydicom.dcmread(io.BytesIO(report_sr(items=items)))
    assert report_text(dataset) == (
        "Diagnostic imaging report\n"
        "History: Cough for two weeks.\n"
        "Finding: Pneumonia\n"
        "Distance: 12.5 mm\n"
        "Person Observer Name: Ann Smith\n"
        "Study Date: 2019-03-01\n"
        "\n"
        "Findings\n"
        f"Finding: {FINDINGS}\n"
    )


@pytest.fixture
def reports(seeded, api):
    """The sample dictionary, a CT series and its study's SR uploaded to alpha/main (the SR queued)."""
    with seeded.app_context():
        load_sample()
    for data in (image(), report_sr()):
        assert api.upload(data).status_code == 200
    return seeded


def search(client, query):
    response = client.post("/api/search_anns/x", json=query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def test_an_uploaded_report_is_searchable_with_its_qualifiers_once_a_worker_has_read_it(reports):
    client = reports.test_client()
    negated = {"terms": [{"q": PNEUMONIA, "negation": "Negated"}]}
    with reports.app_context():
        assert db.session.execute(select(func.count()).select_from(report_jobs)).scalar_one() == 1  # the SR's only
        assert search(client, negated) == []
        assert work_once(StoreAnnotator()) == 1
        assert db.session.execute(select(func.count()).select_from(report_jobs)).scalar_one() == 0
    assert search(client, negated) == [REPORT]
    assert search(client, {"terms": [{"q": PNEUMONIA, "negation": "Affirmed"}]}) == []
    detail = client.get(f"/api/doc_detail/{REPORT}").get_json()
    assert detail["content"].startswith("Diagnostic imaging report\n")
    assert FINDINGS in detail["content"]
    assert {key: value for key, value in detail["anns"].items() if key[0].isupper()} == {
        "SOPInstanceUID": REPORT, "SeriesInstanceUID": REPORT_SERIES, "StudyInstanceUID": STUDY, "PatientID": PATIENT,
        "SOPClassUID": pydicom.uid.ComprehensiveSRStorage, "ContentDate": "20190304",
        "ModalitiesInStudy": "CT\\SR",  # the study's series in the archive, as the SR does not list them
    }
    mention = next(annotation for annotation in detail["anns"]["annotations"] if annotation["cui"] == PNEUMONIA)
    start, end = mention["start"], mention["end"]
    assert detail["content"][start:end] == "pneumonia"


def test_a_modality_filter_finds_the_report_by_its_study(reports):
    with reports.app_context():
        work_once(StoreAnnotator())
    query = {"terms": [{"q": PNEUMONIA}], "filter": {"modalities": ["CT"]}}
    assert search(reports.test_client(), query) == [REPORT]


def series_keys(series_uid):
    return {"Project": "alpha", "Archive": "main", "PatientID": PATIENT, "StudyInstanceUID": STUDY,
            "SeriesInstanceUID": series_uid}


def annotation_count(app):
    with app.app_context():
        return db.session.execute(select(func.count()).select_from(annotations)).scalar_one()


def test_deleting_the_report_deletes_its_document_and_annotations(reports, api):
    with reports.app_context():
        work_once(StoreAnnotator())
    assert annotation_count(reports) > 0
    assert api.get("series/delete/", **series_keys(IMAGE_SERIES)).status_code == 200
    assert search(reports.test_client(), {"terms": [{"q": PNEUMONIA}]}) == [REPORT]  # the image's delete keeps it
    assert api.get("series/delete/", **series_keys(REPORT_SERIES)).status_code == 200
    assert reports.test_client().get(f"/api/doc_detail/{REPORT}").status_code == 404
    assert annotation_count(reports) == 0


def test_a_report_deleted_while_it_is_read_leaves_nothing(reports, api):
    with reports.app_context():
        (instance_id,) = jobs.claim(10)
        document = jobs.report_document(instance_id, StoreAnnotator().current())
    assert api.get("series/delete/", **series_keys(REPORT_SERIES)).status_code == 200
    with reports.app_context():
        with pytest.raises(Exception) as refused:
            jobs.import_documents([document])
        assert "FOREIGN KEY" in str(refused.value).upper()
        assert jobs.annotate_job(instance_id, StoreAnnotator().current()) is False
        assert db.session.execute(select(func.count()).select_from(documents)).scalar_one() == 0


def test_a_report_that_cannot_be_read_is_tried_again_then_kept_with_its_reason(reports, monkeypatch):
    monkeypatch.setattr(jobs, "RETRY_PAUSE", jobs.RETRY_PAUSE * 0)
    with reports.app_context():
        key = db.session.execute(select(instances.c.storage_key).where(instances.c.sop_instance_uid == REPORT)).scalar()
        jobs.storage().path(key).write_bytes(b"not DICOM")  # the stored file is damaged
        annotator = StoreAnnotator()
        for attempt in range(1, jobs.MAX_ATTEMPTS + 1):
            assert work_once(annotator) == 1
            row = db.session.execute(select(report_jobs)).one()
            assert (row.attempts, row.failed) == (attempt, attempt == jobs.MAX_ATTEMPTS)
        assert work_once(annotator) == 0  # given up
        state = jobs.queue_state()
    assert state.pending == 0
    [(uid, attempts, reason)] = state.failed
    assert (uid, attempts) == (REPORT, jobs.MAX_ATTEMPTS) and reason.startswith("InvalidDicomError: ")
    listed = CliRunner().invoke(main, ["annotate", "--project", "alpha", "--archive", "main"],
                                obj=ScriptInfo(create_app=lambda: reports))
    assert listed.exit_code == 0, listed.output
    assert f"failed {REPORT} after {jobs.MAX_ATTEMPTS} attempts: InvalidDicomError: " in listed.output


def test_workers_at_once_never_take_the_same_report(reports, api):
    for number in range(2, 41):
        assert api.upload(report_sr(sop_uid=f"{REPORT_SERIES}.{number}")).status_code == 200
    taken, start = [], threading.Barrier(4)

    def worker():
        with reports.app_context():
            start.wait()
            while batch := jobs.claim(3):
                taken.extend(batch)
            db.session.remove()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == len(set(taken)) == 40


def test_gateway_annotate_reads_every_report_again_with_the_new_dictionary(reports):
    with reports.app_context():
        work_once(StoreAnnotator())
        load_fixture_dictionary()  # beside the sample: Pneumonia is also C0000030 now
    run = CliRunner().invoke(main, ["annotate"], obj=ScriptInfo(create_app=lambda: reports))
    assert run.exit_code == 0, run.output
    assert run.stdout == "annotated 1 of 1 SR reports\n"
    query = {"terms": [{"q": "C0000030", "negation": "Negated"}]}
    assert search(reports.test_client(), query) == [REPORT]


def test_gateway_annotate_stores_a_folder_of_text_reports(app, tmp_path):
    with app.app_context():
        load_sample()
    texts, meta = tmp_path / "text", tmp_path / "meta"
    texts.mkdir(), meta.mkdir()
    (texts / "doc1.txt").write_text("Mother had pneumonia.\n")
    (texts / "doc2.txt").write_text("History of rib fracture.\n")
    (meta / "doc1.json").write_text(json.dumps({"SOPInstanceUID": "2.25.1", "ContentDate": "20140613",
                                                "ModalitiesInStudy": "CR", "PatientID": "P1"}))
    command = ["annotate", "--text-dir", str(texts), "--meta-dir", str(meta)]
    run = CliRunner().invoke(main, command, obj=ScriptInfo(create_app=lambda: app))
    assert run.exit_code == 0, run.output
    assert run.stdout == "annotated 2 text reports: 2 new, 0 replaced\n"
    client = app.test_client()
    assert search(client, {"terms": [{"q": PNEUMONIA, "experiencer": "Other"}]}) == ["2.25.1"]
    assert search(client, {"terms": [{"q": "fracture", "temporality": "historical"}]}) == ["doc2"]
    assert client.get("/api/doc_detail/2.25.1").get_json()["anns"]["ModalitiesInStudy"] == "CR"
    again = CliRunner().invoke(main, command, obj=ScriptInfo(create_app=lambda: app))
    assert again.stdout == "annotated 2 text reports: 0 new, 2 replaced\n"


def running(pid):
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_through_gateway_serve_an_uploaded_report_is_found_within_seconds(seeded, gunicorn):
    with seeded.app_context():
        load_sample()
    base_url, log_path = gunicorn(seeded, via_cli=True)
    headers = {"X-USERNAME": "alice", "X-PASSWORD": PASSWORD}
    for data in (image(), report_sr()):
        uploaded = requests.post(f"{base_url}/api/v1/instance/upload/", headers=headers, timeout=30,
                                 data={"Project": "alpha", "Archive": "main"}, files={"file": ("r.dcm", data)})
        assert uploaded.status_code == 200, uploaded.text
    uploaded_at, found = time.monotonic(), []
    while not found and time.monotonic() - uploaded_at < 30:
        answer = requests.post(f"{base_url}/api/search_anns/x", timeout=10,
                               json={"terms": [{"q": PNEUMONIA, "negation": "Negated"}]})
        found = answer.json()["results"]
        time.sleep(0.2)
    assert found == [REPORT], log_path.read_text()[-3000:]
    assert time.monotonic() - uploaded_at < 15, "the report took longer than 15 s to be searchable"
    # killed outright, the server leaves no report worker behind
    log = log_path.read_text()
    master = int(re.search(r"\[(\d+)\] \[INFO\] Starting gunicorn", log).group(1))
    worker = int(re.search(r"\[report worker (\d+)\]", log).group(1))
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running(worker):
        assert time.monotonic() < deadline, "the report worker outlived its server"
        time.sleep(0.2)


SHARED_SR = PROJECT_ROOT.parent / "shared" / "data" / "sr"


@pytest.mark.skipif(not SHARED_SR.is_dir(), reason="the shared test material (../shared/data/sr) is not here")
def test_the_shared_basic_text_reports_read_alike_whether_their_text_is_html_or_not():
    plain, html = (report_text(pydicom.dcmread(SHARED_SR / name)) for name in ("report10.dcm", "report10html.dcm"))
    assert plain.startswith("MR Report\nRequest: MRI: Knee\nHistory: 16 year old with right knee pain")
    assert "\nFindings\nFinding: " in html and "<" not in html and "color: red" not in html
    assert plain.splitlines()[-1] == html.splitlines()[-1]  # the last finding, the same in both


@pytest.mark.parametrize("args, reason", [
    (["--project", "alpha"], "give --project and --archive together"),
    (["--project", "alpha", "--archive", "nope"], "no archive 'nope' in a project 'alpha'"),
    (["--meta-dir", "."], "--meta-dir goes with --text-dir"),
    (["--text-dir", ".", "--project", "alpha", "--archive", "main"], "--text-dir goes without --project and --archive"),
])
def test_gateway_annotate_refuses_what_it_cannot_do(seeded, args, reason):
    run = CliRunner().invoke(main, ["annotate", *args], obj=ScriptInfo(create_app=lambda: seeded))
    assert (run.exit_code, run.stderr) == (1, f"Error: {reason}\n")


def test_the_worker_waits_out_a_store_that_fails_and_goes_on(reports, monkeypatch):
    from gateway.reports import annotating, worker

    monkeypatch.setattr(worker, "_PAUSE_AFTER_ERROR", 0.01)
    claims, stop = [], threading.Event()

    def claim_failing_once(count):
        claims.append(count)
        if len(claims) == 1:
            raise OperationalError("SELECT", {}, Exception("the server closed the connection"))
        taken = jobs.claim(count)
        if not taken:
            stop.set()
        return taken

    monkeypatch.setattr(annotating, "claim", claim_failing_once)
    with reports.app_context():
        worker.run_worker(poll_seconds=0.01, stop=stop)
    assert len(claims) >= 3  # the failure, the report, the empty queue
    assert search(reports.test_client(), {"terms": [{"q": PNEUMONIA, "negation": "Negated"}]}) == [REPORT]


def test_a_worker_sees_a_new_dictionary_at_its_next_look(reports, monkeypatch):
    from gateway.reports import annotating

    with reports.app_context():
        annotator = StoreAnnotator()
        first = annotator.current()
        load_fixture_dictionary()
        assert annotator.current() is first  # not looked at again so soon
        monkeypatch.setattr(annotating, "VERSION_CHECK_SECONDS", 0)
        assert annotator.current() is not first
