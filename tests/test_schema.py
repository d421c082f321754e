"""The models (gateway/models.py) are the one source of the schema: schema.sql is what they generate, and a
store that the migrations built from empty is exactly what they describe, on SQLite and PostgreSQL."""
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from gateway import models
from gateway.cli import main
from gateway.db import db, init_db, write_engine
from gateway.migrations import comparison_options, schema_sql

SCHEMA_SQL = Path(__file__).resolve().parent.parent / "schema.sql"
# What each store's own full-text DDL (models.FULL_TEXT_DDL) leaves in its catalogue
FULL_TEXT_OBJECTS = {
    "sqlite": "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'documents_fts%' ORDER BY name",
    "postgresql": "SELECT indexname, indexdef FROM pg_indexes WHERE indexname = 'ix_documents_fts'",
}


def test_schema_sql_is_what_the_models_generate():
    assert SCHEMA_SQL.read_text() == schema_sql("postgresql"), "run: gateway db schema > schema.sql"


def test_the_sqlite_ddl_builds_what_the_models_describe(tmp_path):
    printed = CliRunner().invoke(main, ["db", "schema", "--dialect", "sqlite"])
    assert printed.exit_code == 0, printed.output
    path = tmp_path / "from_ddl.sqlite"
    with sqlite3.connect(path) as connection:
        connection.executescript(printed.output)
    engine = create_engine(f"sqlite:///{path}")
    assert differences(engine) == []
    engine.dispose()


@pytest.fixture
def migrated(fresh_app):
    """An app whose store the migrations built from empty."""
    with fresh_app.app_context():
        init_db()
    return fresh_app


def differences(engine):
    """What Alembic's autogenerate finds between the store and the models (indexes and constraints too)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts=comparison_options(connection.dialect.name))
        return compare_metadata(context, db.metadata)


def full_text_objects(engine):
    with engine.connect() as connection:
        return connection.exec_driver_sql(FULL_TEXT_OBJECTS[engine.dialect.name]).all()


def test_a_store_migrated_from_empty_is_what_the_models_describe(migrated, tmp_path):
    # the full-text index, which no model describes, is the one that the models' DDL makes
    with migrated.app_context():
        assert differences(db.engine) == []
        dialect = db.engine.dialect.name
        from_migrations = full_text_objects(db.engine)
    if dialect == "sqlite":
        from_models = create_engine(f"sqlite:///{tmp_path / 'from_models.sqlite'}")
        db.metadata.create_all(from_models)
        assert from_migrations == full_text_objects(from_models) and len(from_migrations) >= 4
        from_models.dispose()
    else:
        assert from_migrations == [(models.POSTGRESQL_FTS_INDEX, "CREATE INDEX ix_documents_fts ON public.documents "
                                    "USING gin (to_tsvector('english'::regconfig, COALESCE(report_text, ''::text)))")]


def test_the_comparison_notices_what_the_models_do_not_describe(migrated):
    """The check above can fail: an index dropped, a column added, a type changed are each reported."""
    with migrated.app_context(), write_engine().begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_series_study")
        connection.exec_driver_sql("ALTER TABLE users ADD COLUMN nickname VARCHAR(20)")
        connection.exec_driver_sql("DROP TABLE auth_failures")
        connection.exec_driver_sql("CREATE TABLE auth_failures (scope VARCHAR(16), key TEXT, failures INTEGER, "
                                   "window_started_at TIMESTAMP NOT NULL, PRIMARY KEY (scope, key))")
    with migrated.app_context():
        found = differences(db.engine)
    kinds = {(change[0][0], change[0][2], change[0][3]) if isinstance(change, list) else (change[0], None, None)
             for change in found}
    assert ("add_index", None, None) in kinds  # ix_series_study, and auth_failures' window index
    assert ("remove_column", None, None) in kinds  # users.nickname
    assert ("modify_type", "auth_failures", "key") in kinds  # TEXT, not VARCHAR(255)
    assert ("modify_nullable", "auth_failures", "failures") in kinds
