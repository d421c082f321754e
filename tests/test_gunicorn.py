"""The gateway under gunicorn: concurrent uploads of one new study (2 worker processes × 4 threads).

Many clients creating the same patient, study and series at the same moment is where a
check-then-insert races into a unique-constraint error (a 500); the same instance sent twice at
once is where idempotency races. Runs once on SQLite and once on PostgreSQL.
"""
import io
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from sqlalchemy import func, select

from gateway.db import db
from gateway.models import instances, patients, series, studies

from .conftest import credentials, instance

INSTANCES = 40
THREADS = 8
PATIENT = "PAT-7"


def test_concurrent_uploads_of_one_new_study(seeded, gunicorn):
    base_url, log_path = gunicorn(seeded)
    storage_dir = Path(seeded.config["STORAGE_DIR"])
    files = [instance(number, patient=PATIENT) for number in range(1, INSTANCES + 1)]
    sop_uids = [f"1.2.826.0.1.3680043.8.498.99.7.1.1.{number}" for number in range(1, INSTANCES + 1)]
    study_uid, series_uid = "1.2.826.0.1.3680043.8.498.99.7.1", "1.2.826.0.1.3680043.8.498.99.7.1.1"
    # Each instance twice, back to back, so both copies tend to be in flight at the same time.
    jobs = [(index, data) for index, data in enumerate(files) for _copy in range(2)]
    start = threading.Barrier(THREADS)
    local = threading.local()

    def send(job):
        index, data = job
        if not hasattr(local, "session"):
            local.session = requests.Session()
            start.wait(timeout=15)  # all threads send their first request together
        response = local.session.post(
            f"{base_url}/api/v1/instance/upload/",
            data={"Project": "alpha", "Archive": "main"},
            files={"file": (f"image-{index}.dcm", data, "application/dicom")},
            headers=credentials(),
            timeout=30,
        )
        return index, response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(send, jobs))

    failures = [(index, status, body) for index, status, body in results if status != 200]
    assert failures == [], f"{failures[:3]}\n{log_path.read_text()[-3000:]}"
    for index, _status, body in results:
        assert body == {
            "PatientID": PATIENT,
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": sop_uids[index],
        }

    # Through the API: one study, one series, 40 instances, bytes as sent.
    api = requests.Session()
    api.headers.update(credentials())
    common = {"Project": "alpha", "Archive": "main", "PatientID": PATIENT}
    assert api.get(f"{base_url}/api/v1/patient/get/", params=common, timeout=10).json()["PatientID"] == PATIENT
    listed_studies = api.get(f"{base_url}/api/v1/patient/studies/list/", params=common, timeout=10).json()
    assert [item["StudyInstanceUID"] for item in listed_studies] == [study_uid]
    listed_series = api.get(
        f"{base_url}/api/v1/patient/study/series/list/", params={**common, "StudyInstanceUID": study_uid}, timeout=10
    ).json()
    assert [item["SeriesInstanceUID"] for item in listed_series] == [series_uid]
    download = api.get(
        f"{base_url}/api/v1/dicom/get/",
        params={**common, "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
        timeout=30,
    )
    assert download.status_code == 200
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_zip:
        entries = {name: archive_zip.read(name) for name in archive_zip.namelist()}
    assert entries == {f"{sop}.dcm": data for sop, data in zip(sop_uids, files)}

    # Behind the API: exactly one patient, and no second copy of a file from the duplicate uploads.
    with seeded.app_context():
        counts = [
            db.session.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (patients, studies, series, instances)
        ]
    assert counts == [1, 1, 1, INSTANCES]
    stored = [path for path in storage_dir.rglob("*.dcm") if "tmp" not in path.relative_to(storage_dir).parts]
    assert len(stored) == INSTANCES
    assert list((storage_dir / "tmp").iterdir()) == []
