"""Alembic's environment: runs the migrations on the connection that gateway.migrations.upgrade() opened
(on the app's write engine), in one transaction."""
from alembic import context

from gateway.db import db
from gateway.migrations import SchemaError, comparison_options

connection = context.config.attributes["connection"]
applied = context.config.attributes["applied"]
sqlite = connection.dialect.name == "sqlite"


def record(step, **_context):
    applied.append((step.up_revision_id, step.up_revision.doc))


context.configure(
    connection=connection,
    target_metadata=db.metadata,
    render_as_batch=True,  # SQLite alters a table by copying it into a new one
    transactional_ddl=True,  # SQLite's DDL is transactional too: all of an upgrade commits, or none of it
    on_version_apply=record,
    **comparison_options(connection.dialect.name),  # for autogenerate, when a developer writes a migration
)

if sqlite:
    # Copying a table drops the old one, which would cascade to the rows that refer to it; SQLite only
    # switches the check outside a transaction, hence on the driver's connection before Alembic begins.
    connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
try:
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise SchemaError(f"the upgrade failed and changed nothing: it left rows whose references "
                                  f"are gone: {broken[:5]}")
finally:
    if sqlite:
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
