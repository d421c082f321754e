"""How the gateway runs under gunicorn: `gateway serve`, and the same settings for a site's own
gunicorn (`gunicorn.conf.py` in the checkout reads SETTINGS, so `gunicorn wsgi:app` run there matches).

Threaded workers (gthread), one process per core: a request holds a thread, not a process, so slow
clients (a throttled series download, a long search answer, a slow upload) hold one thread each
while the other threads keep answering. gunicorn's `timeout` then only watches that a worker process
is alive; it never cuts off a download that takes longer. What a request may cost is bounded where it
is spent instead: the search's time budget, the upload size limit. Idle keep-alive connections wait
in the worker's poller, not in a thread.

Each worker builds its own app after the fork (as `gunicorn wsgi:app` does), so no worker inherits
the master's app context, database connections or per-process keys.
"""
import json
import subprocess
import sys

from gunicorn import util
from gunicorn.app.base import BaseApplication

SETTINGS = {
    "worker_class": "gthread",
    "workers": 2,
    "threads": 8,
    "timeout": 30,
    "keepalive": 5,
    # the largest request line gunicorn takes (its default is 4 KB): room for a GET's `j=` query
    "limit_request_line": 8190,
    "control_socket_disable": True,  # one per machine user: two gateways would share it
}


def _json_error(sock, status_int, reason, message):
    """What gunicorn answers itself (a request line too long, headers it cannot read) as JSON, in the
    fields of both APIs' error bodies: the path, and so which API was meant, is not known yet."""
    body = json.dumps({
        "success": False,
        "error_type": "internal_error" if status_int >= 500 else "invalid_get_value",
        "suberror_type": "invalid_request",
        "message": f"{reason}: {message}" if message else reason,
    })
    head = f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode("latin-1"))


def _answer_errors_in_json(_worker):
    util.write_error = _json_error  # gunicorn writes its own error pages through this one function


SETTINGS["post_worker_init"] = _answer_errors_in_json


class _GatewayServer(BaseApplication):
    def __init__(self, app_factory, options):
        self._app_factory = app_factory
        self._options = options
        super().__init__()

    def load_config(self):
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        return self._app_factory()  # in each worker, after the fork


def serve(app_factory, bind, workers, threads, timeout, report_workers=0):
    options = {**SETTINGS, "bind": bind, "workers": workers, "threads": threads, "timeout": timeout}
    if report_workers:
        options.update(_report_worker_hooks(report_workers))
    _GatewayServer(app_factory, options).run()


_REPORT_WORKER_STOP_SECONDS = 30


def _report_worker_hooks(count):
    """gunicorn hooks that run `count` report workers (`gateway worker`, gateway.reports.worker) beside the web
    workers: processes of their own, so that annotating never holds a thread that answers requests. Started
    once the server listens, with its settings (the environment); stopped when it exits, each after its batch."""
    processes = []

    def when_ready(_arbiter):
        processes.extend(subprocess.Popen([sys.executable, "-m", "gateway", "worker", "--stop-with-parent"]) for _ in range(count))

    def on_exit(_arbiter):
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=_REPORT_WORKER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()

    return {"when_ready": when_ready, "on_exit": on_exit}

