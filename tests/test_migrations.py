"""Migrations, through `gateway` (the console script's click group), on both stores: a store that the gateway
made before it had migrations, holding data of every kind, is upgraded and loses nothing; a store that is not at
head is refused with what to run. Each test has a database of its own: they change its schema.
"""
import json

import pytest
from click.testing import CliRunner
from flask.cli import ScriptInfo
from sqlalchemy import inspect, select, text

from gateway import create_app
from gateway.cli import main
from gateway.db import db, init_db, write_engine
from gateway.demo import DEMO_FORM, DEMO_PASSWORD, DEMO_USER, demo_uid, seed_demo
from gateway.migrations import schema_state, upgrade
from gateway.models import users
from tests.conftest import TEST_SETTINGS, credentials, release_connections

BASELINE = "0001"
UPGRADED_FROM_BASELINE = ("applied 0001 (the schema before migrations), 0002 (the word index of preferred names), "
                          "0003 (the report annotator: its queue, the documents it made, and concept synonyms)")
DEMO_SERIES = {"Project": "demo", "Archive": "main", "PatientID": "DEMO-001",
               "StudyInstanceUID": demo_uid(1, 1, 1), "SeriesInstanceUID": demo_uid(1, 1, 1, 1)}
DEMO = credentials(DEMO_USER, DEMO_PASSWORD)


@pytest.fixture(scope="module")
def baseline_tables(tmp_path_factory):
    """{table: its index names} of a store that the baseline alone built (SQLite's full-text tables among them)."""
    folder = tmp_path_factory.mktemp("baseline")
    app = create_app({**TEST_SETTINGS, "DATABASE_URL": f"sqlite:///{folder / 'store.sqlite'}",
                      "STORAGE_DIR": str(folder / "storage")})
    with app.app_context():
        upgrade(BASELINE)
        inspector = inspect(db.engine)
        tables = {name: {index["name"] for index in inspector.get_indexes(name)}
                  for name in inspector.get_table_names() if name != "alembic_version"}
    release_connections(app)
    return tables


def gateway(app, *args, input=None):
    """`gateway ARGS` on the app's store."""
    return CliRunner().invoke(main, list(args), input=input, obj=ScriptInfo(create_app=lambda: app))


def as_before_migrations(app, baseline_tables, also_missing=()):
    """Turn the app's store (at head) into one as the gateway left it before it had migrations: the
    baseline's tables (but `also_missing`, as in a store older than those) without the indexes that later
    migrations gave them, and no alembic_version."""
    kept = set(baseline_tables) - set(also_missing)
    with app.app_context(), write_engine().begin() as connection:
        for name in set(inspect(connection).get_table_names()) - kept:
            connection.exec_driver_sql(f"DROP TABLE {name}")  # names of the schema, not input
        for table in db.metadata.sorted_tables:
            for index in table.indexes if table.name in kept else ():
                if index.name not in baseline_tables[table.name]:
                    connection.exec_driver_sql(f"DROP INDEX {index.name}")


def fill(app):
    """Data of every kind: the demo's (users, projects, archives, instances, results, a form, the dictionary, a
    mapping, annotations), a form submission, searches and a failed sign-in."""
    with app.app_context():
        init_db()
        list(seed_demo())
    client = app.test_client()
    entry = {"quality": "good", "tb_suspected": False, "score": 7}
    submitted = client.post("/api/v1/patient/study/series/forms/add/", headers=DEMO,
                            data={**DEMO_SERIES, "FormName": DEMO_FORM, "FormSubmission": json.dumps(entry)})
    assert submitted.status_code == 200, submitted.json
    assert client.get("/api/v1/patient/get/", headers=credentials(DEMO_USER, "wrong")).status_code == 401
    answers = served(app)  # the searches are recorded
    app.extensions["gateway.search_log"].flush()
    return answers


def served(app):
    """What the app answers about the data of fill(), through both APIs."""
    client = app.test_client()

    def answer(path, **params):
        # read at once: a streamed answer holds its connection until it is read to the end
        with client.get(path, query_string=params, headers=DEMO) as response:
            assert response.status_code == 200, response.get_data(as_text=True)
            return response.get_data() if response.mimetype == "application/zip" else response.json

    answers = {
        call: answer(f"/api/v1/{call}", **DEMO_SERIES)
        for call in ("patient/get/", "series/get/", "dicom/get/", "patient/study/series/forms/list/")
    }
    answers["results"] = answer("/api/v1/series/results/", **DEMO_SERIES, Type="cad4tb", Results="CAD4TB 5,Finding")
    for query in ("nodule", "C0205076"):  # a word of a preferred name ("Lung nodule"), a CUI (Chest wall)
        found = answer(f"/api/search_anns/{query}")
        assert found["results"], query  # the search finds something to compare
        answers[query] = {key: value for key, value in found.items() if key != "transactionId"}
    return answers


def rows_of_every_table(app, table_names):
    with app.app_context():
        return {
            table.name: db.session.execute(select(table).order_by(*table.primary_key)).all()
            for table in db.metadata.sorted_tables
            if table.name in table_names
        }


def revision_of(app):
    with app.app_context():
        return schema_state().revision


def test_a_store_made_before_migrations_is_upgraded_and_keeps_every_row(fresh_app, baseline_tables):
    answers = fill(fresh_app)
    as_before_migrations(fresh_app, baseline_tables)
    rows = rows_of_every_table(fresh_app, baseline_tables)
    assert [name for name, table_rows in rows.items() if not table_rows] == []  # data of every kind

    upgraded = gateway(fresh_app, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.output.splitlines() == [
        "created tables: annotation_pref_words, concept_synonyms, report_documents, report_jobs",
        f"upgraded the database made before migrations to 0003: {UPGRADED_FROM_BASELINE}",
    ]
    assert rows_of_every_table(fresh_app, baseline_tables) == rows
    # the word index is built from the annotations the store held: "nodule" finds them as before
    assert served(fresh_app) == answers
    assert gateway(fresh_app, "db", "current").output == "0003 (head)\n"

    again = gateway(fresh_app, "db", "upgrade")
    assert (again.exit_code, again.output) == (0, "the database is at head already (0003)\n")
    assert revision_of(fresh_app) == "0003"


@pytest.mark.parametrize("command", [
    ("serve", "--bind", "127.0.0.1:1"),
    ("user", "grant", DEMO_USER, "all"),
    ("transactions", "list"),
    ("db", "current"),
])
def test_a_store_not_at_head_is_refused_with_what_to_run(fresh_app, baseline_tables, command):
    with fresh_app.app_context():
        init_db()
    as_before_migrations(fresh_app, baseline_tables)
    refused = gateway(fresh_app, *command)
    assert refused.exit_code == 1
    assert refused.stderr == ("Error: the database was made before the gateway had migrations (this version's "
                              "schema is revision 0003): run 'gateway db upgrade'\n")

    with fresh_app.app_context():
        init_db()
        with write_engine().begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = :older"), {"older": BASELINE})
    refused = gateway(fresh_app, *command)
    assert refused.exit_code == 1
    assert refused.stderr == ("Error: the database schema is at revision 0001, older than this version's 0003: "
                              "run 'gateway db upgrade'\n")


@pytest.mark.parametrize("command", [("serve", "--bind", "127.0.0.1:1"), ("db", "current"), ("db", "upgrade"),
                                     ("init-db",), ("demo",), ("user", "grant", DEMO_USER, "all")])
def test_a_store_from_a_newer_version_is_refused_and_left_alone(fresh_app, command):
    with fresh_app.app_context():
        init_db()
        with write_engine().begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = :newer"), {"newer": "9999"})
    refused = gateway(fresh_app, *command)
    assert refused.exit_code == 1
    assert refused.stderr == ("Error: the database schema is at revision 9999, which this version of the gateway "
                              "does not know (its newest is 0003): a newer version upgraded it; run that one\n")
    assert revision_of(fresh_app) == "9999"


def test_init_db_creates_the_schema_of_an_empty_store_which_nothing_else_will_use(fresh_app):
    for command in (("serve", "--bind", "127.0.0.1:1"), ("db", "current"), ("project", "create", "p")):
        refused = gateway(fresh_app, *command)
        assert refused.exit_code == 1
        assert refused.stderr == "Error: the database has no schema yet: run 'gateway init-db' first\n"
    created = gateway(fresh_app, "init-db")
    assert created.exit_code == 0, created.output
    with fresh_app.app_context():
        every_table = ", ".join(table.name for table in db.metadata.sorted_tables)
    assert created.output.splitlines() == [
        f"created tables: {every_table}",
        f"upgraded the empty database to 0003: {UPGRADED_FROM_BASELINE}",
    ]
    assert gateway(fresh_app, "db", "current").output == "0003 (head)\n"
    assert gateway(fresh_app, "init-db").output == "database already initialised\n"
    assert gateway(fresh_app, "project", "create", "p").exit_code == 0


def test_a_store_older_than_the_throttle_gets_the_tables_it_lacks(fresh_app, baseline_tables):
    with fresh_app.app_context():
        init_db()
    assert gateway(fresh_app, "user", "create", "frank", "--email", "f@example.org", input="s3cret\n").exit_code == 0
    as_before_migrations(fresh_app, baseline_tables, also_missing=["auth_failures"])
    upgraded = gateway(fresh_app, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.output.splitlines()[0] == "created tables: annotation_pref_words, auth_failures, concept_synonyms, report_documents, report_jobs"
    with fresh_app.app_context():
        assert db.session.execute(select(users.c.username)).scalars().all() == ["frank"]
    wrong = fresh_app.test_client().get("/api/v1/patient/get/", headers=credentials("frank", "wrong"))
    assert wrong.status_code == 401  # the throttle counts it where it could not before


def test_an_upgrade_that_fails_changes_nothing(fresh_app, baseline_tables):
    with fresh_app.app_context():
        init_db()
    as_before_migrations(fresh_app, baseline_tables)
    with fresh_app.app_context(), write_engine().begin() as connection:
        # in the way of migration 0002, after the baseline stamped the store
        connection.exec_driver_sql("CREATE TABLE annotation_pref_words (stray INTEGER)")
        tables = set(inspect(connection).get_table_names())
    failed = gateway(fresh_app, "db", "upgrade")
    assert failed.exit_code == 1
    assert failed.stderr.startswith("Error: the upgrade failed and changed nothing: ")
    assert "annotation_pref_words" in failed.stderr and len(failed.stderr.splitlines()) == 1
    with fresh_app.app_context():
        assert set(inspect(db.engine).get_table_names()) == tables  # no alembic_version either
        assert schema_state().revision is None


@pytest.mark.parametrize("empty_database", ["sqlite"], indirect=True)
def test_sqlite_checks_foreign_keys_again_after_an_upgrade(fresh_app):
    """The migrations run with SQLite's foreign key checks off (a table copied in an ALTER would otherwise
    cascade its drop); the connection they used goes back to the pool with the checks on."""
    with fresh_app.app_context():
        init_db()
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
