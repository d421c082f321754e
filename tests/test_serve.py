"""`gateway serve` as the README runs it: threaded workers that see every write at once, and slow
clients that neither get cut off nor hold up everyone else. Runs on SQLite and on PostgreSQL."""
import io
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import requests
import urllib3

from .conftest import credentials, instance

PATIENT = "PAT-5"
ARCHIVE = {"Project": "alpha", "Archive": "main"}
PATIENT_PARAMS = {**ARCHIVE, "PatientID": PATIENT}


def _upload(session, base_url, data):
    response = session.post(f"{base_url}/api/v1/instance/upload/", data=ARCHIVE, headers=credentials(),
                            files={"file": ("image.dcm", data, "application/dicom")}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _series_params(uids):
    return {**ARCHIVE, "PatientID": uids["PatientID"], "StudyInstanceUID": uids["StudyInstanceUID"],
            "SeriesInstanceUID": uids["SeriesInstanceUID"]}


def test_gateway_serve_runs_threaded_workers_that_keep_connections(seeded, gunicorn):
    base_url, log_path = gunicorn(seeded, via_cli=True)
    session = requests.Session()
    uids = _upload(session, base_url, instance(1, patient=PATIENT))
    found = session.get(f"{base_url}/api/v1/series/get/", params=_series_params(uids), headers=credentials(), timeout=10)
    assert found.status_code == 200 and found.json()["SeriesInstanceUID"] == uids["SeriesInstanceUID"]
    assert found.headers["Connection"] == "keep-alive"
    deadline = time.monotonic() + 10
    while log_path.read_text().count("Booting worker") < 2:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    assert "Using worker: gthread" in log_path.read_text()
    assert log_path.read_text().count("Booting worker") == 2


def test_every_write_is_seen_at_once_on_every_connection(seeded, gunicorn):
    """Upload, read back, delete, read back, 30 times over four kept-alive connections and fresh ones:
    no worker may answer from an older snapshot of the store."""
    base_url, log_path = gunicorn(seeded, via_cli=True)
    sessions = [requests.Session() for _ in range(4)]
    calls = iter(range(10**6))

    def any_connection():
        number = next(calls)
        return sessions[number % 4] if number % 5 else requests  # every fifth request a new connection

    stale = []
    for round_number in range(1, 31):
        uids = _upload(any_connection(), base_url, instance(round_number, patient=PATIENT, series=round_number))
        params = _series_params(uids)
        for expected in (200, "delete", 404):
            if expected == "delete":
                deleted = any_connection().get(f"{base_url}/api/v1/series/delete/", params=params,
                                               headers=credentials(), timeout=10)
                assert deleted.status_code == 200, deleted.text
                continue
            answer = any_connection().get(f"{base_url}/api/v1/series/get/", params=params, headers=credentials(),
                                          timeout=10)
            if answer.status_code != expected:
                stale.append((round_number, expected, answer.status_code))
    assert stale == [], f"{stale}\n{log_path.read_text()[-2000:]}"


# A series of 40 CT-sized instances (20 MB), read at about 3 MB/s: more than twice the timeout.
DOWNLOAD_INSTANCES = 40
READ_BYTES_PER_SECOND = 3_000_000
TIMEOUT_SECONDS = 3


def _slow_download(base_url, params):
    """The series zip read by a client that takes its time; (bytes, seconds). A small receive buffer
    keeps the kernel from taking the whole answer off the server at once."""
    pool = urllib3.PoolManager(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)], retries=False)
    start = time.monotonic()
    response = pool.request("GET", f"{base_url}/api/v1/dicom/get/", fields=params, headers=credentials(),
                            preload_content=False, timeout=urllib3.Timeout(connect=5, read=30))
    assert response.status == 200
    body = bytearray()
    for chunk in response.stream(65536):
        body += chunk
        behind = len(body) / READ_BYTES_PER_SECOND - (time.monotonic() - start)
        if behind > 0:
            time.sleep(behind)
    response.release_conn()
    return bytes(body), time.monotonic() - start


def test_downloads_longer_than_the_timeout_complete_while_others_are_answered(seeded, gunicorn):
    base_url, log_path = gunicorn(seeded, via_cli=True, serve_args=("--timeout", str(TIMEOUT_SECONDS)))
    session = requests.Session()
    files = [instance(number, patient=PATIENT, rows=512, columns=512) for number in range(1, DOWNLOAD_INSTANCES + 1)]
    uids = [_upload(session, base_url, data) for data in files]
    params = _series_params(uids[0])
    expected = {f"{item['SOPInstanceUID']}.dcm": data for item, data in zip(uids, files)}

    latencies = []
    stop = threading.Event()

    def simple_requests():
        other = requests.Session()
        while not stop.is_set():
            start = time.monotonic()
            answer = other.get(f"{base_url}/api/v1/series/get/", params=params, headers=credentials(), timeout=10)
            latencies.append((time.monotonic() - start, answer.status_code))
            time.sleep(0.1)

    with ThreadPoolExecutor(3) as pool:
        prober = pool.submit(simple_requests)
        downloads = [pool.submit(_slow_download, base_url, params) for _ in range(2)]  # as many as workers
        try:
            finished = [download.result(timeout=60) for download in downloads]
        finally:
            stop.set()
        prober.result(timeout=15)

    for body, seconds in finished:
        assert seconds > 2 * TIMEOUT_SECONDS
        with zipfile.ZipFile(io.BytesIO(body)) as series_zip:
            assert {name: series_zip.read(name) for name in series_zip.namelist()} == expected
    assert len(latencies) > 20 and all(status == 200 for _, status in latencies)
    assert max(seconds for seconds, _ in latencies) < 1.0, sorted(latencies)[-3:]
    assert "WORKER TIMEOUT" not in log_path.read_text()


def test_every_answer_under_api_is_json(seeded, gunicorn):
    """Whoever answers (routing, the size limits, gunicorn itself), a client of either API gets JSON."""
    base_url, _log = gunicorn(seeded, via_cli=True)
    session = requests.Session()
    body = b'{"terms": [{"q": "' + b"x" * 1_100_000 + b'"}]}'

    def chunked():  # requests sends a generator's body chunked, without a Content-Length
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    answers = {
        "redirect": session.get(f"{base_url}/api/v1/patient/get", params=PATIENT_PARAMS, headers=credentials(),
                                allow_redirects=False, timeout=10),
        "doubled slash": session.get(f"{base_url}/api//docs", allow_redirects=False, timeout=10),
        "unknown call": session.get(f"{base_url}/api/nothing/here", timeout=10),
        "wrong method": session.put(f"{base_url}/api/docs", timeout=10),
        # a connection of its own each: gunicorn closes one whose refused body it cannot drain in time
        "sized body over the limit": requests.post(f"{base_url}/api/search_anns/x", data=body, timeout=10,
                                                   headers={"Content-Type": "application/json"}),
        "chunked body over the limit": requests.post(f"{base_url}/api/search_anns/x", data=chunked(), timeout=10,
                                                     headers={"Content-Type": "application/json"}),
        "request line too long": requests.get(f"{base_url}/api/search_anns/{'C0000001,' * 1000}", timeout=10),
        "header too long": requests.get(f"{base_url}/api/docs", headers={"X-Padding": "x" * 9000}, timeout=10),
    }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {
        "redirect": 308, "doubled slash": 308, "unknown call": 404, "wrong method": 405,
        "sized body over the limit": 400, "chunked body over the limit": 400,
        "request line too long": 414, "header too long": 431,
    }
    for name, answer in answers.items():
        assert answer.headers["Content-Type"].startswith("application/json"), (name, answer.text[:200])
        assert answer.json()["message"], name
    assert answers["redirect"].headers["Location"].startswith(f"{base_url}/api/v1/patient/get/?")
    assert answers["doubled slash"].headers["Location"] == f"{base_url}/api/docs"
    assert "1,000,000 bytes" in answers["chunked body over the limit"].json()["message"]
    assert "1,000,000 bytes" in answers["sized body over the limit"].json()["message"]
