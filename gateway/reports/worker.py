"""The report worker: a process that annotates the SR instances that uploads queue, until it is stopped.

`gateway serve` starts one beside its web workers (`--report-workers`), and `gateway worker` runs one on its
own (on another machine too: workers share the queue in the store). It looks at the queue every
`poll_seconds` while it is empty, so a report is searchable seconds after its upload; SIGTERM or SIGINT stop
it after the batch at hand.
"""
import logging
import os
import signal
import threading

from ..db import db
from .annotating import StoreAnnotator, work_once

log = logging.getLogger(__name__)

_PAUSE_AFTER_ERROR = 10  # seconds


def run_worker(poll_seconds=1.0, stop=None, stop_with_parent=False):
    """Annotate queued reports until `stop` (a threading.Event; by default SIGTERM or SIGINT) is set, or with
    `stop_with_parent` the process that started this one has ended (a `gateway serve` killed outright)."""
    parent = os.getppid()
    if stop is None:
        stop = threading.Event()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, lambda *_: stop.set())
    annotator = StoreAnnotator()
    log.info("the report worker is running")
    while not stop.is_set() and not (stop_with_parent and os.getppid() != parent):
        try:
            busy = work_once(annotator)
        except Exception:  # the store gone for a while (a restart, a network cut): the worker waits for it
            log.exception("the report worker could not work the queue; trying again in %s s", _PAUSE_AFTER_ERROR)
            db.session.rollback()
            stop.wait(_PAUSE_AFTER_ERROR)
            continue
        if not busy:
            stop.wait(poll_seconds)
    log.info("the report worker stopped")
