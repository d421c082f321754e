"""The gateway under gunicorn (2 worker processes × 4 threads): concurrent uploads of one new study.

Many clients creating the same patient, study and series at the same moment is where a
check-then-insert races into a unique-constraint error (a 500); the same instance sent twice at
once is where idempotency races. Runs once on SQLite and once on PostgreSQL.
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select, text

from gateway import create_app
from gateway.auth.users import create_user, grant
from gateway.db import db, init_db
from gateway.models import instances, patients, series, studies
from gateway.projects import add_member, create_archive, create_project

from .conftest import PASSWORD, credentials, instance

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INSTANCES = 40
THREADS = 8
PATIENT = "PAT-7"


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gunicorn_executable():
    found = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail("gunicorn is not installed beside the test interpreter", pytrace=False)
    return found


def _prepare_store(kind, url, storage_dir):
    """Schema, a user and a project, made with the project's own functions before the server starts."""
    app = create_app({"DATABASE_URL": url, "STORAGE_DIR": str(storage_dir)})
    with app.app_context():
        if not init_db() and kind == "postgresql":
            # The PostgreSQL test database is shared by the run; start from empty tables.
            names = ", ".join(table.name for table in db.metadata.sorted_tables)
            db.session.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            db.session.commit()
        create_user("alice", "alice@example.org", PASSWORD)
        grant("alice", ["all"])
        create_project("alpha")
        create_archive("alpha", "main")
        add_member("alpha", "alice", can_upload=True)
        db.session.remove()
        db.engine.dispose()
    return app


@pytest.fixture
def server(store, tmp_path):
    kind, url = store
    storage_dir = tmp_path / "storage"
    app = _prepare_store(kind, url, storage_dir)
    port = _free_port()
    # Only the settings under test: a GATEWAY_* variable of the caller (a passphrase, an upload limit)
    # must not change the server.
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    env.update(GATEWAY_DATABASE_URL=url, GATEWAY_STORAGE_DIR=str(storage_dir))
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [_gunicorn_executable(), "-w", "2", "-k", "gthread", "--threads", "4", "-b", f"127.0.0.1:{port}"]
            + ["wsgi:app"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited with {process.returncode}:\n{log_path.read_text()}", pytrace=False)
            try:
                if requests.get(f"{base_url}/api/v1/patient/get/", timeout=1).status_code == 401:
                    break  # the app answers (unauthenticated probe)
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn did not answer within 15 s:\n{log_path.read_text()}", pytrace=False)
            time.sleep(0.1)
        yield base_url, app, storage_dir, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_concurrent_uploads_of_one_new_study(server):
    base_url, app, storage_dir, log_path = server
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
    with app.app_context():
        counts = [
            db.session.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (patients, studies, series, instances)
        ]
        db.session.remove()
        db.engine.dispose()
    assert counts == [1, 1, 1, INSTANCES]
    stored = [path for path in storage_dir.rglob("*.dcm") if "tmp" not in path.relative_to(storage_dir).parts]
    assert len(stored) == INSTANCES
    assert list((storage_dir / "tmp").iterdir()) == []
