"""schema.sql is the canonical DDL: the models in gateway/models.py must describe exactly the same tables.

Each store gets two databases, one made by running schema.sql and one by the models'
metadata.create_all(); their reflections must be identical.
"""
import pytest
import sqlalchemy
from sqlalchemy import inspect

from gateway import models  # noqa: F401  (registers the tables on db.metadata)
from gateway.db import db, schema_statements


@pytest.fixture(params=["sqlite", "postgresql"])
def two_databases(request, tmp_path):
    if request.param == "sqlite":
        return [f"sqlite:///{tmp_path / name}.sqlite" for name in ("from_ddl", "from_models")]
    server = request.getfixturevalue("postgres_server")
    return [server.create_database(), server.create_database()]


def describe(engine):
    """Everything about the tables that a difference between DDL and models could change."""
    inspector = inspect(engine)
    description = {}
    for table in sorted(inspector.get_table_names()):
        description[table] = {
            "columns": [
                (column["name"], _type_name(column["type"]), column["nullable"])
                for column in inspector.get_columns(table)
            ],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]),
                 (fk.get("options") or {}).get("ondelete"))
                for fk in inspector.get_foreign_keys(table)
            ),
            "unique": sorted(tuple(unique["column_names"]) for unique in inspector.get_unique_constraints(table)),
            "indexes": sorted(
                (index["name"], tuple(index["column_names"]), bool(index["unique"]))
                for index in inspector.get_indexes(table)
                if not index["name"].startswith("sqlite_autoindex")
            ),
            "checks": sorted(_normalise_sql(check["sqltext"]) for check in inspector.get_check_constraints(table)),
        }
    return description


def _type_name(column_type):
    if isinstance(column_type, sqlalchemy.types.NullType):  # FTS5's untyped columns
        return "untyped"
    name = column_type.compile(dialect=sqlalchemy.create_mock_engine("sqlite://", None).dialect)
    return name.replace("BIGSERIAL", "BIGINT")


def _normalise_sql(sql):
    """PostgreSQL prints a CHECK back in its own words: compare only the names and literals in it."""
    for noise in ("(", ")", "::text", "::character varying", "ARRAY[", "]", "= ANY", "IN", ",", "'"):
        sql = sql.replace(noise, " ")
    return " ".join(sorted(sql.split()))


def test_schema_sql_and_models_describe_the_same_tables(two_databases):
    from_ddl = sqlalchemy.create_engine(two_databases[0])
    from_models = sqlalchemy.create_engine(two_databases[1])
    try:
        with from_ddl.begin() as connection:
            for statement in schema_statements(from_ddl.dialect.name):
                connection.exec_driver_sql(statement)
        db.metadata.create_all(from_models)

        ddl_description = describe(from_ddl)
        # Beyond the models' tables, only SQLite's full-text table (and its shadow tables) exists.
        assert {name for name in ddl_description if not name.startswith("documents_fts")} == set(db.metadata.tables)
        assert ddl_description == describe(from_models)
    finally:
        from_ddl.dispose()
        from_models.dispose()


def test_a_column_missing_from_the_models_is_noticed(tmp_path):
    """The comparison above can fail: drop one column from the DDL and the descriptions differ."""
    statements = [
        statement.replace("    status_message TEXT,\n", "") for statement in schema_statements("sqlite")
    ]
    from_ddl = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'ddl.sqlite'}")
    from_models = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'models.sqlite'}")
    with from_ddl.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    db.metadata.create_all(from_models)
    assert describe(from_ddl)["series"] != describe(from_models)["series"]
