"""The SQL store: one flask-sqlalchemy handle, connection settings per dialect, and the unit of work."""
import datetime
import json
import re
from contextlib import contextmanager

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ARRAY, Text, any_, bindparam, event, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

db = SQLAlchemy()

# The unit of work. Reads run in autocommit on both stores: each statement sees what was committed
# before it, and no read leaves a transaction open behind it (an open one pins an SQLite worker to an
# old snapshot; a streamed search holds its one snapshot while it is sent). A write runs in write_transaction(), which marks its connection: a write statement
# on any other connection is an error (UnitOfWorkError), never a silent commit on one store and a
# silent rollback on the other. SQLite takes the write lock at BEGIN IMMEDIATE (a deferred transaction
# that reads and then writes can fail with "database is locked" instead of waiting); PostgreSQL leaves
# autocommit for READ COMMITTED.
_WRITE_MARK = "gateway_write"
_WRITE_OPTIONS = {"sqlite": {_WRITE_MARK: True}, "postgresql": {_WRITE_MARK: True, "isolation_level": "READ COMMITTED"}}
_WRITE_STATEMENT = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE|MERGE|TRUNCATE|COPY)\b", re.IGNORECASE)


class UnitOfWorkError(RuntimeError):
    """A statement that writes ran outside write_transaction()."""


def utcnow():
    """The time stamps the schema keeps: UTC, without a time zone (TIMESTAMP columns)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# INSERT … ON CONFLICT DO NOTHING is spelled by each dialect's own insert()
DIALECT_INSERTS = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}


def insert_ignoring_conflicts(table):
    """INSERT INTO table … ON CONFLICT DO NOTHING, for the current store."""
    return DIALECT_INSERTS[db.engine.dialect.name](table).on_conflict_do_nothing()


def bulk_insert(session, table, columns, rows):
    """Insert many rows (tuples in `columns` order) at the driver's pace, in the session's transaction:
    COPY on PostgreSQL, the driver's executemany on SQLite. SQLAlchemy's own executemany costs more
    per row than the database does."""
    names = ", ".join(table.c[name].name for name in columns)  # names of the schema, never input
    connection = session.connection()
    driver_connection = connection.connection.driver_connection
    if connection.dialect.name == "postgresql":
        with driver_connection.cursor() as cursor, cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    else:
        placeholders = ", ".join("?" * len(columns))
        driver_connection.executemany(f"INSERT INTO {table.name} ({names}) VALUES ({placeholders})", rows)


def values_table(values):
    """A table of one column, `value`, holding the strings `values`, passed as ONE bind parameter: a
    PostgreSQL array unnested, a SQLite JSON array read by json_each."""
    values = list(values)
    if db.engine.dialect.name == "postgresql":
        # AS anon(value): PostgreSQL would name the column after the alias
        return func.unnest(bindparam(None, values, type_=ARRAY(Text))).table_valued("value").render_derived()
    return func.json_each(bindparam(None, json.dumps(values))).table_valued("value")


def in_values(expression, values):
    """`expression IN values` with the whole list as ONE bind parameter (a PostgreSQL array, a SQLite
    JSON array), so that thousands of values neither hit SQLite's parameter limit nor make a new
    statement for each list length."""
    values = list(values)
    if db.engine.dialect.name == "postgresql":
        return expression == any_(bindparam(None, values, type_=ARRAY(expression.type)))
    return expression.in_(select(values_table(values).c.value).scalar_subquery())


# Connections a worker may open: each of its threads (8) may hold two while a search starts (the
# request's session and the search's stream), and the search record's writer one.
_POOL = {"pool_size": 5, "max_overflow": 20}


def engine_options(database_url):
    if database_url.startswith("postgresql"):
        # No pool_pre_ping (a round trip per request): a connection the server dropped fails one
        # request and is then replaced; recycling bounds how long idle ones live.
        # No JIT: it compiles any plan whose estimated cost is high, for tens of milliseconds, and a
        # search's estimate runs high (PostgreSQL guesses a long CUI list matches many rows).
        return {"isolation_level": "AUTOCOMMIT", "pool_recycle": 1800, "connect_args": {"options": "-c jit=off"},
                **_POOL}
    return dict(_POOL)


def configure_engine(engine):
    @event.listens_for(engine, "before_cursor_execute")
    def _writes_need_a_unit_of_work(connection, _cursor, statement, _parameters, _context, _executemany):
        if not connection.get_execution_options().get(_WRITE_MARK) and _WRITE_STATEMENT.match(statement):
            raise UnitOfWorkError(f"a write outside write_transaction(): {statement[:60]!r}")

    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_connection, _record):
        # Hand transaction control to the "begin" hook below (pysqlite's own BEGIN is always deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it is acknowledged (NORMAL could lose the last commits in a
        # power cut, and bring back the rows of a delete whose files are gone already).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(connection):
        if connection.get_execution_options().get(_WRITE_MARK):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        # else autocommit: each read statement is its own transaction, as on PostgreSQL


@contextmanager
def write_transaction(single_statement=False):
    """The unit of work that writes: a transaction that commits on success and rolls back on error.

    Ends any read the request's session had going. On SQLite it holds the write lock from BEGIN.
    For one statement, which is atomic by itself, PostgreSQL stays in autocommit: BEGIN and COMMIT
    would be two more round trips.
    """
    db.session.rollback()
    dialect = db.engine.dialect.name
    options = {_WRITE_MARK: True} if single_statement and dialect == "postgresql" else _WRITE_OPTIONS[dialect]
    db.session.connection(execution_options=options)
    try:
        yield db.session
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise


def write_engine():
    """The app's engine with write_transaction()'s settings, for a connection of one's own that writes."""
    return db.engine.execution_options(**_WRITE_OPTIONS[db.engine.dialect.name])


def init_db():
    """Create the schema in an empty store, or upgrade one to this version's (gateway.migrations.upgrade).

    Returns the migrations applied, [(revision, message)]: empty when the store was at head already.
    """
    from .migrations import upgrade  # the migrations import this module, through the models

    return upgrade().applied
