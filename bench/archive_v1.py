"""Throughput of the archive API v1 under gunicorn: instance upload, series download, series lookup.

    .venv/bin/python bench/archive_v1.py --store sqlite
    .venv/bin/python bench/archive_v1.py --store postgresql [--only upload-small|upload-ct|download|series-get]

    .venv/bin/python bench/archive_v1.py --store sqlite --repeat 3    # and min/median/max at the end

Each measurement gets a fresh database and storage folder and its own gunicorn (2 workers with the
settings of `gateway serve`, which gunicorn reads from gunicorn.conf.py; --worker-args to try others) on
loopback; everything is removed at the end.
MB means 10**6 bytes of DICOM payload.

Beside each figure, "CPU s" is what each worker, our clients and the rest used (rest: database server,
kernel, and anything else running; on SQLite a rest of more than a few tenths means the machine was not
quiet). The two workers' CPU also shows how evenly the requests were spread over them (a kept-alive
connection stays with one worker).
"""
import argparse
import contextlib
import http.client
import io
import multiprocessing
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout that is not pip-installed

from gateway.synthetic import DEMO_UID_ROOT, make_instance  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
USERNAME, PROJECT, ARCHIVE = "bench", "bench", "main"
PASSWORD = secrets.token_hex(16)  # per run: the throwaway user exists only in the throwaway database
UID_ROOT = DEMO_UID_ROOT + "9."
CLIENTS = 4
# gunicorn worker options beyond gunicorn.conf.py's (2 workers always); --worker-args changes them
WORKER_ARGS = []
MB = 1e6
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

TARGETS = {  # measurement: (unit, target, higher is better)
    "upload-small": ("inst/s", 450, True),
    "upload-ct": ("MB/s", 120, True),
    "download": ("MB/s", 300, True),
    "download-rss": ("MB RSS", 50, False),
    "series-get": ("req/s", 1500, True),
    "series-get-non2xx": ("responses", 0, False),
}


# --- the server under test ------------------------------------------------------------------------


def _proc_stat(pid):
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces): state, ppid, …"""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


class Gateway:
    """A gunicorn serving the gateway on a free loopback port, with the bench user's credentials."""

    def __init__(self, database_url, storage_dir, log_path):
        with socket.socket() as probe:  # a free port; the tiny race until gunicorn binds it is harmless here
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = dict(os.environ, GATEWAY_DATABASE_URL=database_url, GATEWAY_STORAGE_DIR=storage_dir)
        # --no-control-socket: gunicorn >= 25 otherwise shares one control socket in $HOME between all
        # instances on the machine, so another gunicorn starting or stopping would take over ours.
        command = [sys.executable, "-m", "gunicorn", "-w", "2", *WORKER_ARGS,
                   "-b", f"127.0.0.1:{self.port}", "--no-control-socket", "wsgi:app"]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.master = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.headers = {"X-USERNAME": USERNAME, "X-PASSWORD": PASSWORD}
        self._wait_until_ready()

    def _wait_until_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.master.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if len(self.workers()) == 2 and self.get("/api/v1/")[0] == 404:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn not ready after {timeout} s:\n{self.log_tail()}")

    def workers(self):
        pids = []
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError, IndexError):
                if entry.isdigit() and int(_proc_stat(entry)[1]) == self.master.pid:
                    pids.append(int(entry))
        return sorted(pids)

    def worker_cpu(self):
        """CPU seconds (user + system) each worker has used so far."""
        return [(int(fields[11]) + int(fields[12])) / CLOCK_TICKS for fields in map(_proc_stat, self.workers())]

    def worker_rss_mb(self):
        sizes = []
        for pid in self.workers():
            line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmRSS:"))
            sizes.append(int(line.split()[1]) * 1024 / MB)
        return sizes

    def get(self, path, **params):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("GET", self.url_path(path, **params), headers=self.headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def url_path(self, path, **params):
        query = urllib.parse.urlencode({"Project": PROJECT, "Archive": ARCHIVE, **params})
        return f"{path}?{query}"

    def log_tail(self, lines=30):
        with contextlib.suppress(OSError):
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self):
        if self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)  # graceful: the master stops its workers
            try:
                self.master.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.master.kill()
                self.master.wait()


def _seed(database_url, storage_dir):
    """Schema, user, project and archive through the project's own functions (not its CLI)."""
    from gateway import create_app
    from gateway.auth.users import create_user, grant
    from gateway.db import db, init_db
    from gateway.projects import add_member, create_archive, create_project

    app = create_app({"DATABASE_URL": database_url, "STORAGE_DIR": storage_dir})
    with app.app_context():
        init_db()
        create_user(USERNAME, "bench@example.org", PASSWORD)
        grant(USERNAME, ["all"])
        create_project(PROJECT)
        create_archive(PROJECT, ARCHIVE)
        add_member(PROJECT, USERNAME, can_upload=True)
        db.session.remove()
        db.engine.dispose()  # no connection of ours may outlive the seeding (DROP DATABASE, forks)


@contextlib.contextmanager
def fresh_gateway(store, pg_admin_url):
    """A gateway on an empty database and storage folder; all of it is removed on exit."""
    workdir = tempfile.mkdtemp(prefix="gateway_bench_")
    admin, database, gateway = None, None, None
    try:
        if store == "sqlite":
            database_url = "sqlite:///" + os.path.join(workdir, "gateway.sqlite")
        else:
            import sqlalchemy

            admin = sqlalchemy.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
            database = f"gateway_bench_{secrets.token_hex(6)}"
            with admin.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
            database_url = admin.url.set(database=database).render_as_string(hide_password=False)
        storage_dir = os.path.join(workdir, "storage")
        _seed(database_url, storage_dir)
        gateway = Gateway(database_url, storage_dir, os.path.join(workdir, "gunicorn.log"))
        yield gateway
    except Exception:
        if gateway is not None:
            print(f"--- gunicorn log (last lines)\n{gateway.log_tail()}", file=sys.stderr)
        raise
    finally:
        if gateway is not None:
            gateway.stop()
        if admin is not None:
            if database is not None:
                with admin.connect() as connection:
                    connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            admin.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


# --- upload clients -------------------------------------------------------------------------------


def instance_specs(count, studies, tag, **image):
    """make_instance arguments for `count` instances spread round-robin over `studies` studies
    (one series each, 4 studies per patient); `tag`, a number, keeps the UIDs of each use apart."""
    specs = []
    for number in range(count):
        study = number % studies
        study_uid = f"{UID_ROOT}{tag}.{study}"
        specs.append(dict(patient_id=f"BENCH-{tag}-{study // 4}", study_uid=study_uid, series_uid=f"{study_uid}.1",
                          sop_uid=f"{study_uid}.1.{number}", instance_number=number + 1, **image))
    return specs


def multipart_body(dicom):
    boundary = secrets.token_hex(16)
    fields = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (("Project", PROJECT), ("Archive", ARCHIVE))
    )
    file_head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.dcm"\r\n'
                 "Content-Type: application/dicom\r\n\r\n").encode()
    body = b"".join((fields, file_head, dicom, f"\r\n--{boundary}--\r\n".encode()))
    return body, f"multipart/form-data; boundary={boundary}"


def _post(connection, body, headers):
    """One upload on a keep-alive connection; reconnects once should the server have closed it idle."""
    for attempt in (1, 2):
        try:
            connection.request("POST", "/api/v1/instance/upload/", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            if attempt == 2:
                raise


def _upload_client(port, auth_headers, specs, warmup_spec, built, go, results):
    try:
        _upload_from_client(port, auth_headers, specs, warmup_spec, built, go, results)
    except BaseException:
        built.abort()  # the parent and the other clients fail at once instead of waiting for this one
        go.abort()
        raise


def _upload_from_client(port, auth_headers, specs, warmup_spec, built, go, results):
    """One client process: builds its bodies, warms its connection's worker, then uploads in order."""
    instances = [make_instance(**spec) for spec in specs]
    bodies = [(multipart_body(dicom), len(dicom)) for dicom in instances]
    del instances
    built.wait()  # everyone's bodies exist before any connection opens (gunicorn drops idle ones after 2 s)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    warm_body, warm_type = multipart_body(make_instance(**warmup_spec))
    # Untimed: the worker's first request on these credentials pays the scrypt check.
    warm_status, warm_answer = _post(connection, warm_body, {**auth_headers, "Content-Type": warm_type})
    go.wait()
    failures, payload = [] if warm_status == 200 else [f"warm-up: {warm_status} {warm_answer[:200]!r}"], 0
    cpu_start, start = os.times(), time.monotonic()
    for (body, content_type), size in bodies:
        status, answer = _post(connection, body, {**auth_headers, "Content-Type": content_type})
        if status == 200:
            payload += size
        else:
            failures.append(f"{status} {answer[:200]!r}")
    end, cpu_end = time.monotonic(), os.times()
    connection.close()
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    results.put((start, end, len(bodies), payload, failures, cpu))


def upload(gateway, specs, tag):
    """Upload `specs` from CLIENTS processes (client k owns specs[k::CLIENTS]); timing covers sending only."""
    context = multiprocessing.get_context("fork")
    built, go, results = context.Barrier(CLIENTS + 1), context.Barrier(CLIENTS + 1), context.Queue()
    warmups = instance_specs(CLIENTS, CLIENTS, tag + 10)
    processes = [
        context.Process(target=_upload_client,
                        args=(gateway.port, gateway.headers, specs[k::CLIENTS], warmups[k], built, go, results))
        for k in range(CLIENTS)
    ]
    for process in processes:
        process.start()
    try:
        try:
            built.wait(timeout=600)
            go.wait(timeout=120)
        except threading.BrokenBarrierError:
            raise RuntimeError("an upload client failed before the timing started (its traceback is above)") from None
        cpu = CpuWindow(gateway)
        outcomes = [_next_result(results, processes) for _ in processes]
        cpu.close(client_seconds=sum(o[5] for o in outcomes))
    except BaseException:
        for process in processes:  # interrupted or failed: no client may keep sending
            process.terminate()
        raise
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    wall = max(o[1] for o in outcomes) - min(o[0] for o in outcomes)
    failures = [failure for o in outcomes for failure in o[4]]
    return {
        "wall": wall,
        "count": sum(o[2] for o in outcomes),
        "payload": sum(o[3] for o in outcomes),
        "failures": failures,
        "cpu": cpu,
    }


def _next_result(results, processes):
    while True:
        with contextlib.suppress(queue.Empty):
            return results.get(timeout=1)
        if any(process.exitcode not in (None, 0) for process in processes):
            raise RuntimeError("an upload client died (its traceback is above)")


def _machine_busy_seconds():
    """CPU seconds the whole machine has been busy (not idle, not waiting for I/O), from /proc/stat."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / CLOCK_TICKS


class CpuWindow:
    """Where the CPU went while a measurement ran: each gunicorn worker, our clients, and the rest
    (database, kernel, and any other work on the machine, which makes the figure unreliable)."""

    def __init__(self, gateway):
        self.gateway = gateway
        self._workers, self._machine, self._start = gateway.worker_cpu(), _machine_busy_seconds(), time.monotonic()

    def close(self, client_seconds=0.0):
        self.workers = [after - before for before, after in zip(self._workers, self.gateway.worker_cpu())]
        self.clients = client_seconds
        # (clamped: the readings are not simultaneous, so an idle rest can come out a hair below zero)
        self.rest = max(0.0, _machine_busy_seconds() - self._machine - sum(self.workers) - client_seconds)
        self.available = (time.monotonic() - self._start) * os.cpu_count()

    def note(self):
        workers = "+".join(f"{seconds:.1f}" for seconds in self.workers)
        return (f"CPU s: workers {workers}, clients {self.clients:.1f}, rest {self.rest:.1f} "
                f"of {self.available:.1f}")


def _failure_note(failures):
    for failure in failures[:5]:
        print(f"    failed: {failure}", file=sys.stderr)
    return f"{len(failures)} failed"


# --- the measurements -------------------------------------------------------------------------------


def measure_upload_small(gateway):
    run = upload(gateway, instance_specs(2000, 40, 1), 1)
    rate = run["count"] / run["wall"]
    return [("upload-small", rate,
             f"{run['count']} x {run['payload'] / run['count'] / 1000:.1f} KB in {run['wall']:.2f} s, "
             f"{_failure_note(run['failures'])}; {run['cpu'].note()}")]


def measure_upload_ct(gateway):
    run = upload(gateway, instance_specs(400, 4, 2, rows=512, columns=512), 2)
    rate = run["payload"] / MB / run["wall"]
    return [("upload-ct", rate,
             f"{run['count']} x {run['payload'] / run['count'] / 1000:.0f} KB in {run['wall']:.2f} s "
             f"({run['count'] / run['wall']:.0f} inst/s), {_failure_note(run['failures'])}; "
             f"{run['cpu'].note()}")]


def _download(gateway, path, keep):
    """Read the whole answer in 1 MiB reads; returns (status, bytes read, the bytes if `keep`)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
    try:
        connection.request("GET", path, headers=gateway.headers)
        response = connection.getresponse()
        buffer, total, kept = bytearray(1 << 20), 0, io.BytesIO() if keep else None
        while count := response.readinto(buffer):
            total += count
            if keep:
                kept.write(buffer[:count])
        return response.status, total, kept
    finally:
        connection.close()


def measure_download(gateway, repeats=5):
    specs = instance_specs(200, 1, 3, rows=512, columns=512)
    setup = upload(gateway, specs, 3)  # untimed: only the series has to exist
    if setup["failures"]:
        raise RuntimeError(f"setting up the series failed: {setup['failures'][:3]}")
    first = specs[0]
    path = gateway.url_path("/api/v1/dicom/get/", PatientID=first["patient_id"],
                            StudyInstanceUID=first["study_uid"], SeriesInstanceUID=first["series_uid"])
    rss_before, cpu = gateway.worker_rss_mb(), CpuWindow(gateway)
    statuses, received = [], 0
    client_start, start = os.times(), time.monotonic()
    for _ in range(repeats):
        status, size, _ = _download(gateway, path, keep=False)
        statuses.append(status)
        received += size
    wall, client_end = time.monotonic() - start, os.times()
    cpu.close(client_seconds=(client_end.user - client_start.user) + (client_end.system - client_start.system))
    rss_after = gateway.worker_rss_mb()
    growth = max(after - before for before, after in zip(rss_before, rss_after))

    # Verification, outside the timing and after the RSS reading.
    status, size, kept = _download(gateway, path, keep=True)
    with zipfile.ZipFile(kept) as archive_zip:
        entries, bad = len(archive_zip.infolist()), archive_zip.testzip()
    valid = status == 200 and entries == 200 and bad is None
    ok_count = sum(s == 200 for s in statuses)
    rss = ", ".join(f"{b:.0f}->{a:.0f}" for b, a in zip(rss_before, rss_after))
    return [
        ("download", received / MB / wall,
         f"{repeats} x {received / repeats / MB:.1f} MB in {wall:.2f} s, {ok_count}/{repeats} status 200; "
         f"zip check: {'valid' if valid else 'INVALID'} ({entries} entries, status {status}); {cpu.note()}"),
        ("download-rss", growth, f"worker VmRSS MB before->after: {rss}"),
    ]


def _children_cpu_seconds():
    """CPU seconds of our finished child processes (here: wrk)."""
    times = os.times()
    return times.children_user + times.children_system


def _wrk(gateway, url, duration):
    """wrk's report."""
    headers = [argument for name, value in gateway.headers.items() for argument in ("-H", f"{name}: {value}")]
    command = ["wrk", "-t2", "-c8", f"-d{duration}s", *headers, url]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"wrk failed: {finished.stderr}")
    return finished.stdout


def measure_series_get(gateway, duration=10):
    spec = instance_specs(1, 1, 4)[0]
    body, content_type = multipart_body(make_instance(**spec))
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    status, answer = _post(connection, body, {**gateway.headers, "Content-Type": content_type})
    connection.close()
    if status != 200:
        raise RuntimeError(f"uploading the series failed: {status} {answer[:200]!r}")
    url = f"http://127.0.0.1:{gateway.port}" + gateway.url_path(
        "/api/v1/series/get/", PatientID=spec["patient_id"], StudyInstanceUID=spec["study_uid"],
        SeriesInstanceUID=spec["series_uid"])
    _wrk(gateway, url, 2)  # untimed warm-up: credential caches, connection pools
    wrk_before = _children_cpu_seconds()
    cpu = CpuWindow(gateway)
    output = _wrk(gateway, url, duration)
    cpu.close(client_seconds=_children_cpu_seconds() - wrk_before)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:.*", output)
    latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", output)
    return [
        ("series-get", rate, f"wrk -t2 -c8 -d{duration}s: latency avg {latency.group(1)}, max {latency.group(3)}; "
                             f"{cpu.note()}"),
        ("series-get-non2xx", int(non2xx.group(1)) if non2xx else 0, errors.group(0) if errors else "no socket errors"),
    ]


MEASUREMENTS = {
    "upload-small": measure_upload_small,
    "upload-ct": measure_upload_ct,
    "download": measure_download,
    "series-get": measure_series_get,
}


# --- report -------------------------------------------------------------------------------------------


def _row(store, run, name, value, detail):
    unit, target, higher = TARGETS[name]
    met = value >= target if higher else value <= target if target else value == 0
    value_text = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
    target_text = (">= " if higher else "< " if target else "= ") + f"{target:,}"
    return [store, str(run), name, f"{value_text} {unit}", target_text, "yes" if met else "NO", detail]


def print_table(rows):
    header = ["store", "run", "measurement", "result", "target", "met", "details"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def _revision():
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    return "(revision unknown)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("sqlite", "postgresql"), required=True)
    parser.add_argument("--only", choices=tuple(MEASUREMENTS))
    parser.add_argument("--repeat", type=int, default=1, help="run each measurement this many times")
    parser.add_argument("--worker-args", help="gunicorn worker options beyond those of gateway serve, e.g. '-k sync --threads 1'")
    parser.add_argument("--pg-admin-url", default=os.environ.get("GATEWAY_BENCH_POSTGRES_URL", PG_ADMIN_URL))
    args = parser.parse_args()
    if args.worker_args:
        WORKER_ARGS[:] = args.worker_args.split()
    # A SIGTERM unwinds like Ctrl-C, so gunicorn, the database and the temp folders are still removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"gateway {_revision()}, store {args.store}; load average before start {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs (other work on the machine skews every figure)", flush=True)

    rows, values = [], {}
    for run in range(1, args.repeat + 1):
        for name, measure in MEASUREMENTS.items():
            if args.only and name != args.only:
                continue
            with fresh_gateway(args.store, args.pg_admin_url) as gateway:
                for figure, value, detail in measure(gateway):
                    rows.append(_row(args.store, run, figure, value, detail))
                    values.setdefault(figure, []).append(value)
                    print("  ".join(rows[-1]), flush=True)
    print()
    print_table(rows)
    if args.repeat > 1:
        print()
        for figure, series in values.items():
            print(f"{figure:18} min {min(series):,.1f}  median {statistics.median(series):,.1f}  "
                  f"max {max(series):,.1f}  {TARGETS[figure][0]}")


if __name__ == "__main__":
    main()
