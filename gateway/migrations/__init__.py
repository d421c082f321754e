"""Schema migrations (Alembic): where a store stands, upgrading it to this version's head, and the DDL.

Configured here rather than in an alembic.ini, so that they run from an installed package. They run on
the app's write engine (gateway.db.write_engine), in one transaction on both stores: an upgrade that fails
leaves the store as it was.
"""
import dataclasses
import functools
import itertools

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Float, Identity, create_mock_engine, inspect
from sqlalchemy.dialects.sqlite import REAL

from .. import models
from ..db import db, write_engine


class SchemaError(Exception):
    """The store's schema is not one this version of the gateway can use or upgrade."""


def _config(**attributes):
    config = Config()
    config.set_main_option("script_location", "gateway:migrations")
    config.attributes.update(attributes)
    return config


@functools.cache  # the migrations of this version: read once
def _scripts():
    return ScriptDirectory.from_config(_config())


@dataclasses.dataclass(frozen=True)
class SchemaState:
    revision: str | None  # the store's Alembic revision; None: none recorded
    has_tables: bool  # whether it holds the gateway's tables (without a revision: made before migrations)
    head: str  # the revision this version of the gateway needs
    known: bool  # whether this version knows the store's revision

    @property
    def at_head(self):
        return self.revision == self.head

    def describe(self):
        if self.revision is not None:
            return f"the database at revision {self.revision}"
        return "the database made before migrations" if self.has_tables else "the empty database"

    def problem(self):
        """Why the gateway cannot serve the store, and what to run; None when it is at head."""
        if self.at_head:
            return None
        if not self.known:
            return (f"the database schema is at revision {self.revision}, which this version of the gateway does "
                    f"not know (its newest is {self.head}): a newer version upgraded it; run that one")
        if self.revision is None and not self.has_tables:
            return "the database has no schema yet: run 'gateway init-db' first"
        if self.revision is None:
            return (f"the database was made before the gateway had migrations (this version's schema is "
                    f"revision {self.head}): run 'gateway db upgrade'")
        return (f"the database schema is at revision {self.revision}, older than this version's {self.head}: "
                f"run 'gateway db upgrade'")


def schema_state():
    with db.engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
        has_tables = inspect(connection).has_table(models.users.name)
    scripts = _scripts()
    try:
        known = revision is None or scripts.get_revision(revision) is not None
    except CommandError:  # alembic's "no such revision"
        known = False
    return SchemaState(revision, has_tables, scripts.get_current_head(), known)


@dataclasses.dataclass(frozen=True)
class Upgrade:
    before: SchemaState
    applied: list  # (revision, message) of each migration run, in order
    created_tables: list  # the models' tables that the upgrade created


def upgrade(target="head"):
    """Upgrade the store to head (or to the revision `target`): from empty, from a store made before
    migrations (the baseline creates the tables it lacks, and stamps it), or from an earlier revision.
    Raises SchemaError for a revision this version does not know."""
    before = schema_state()
    if not before.known:
        raise SchemaError(before.problem())
    if target == "head" and before.at_head:
        return Upgrade(before, [], [])
    tables_before = set(inspect(db.engine).get_table_names())
    applied = []
    with write_engine().connect() as connection:
        command.upgrade(_config(connection=connection, applied=applied), target)
    created = [table.name for table in db.metadata.sorted_tables if table.name not in tables_before]
    return Upgrade(before, applied, created)


def _compare_type(_context, _inspected_column, _metadata_column, inspected_type, metadata_type):
    # SQLite reads DOUBLE PRECISION back as REAL, its one storage class of floats
    if isinstance(inspected_type, REAL) and isinstance(metadata_type, Float):
        return False
    return None  # Alembic's own comparison


def _sqlite_compare_server_default(_context, _inspected_column, _metadata_column, _inspected, metadata_default,
                                   _rendered):
    # SQLite has no identity columns: its INTEGER PRIMARY KEY numbers itself
    return False if isinstance(metadata_default, Identity) else None


def _include_object(_object, name, type_, reflected, _compare_to):
    # The full-text index of either store is made by DDL of its own, not by a model (models.FULL_TEXT_DDL).
    full_text = (type_ == "table" and name.startswith(models.SQLITE_FTS_TABLE)) or name == models.POSTGRESQL_FTS_INDEX
    return not (reflected and full_text)


def comparison_options(dialect_name):
    """The options of context.configure under which the models and a migrated store compare equal."""
    return {
        "compare_type": _compare_type,
        # Alembic's own comparison on PostgreSQL: a function of ours would fail on its identity columns
        "compare_server_default": _sqlite_compare_server_default if dialect_name == "sqlite" else True,
        "include_object": _include_object,
    }


SCHEMA_DIALECTS = {"postgresql": "postgresql+psycopg://", "sqlite": "sqlite://"}


def schema_sql(dialect_name):
    """The DDL that creates the models' schema on an empty store of the dialect, as one SQL script."""
    statements = []

    def record(statement, *_multiparams, **_params):
        sql = str(statement.compile(dialect=engine.dialect)).strip()
        statements.append("\n".join(line.rstrip().replace("\t", "    ") for line in sql.splitlines()) + ";\n")

    engine = create_mock_engine(SCHEMA_DIALECTS[dialect_name], record)
    db.metadata.create_all(engine, checkfirst=False)
    # A table's indexes come from a set, in no fixed order: sort each table's run of them by name.
    ordered = []
    for is_index, run in itertools.groupby(statements, key=lambda sql: sql.startswith("CREATE INDEX")):
        ordered.extend(sorted(run) if is_index else run)
    header = (f"-- The gateway's schema for {dialect_name}, generated from gateway/models.py by\n"
              f"-- `gateway db schema --dialect {dialect_name}`: do not edit. Stores are created and upgraded\n"
              "-- by the migrations (`gateway db upgrade`), not from this file.\n")
    return header + "\n" + "\n".join(ordered)
