"""The benchmarks' stores: an SQLite file in a folder, or a database of its own on the local PostgreSQL server."""
import contextlib
import uuid
from pathlib import Path

import sqlalchemy

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def create_database(store, folder):
    """The URL of a new, empty database: for "sqlite" a file in `folder`, for "postgresql" a database with a
    fresh name (drop it with drop_database)."""
    if store == "sqlite":
        return f"sqlite:///{Path(folder) / 'bench.sqlite'}"
    name = f"gateway_bench_{uuid.uuid4().hex[:10]}"
    _administer(f'CREATE DATABASE "{name}"')
    return sqlalchemy.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(database_url):
    """Drop a PostgreSQL database that create_database made; an SQLite file goes with its folder."""
    url = sqlalchemy.make_url(database_url)
    if url.get_backend_name() == "postgresql":
        _administer(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


@contextlib.contextmanager
def throwaway_database(store, folder):
    """create_database's URL, dropped on exit."""
    database_url = create_database(store, folder)
    try:
        yield database_url
    finally:
        drop_database(database_url)


def analyse(database_url):
    """Fresh planner statistics, as a site's maintenance would keep them after a load."""
    engine = sqlalchemy.create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE")
    finally:
        engine.dispose()


def _administer(statement):
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(statement)
    finally:
        admin.dispose()
