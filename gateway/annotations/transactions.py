"""The record of annotation searches: who asked what, when, and how many results they got.

A search hands its record to the process's SearchLog and answers at once: a thread of the process
writes the records in batches, one transaction for as many as arrived meanwhile. So no search waits
for SQLite's write lock (held by an import batch or an upload) and the store sees one write per
batch, not per search. Records still queued when the process exits are written before it ends.
"""
import atexit
import logging
import os
import queue
import threading
import time

from sqlalchemy import insert, select

from ..db import db, write_transaction
from ..models import search_transactions

log = logging.getLogger(__name__)

ADDRESS_LENGTH = search_transactions.c.client_address.type.length
BATCH_ROWS = 500
WRITE_ATTEMPTS = 4
EXIT_WAIT_SECONDS = 20  # less than gunicorn's graceful_timeout (30 s), after which it kills a worker


class SearchLog:
    def __init__(self, app):
        self._app = app
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self._writer_pid = None  # the writer thread belongs to one process: a forked worker starts its own

    def record(self, transaction_id, started_at, call, query_json, client_address, num_results):
        self._start_writer()
        self._queue.put({
            "id": transaction_id,
            "created_at": started_at,
            "client_address": (client_address or "")[:ADDRESS_LENGTH] or None,
            "call": call,
            "query": query_json,
            "num_results": num_results,
        })

    def flush(self):
        """Wait until every record handed over so far is written (or given up on, and logged)."""
        self._queue.join()

    def _start_writer(self):
        with self._lock:
            if self._writer_pid == os.getpid():
                return
            self._writer_pid = os.getpid()
            threading.Thread(target=self._write_forever, name="search-log", daemon=True).start()
            atexit.register(self._flush_at_exit)

    def _flush_at_exit(self):
        deadline = time.monotonic() + EXIT_WAIT_SECONDS
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._queue.unfinished_tasks:
            log.error("%d search records were not written before the process ended", self._queue.unfinished_tasks)

    def _write_forever(self):
        while True:
            batch = [self._queue.get()]
            while len(batch) < BATCH_ROWS:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)
            for _row in batch:
                self._queue.task_done()

    def _write(self, batch):
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._app.app_context(), write_transaction() as session:
                    session.execute(insert(search_transactions), batch)
                return
            except Exception:  # the store is away or locked for long: try again, then say what was lost
                if attempt == WRITE_ATTEMPTS:
                    log.exception("search records %s could not be written", ", ".join(row["id"] for row in batch))
                    return
                time.sleep(2 ** (attempt - 1))


def recent(limit=20):
    """The latest `limit` transactions, newest first."""
    statement = select(search_transactions).order_by(search_transactions.c.created_at.desc()).limit(limit)
    return db.session.execute(statement).all()
