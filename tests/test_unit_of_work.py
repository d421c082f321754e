"""One transaction model on both stores: reads in autocommit, writes only inside write_transaction(),
commits durable before they are acknowledged, and a search record that never waits for a writer."""
import sqlite3
import threading

import pytest
from sqlalchemy import func, insert, select, text

from gateway.db import UnitOfWorkError, db, write_engine, write_transaction
from gateway.models import projects, search_transactions

from .test_annotation_api import CHEST, results


def test_a_write_outside_write_transaction_is_an_error(app):
    with app.app_context():
        with pytest.raises(UnitOfWorkError, match="a write outside write_transaction"):
            db.session.execute(insert(projects).values(name="stray", kind="cad4tb"))
        db.session.rollback()
        with pytest.raises(UnitOfWorkError):
            with db.engine.connect() as connection:
                connection.exec_driver_sql("DELETE FROM projects")
        with write_transaction() as session:
            session.execute(insert(projects).values(name="kept", kind="cad4tb"))
        assert db.session.execute(select(projects.c.name)).scalars().all() == ["kept"]


def _in_transaction(app):
    connection = db.session.connection().connection.driver_connection
    if db.engine.dialect.name == "sqlite":
        return connection.in_transaction
    return connection.info.transaction_status != 0  # psycopg: 0 is IDLE


def test_reads_leave_no_transaction_open_on_either_store(app):
    with app.app_context():
        db.session.execute(select(func.count()).select_from(projects)).scalar_one()
        assert _in_transaction(app) is False  # an open one would pin an SQLite reader to an old snapshot
        with write_transaction() as session:
            session.execute(select(1))  # psycopg sends BEGIN with the first statement
            assert _in_transaction(app) is True


def test_sqlite_commits_are_durable_before_they_are_acknowledged(app):
    with app.app_context():
        if db.engine.dialect.name != "sqlite":
            pytest.skip("PostgreSQL's durability is the server's synchronous_commit (on by default)")
        assert db.session.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL
        assert db.session.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"


class _WriteLock:
    """Another client holding the store's write lock (SQLite) or the record table's (PostgreSQL)."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        if self.app.config["DATABASE_URL"].startswith("sqlite"):
            self.connection = sqlite3.connect(self.app.config["DATABASE_URL"].removeprefix("sqlite:///"))
            self.connection.isolation_level = None
            self.connection.execute("BEGIN IMMEDIATE")
        else:
            with self.app.app_context():
                self.connection = write_engine().connect()
                self.connection.exec_driver_sql("LOCK TABLE search_transactions IN EXCLUSIVE MODE")
        return self

    def __exit__(self, *_exc):
        if isinstance(self.connection, sqlite3.Connection):
            self.connection.execute("COMMIT")
        else:
            self.connection.commit()
        self.connection.close()


def test_a_search_answers_while_a_writer_holds_the_lock_and_is_recorded_after(annotated):
    client = annotated.test_client()
    answers = []
    with _WriteLock(annotated):
        searching = threading.Thread(
            target=lambda: answers.append(client.get("/api/search_anns/C0000001/", buffered=True)), daemon=True
        )
        searching.start()
        searching.join(timeout=10)  # the record used to wait here for the lock (30 s on SQLite, for ever on PostgreSQL)
        assert not searching.is_alive(), "the search waited for the write lock"
        assert results(answers[0]) == CHEST
    annotated.extensions["gateway.search_log"].flush()
    with annotated.app_context():
        recorded = db.session.execute(select(search_transactions.c.id, search_transactions.c.num_results)).all()
    assert [(row.id, row.num_results) for row in recorded] == [(answers[0].get_json()["transactionId"], len(CHEST))]


def test_records_are_written_in_batches(annotated, monkeypatch):
    batches = []
    search_log = annotated.extensions["gateway.search_log"]
    real_write = search_log._write
    monkeypatch.setattr(search_log, "_write", lambda batch: (batches.append(len(batch)), real_write(batch)))
    client = annotated.test_client()
    with _WriteLock(annotated):
        for _search in range(20):
            assert client.get("/api/search_anns/C0000001/", buffered=True).status_code == 200
    search_log.flush()
    assert sum(batches) == 20 and len(batches) < 20  # what arrived while the lock was held went in one batch
    with annotated.app_context():
        assert db.session.execute(select(func.count()).select_from(search_transactions)).scalar_one() == 20
