"""Fixtures: every app-level test runs once on SQLite and once on PostgreSQL.

A test marked store_independent (answered before any statement reaches the store: a refused request,
a route that reads nothing) runs on SQLite alone.

PostgreSQL comes from GATEWAY_TEST_POSTGRES_URL (default: the local server, user postgres); each test
run creates its own database there and drops it at the end. Where PostgreSQL cannot be reached its
half of the suite is skipped with the reason, unless GATEWAY_TEST_REQUIRE_POSTGRES=1 (as in CI),
which makes that a failure.

The schema is made once per run and store (init_db runs the migrations, which take a while): an SQLite
test gets a copy of a template file, a PostgreSQL test the run's database emptied. Passwords are hashed
at the least scrypt cost (tests/test_auth.py checks the real one).
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import sqlalchemy
from flask import Flask
from sqlalchemy import event, func, select, text
from urllib3 import encode_multipart_formdata

from gateway import create_app
from gateway.auth.credentials import SCRYPT_COST_FOR_TESTS
from gateway.auth.users import create_user, grant
from gateway.db import db, init_db, write_engine
from gateway.projects import add_member, create_archive, create_project
from gateway.synthetic import make_instance

POSTGRES_ADMIN_URL = os.environ.get(
    "GATEWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("GATEWAY_TEST_REQUIRE_POSTGRES") == "1"

PASSWORD = "correct horse battery staple"

# The settings of every test's app besides its store: cheap password hashes, a small upload limit.
TEST_SETTINGS = {"TESTING": True, "PASSWORD_SCRYPT_COST": SCRYPT_COST_FOR_TESTS, "MAX_UPLOAD_MB": 4}


class PostgresServer:
    """Creates throwaway databases on the test PostgreSQL server."""

    def __init__(self, admin_url):
        self.admin_url = sqlalchemy.make_url(admin_url)
        self.engine = sqlalchemy.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self.created = []

    def reachable(self):
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return None
        except Exception as error:  # any reason to be unreachable is reported the same way
            return f"PostgreSQL at {self.admin_url.render_as_string(hide_password=True)} unreachable: {error}"

    def create_database(self):
        name = f"gateway_test_{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self):
        with self.engine.connect() as connection:
            for name in self.created:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


@pytest.fixture(scope="session")
def postgres_server(pytestconfig):
    server = PostgresServer(POSTGRES_ADMIN_URL)
    reason = server.reachable()
    if reason:
        if REQUIRE_POSTGRES:
            pytest.fail(reason + " (GATEWAY_TEST_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(reason)
    # After the session, not in the last test's teardown: DROP DATABASE waits for a checkpoint, which on
    # a busy disk takes longer than a test may (its timeout).
    pytestconfig.add_cleanup(server.drop_all)
    return server


def build_schema(url, storage_dir):
    """Give the empty store at `url` this version's schema, as `gateway init-db` does."""
    app = create_app({**TEST_SETTINGS, "DATABASE_URL": url, "STORAGE_DIR": str(storage_dir)})
    with app.app_context():
        init_db()
    release_connections(app)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    """An SQLite file with the schema, which each test copies."""
    folder = tmp_path_factory.mktemp("sqlite-template")
    build_schema(f"sqlite:///{folder / 'gateway.sqlite'}", folder / "storage")
    return folder / "gateway.sqlite"


# What a test that changes the schema changes: the objects of the public schema and their definitions,
# and whether it records a migration (the revision itself is read when it does).
_SCHEMA_FINGERPRINT = """
SELECT to_regclass('public.alembic_version') IS NOT NULL, md5(string_agg(item, ',' ORDER BY item)) FROM (
    SELECT format('%s %s', relname, relkind) FROM pg_class WHERE relnamespace = 'public'::regnamespace
    UNION ALL
    SELECT format('%s.%s %s %s %s', attrelid::regclass, attname, format_type(atttypid, atttypmod), attnotnull,
                  pg_get_expr(adbin, adrelid))
    FROM pg_attribute JOIN pg_class ON pg_class.oid = attrelid
    LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
    WHERE relnamespace = 'public'::regnamespace AND attnum > 0 AND NOT attisdropped
    UNION ALL
    SELECT format('%s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
    WHERE connamespace = 'public'::regnamespace
    UNION ALL
    SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'
    UNION ALL
    SELECT pg_get_triggerdef(pg_trigger.oid) FROM pg_trigger JOIN pg_class ON pg_class.oid = tgrelid
    WHERE relnamespace = 'public'::regnamespace AND NOT tgisinternal
) AS objects(item)
"""
# A table that holds more rows is emptied by TRUNCATE, the others by DELETE: TRUNCATE makes new files
# for a table and its indexes (ten times slower than DELETE here), while DELETE fires the foreign keys'
# triggers row by row with plans made when the tables were small (minutes for 80,000 documents).
_DELETE_AT_MOST = 1000
# Identities start again, as in a new store.
_RESTART_IDENTITIES = """
SELECT setval(seqrelid::regclass, seqstart, false) FROM pg_sequence JOIN pg_class ON pg_class.oid = seqrelid
WHERE relnamespace = 'public'::regnamespace
"""


class PostgresTestDatabase:
    """The run's PostgreSQL database: the schema made once, the tables emptied before each test, and the
    schema made again where a test changed it (dropped a table, downgraded the store)."""

    def __init__(self, url, storage_dir):
        self.url, self.storage_dir = url, storage_dir
        # Fail, naming what holds the lock, rather than wait for a connection a test left open.
        self.engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT",
                                               connect_args={"options": "-c lock_timeout=10s"})
        build_schema(url, storage_dir)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self):
        with self.engine.connect() as connection:
            has_revision, objects = connection.exec_driver_sql(_SCHEMA_FINGERPRINT).one()
            if not has_revision:
                return objects, None
            return objects, connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()

    def empty(self):
        if self._fingerprint() != self.fingerprint:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            build_schema(self.url, self.storage_dir)
            self.fingerprint = self._fingerprint()
        tables = [table.name for table in reversed(db.metadata.sorted_tables)]  # children first
        large = " UNION ALL ".join(f"SELECT '{name}' WHERE EXISTS (SELECT FROM {name} OFFSET {_DELETE_AT_MOST})"
                                   for name in tables)
        try:
            with self.engine.connect() as connection:
                truncated = connection.exec_driver_sql(large).scalars().all()
                statements = [f"TRUNCATE {', '.join(truncated)} CASCADE"] if truncated else []
                statements += [f"DELETE FROM {name}" for name in tables if name not in truncated]
                connection.exec_driver_sql(";".join([*statements, _RESTART_IDENTITIES]))
        except sqlalchemy.exc.OperationalError as error:
            with self.engine.connect() as connection:
                holders = connection.exec_driver_sql(
                    "SELECT pid, state, xact_start, query FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()").all()
            raise RuntimeError(f"could not empty the test database: {error.orig}; its other sessions: {holders}")

    def close(self):
        self.engine.dispose()


@pytest.fixture(scope="session")
def postgres_database(postgres_server, tmp_path_factory):
    database = PostgresTestDatabase(postgres_server.create_database(), tmp_path_factory.mktemp("postgres-schema"))
    yield database
    database.close()


def pytest_generate_tests(metafunc):
    """A test that uses the store runs on each store, or when marked store_independent on SQLite alone."""
    if "store" in metafunc.fixturenames:
        independent = metafunc.definition.get_closest_marker("store_independent")
        metafunc.parametrize("store", ["sqlite"] if independent else ["sqlite", "postgresql"], indirect=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test marked store_independent fails if it sends the store a statement (then it belongs on both)."""
    if item.get_closest_marker("store_independent") is None:
        return (yield)
    statements = []

    def record(_connection, _cursor, statement, *_arguments):
        statements.append(statement)

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", record)
    try:
        result = yield
        for value in item.funcargs.values():  # its searches' records, which a thread writes
            if isinstance(value, Flask):
                value.extensions["gateway.search_log"].flush()
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", record)
    if statements:
        pytest.fail(f"marked store_independent, yet sent the store {len(statements)} statements, the first: "
                    f"{statements[0][:200]!r}", pytrace=False)
    return result


@pytest.fixture
def store(request):
    """The store a test runs on, with the schema and empty: ('sqlite' | 'postgresql', database URL)."""
    if request.param == "sqlite":
        path = request.getfixturevalue("tmp_path") / "gateway.sqlite"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return "sqlite", f"sqlite:///{path}"
    database = request.getfixturevalue("postgres_database")
    database.empty()
    return "postgresql", database.url


@pytest.fixture
def app(store, tmp_path):
    _kind, url = store
    app = create_app({**TEST_SETTINGS, "DATABASE_URL": url, "STORAGE_DIR": str(tmp_path / "storage")})
    yield app
    release_connections(app)


def release_connections(app):
    """Write the app's queued search records, then close what its pool holds: a test's database is
    dropped or emptied after it."""
    app.extensions["gateway.search_log"].flush()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture(scope="session")
def migrations_database(postgres_server):
    """A PostgreSQL database for the tests of empty stores, emptied for each (a new one each takes seconds)."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    """The URL of an empty database of the test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    url = request.getfixturevalue("migrations_database")
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url


@pytest.fixture
def fresh_app(empty_database, tmp_path):
    """An app on an empty store (no schema yet)."""
    app = create_app({**TEST_SETTINGS, "DATABASE_URL": empty_database, "STORAGE_DIR": str(tmp_path / "storage")})
    yield app
    release_connections(app)

@pytest.fixture
def seeded(app):
    """Two projects with an archive each; alice belongs to 'alpha' (upload right), bob to 'beta'."""
    with app.app_context():
        for username in ("alice", "bob", "carol"):
            create_user(username, f"{username}@example.org", PASSWORD)
            grant(username, ["all"])
        create_project("alpha")
        create_project("beta")
        create_project("eyes", "retina")
        for project in ("alpha", "beta", "eyes"):
            create_archive(project, "main")
        create_archive("alpha", "second")
        add_member("alpha", "alice", can_upload=True)
        add_member("eyes", "alice", can_upload=True)
        add_member("beta", "bob", can_upload=True)
        add_member("alpha", "carol", can_upload=False)
    return app


def credentials(username="alice", password=PASSWORD):
    return {"X-USERNAME": username, "X-PASSWORD": password}


def assert_error(response, status, error_type, suberror_type):
    """The archive API's error body: JSON with exactly error_type, suberror_type and a message."""
    body = response.get_json()
    assert response.status_code == status, body
    assert response.mimetype == "application/json", response.get_data(as_text=True)
    assert set(body) == {"error_type", "suberror_type", "message"}
    assert (body["error_type"], body["suberror_type"]) == (error_type, suberror_type)
    assert isinstance(body["message"], str) and body["message"]


class ApiClient:
    """The Flask test client with the archive API's conventions."""

    def __init__(self, client, username="alice"):
        self.client = client
        self.headers = credentials(username)

    def get(self, call, headers=None, **params):
        return self.client.get(f"/api/v1/{call}", query_string=params, headers=headers or self.headers)

    def post(self, call, fields, headers=None):
        """POST multipart form data encoded as `requests` encodes it; a file is a (filename, bytes) tuple.

        (werkzeug's test client writes an empty file part without the line break that belongs to the
        next boundary, which real clients and the gateway's parser do not accept.)
        """
        body, content_type = encode_multipart_formdata(fields)
        return self.client.post(f"/api/v1/{call}", data=body, content_type=content_type,
                                headers=headers or self.headers)

    def upload(self, data, project="alpha", archive="main", filename="image.dcm", headers=None):
        fields = {"Project": project, "Archive": archive, "file": (filename, data)}
        return self.post("instance/upload/", fields, headers=headers)


@pytest.fixture
def api(seeded):
    return ApiClient(seeded.test_client())


@pytest.fixture
def api_for(seeded):
    return lambda username: ApiClient(seeded.test_client(), username)


def instance(number=1, patient="PAT-1", study=1, series=1, **options):
    """A synthetic instance whose UIDs derive from the numbers given."""
    study_uid = f"1.2.826.0.1.3680043.8.498.99.{patient[-1]}.{study}"
    series_uid = f"{study_uid}.{series}"
    return make_instance(patient, study_uid, series_uid, f"{series_uid}.{number}", **options)


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def gunicorn_servers(log_dir):
    """Starts `gunicorn wsgi:app` (2 workers × 4 threads), or with `via_cli` `gateway serve` (its own
    defaults, then `serve_args`), on the store of an app; returns (base URL, log path). Stops them at the
    end of the block: a context manager, so that a fixture of any scope can hold servers."""
    processes = []

    def start(app, extra_env=None, via_cli=False, serve_args=()):
        program = "gateway" if via_cli else "gunicorn"
        executable = shutil.which(program, path=os.path.dirname(sys.executable))
        assert executable, f"{program} is not installed beside the test interpreter"
        # Only the settings under test: the caller's GATEWAY_* variables must not change the server.
        env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
        env.update(GATEWAY_DATABASE_URL=app.config["DATABASE_URL"], GATEWAY_STORAGE_DIR=app.config["STORAGE_DIR"])
        env.update(extra_env or {})
        with app.app_context():
            db.engine.dispose()  # the server's processes must not inherit pooled connections
        port = _free_port()
        log_path = log_dir / f"gunicorn-{port}.log"
        if via_cli:
            command = [executable, "serve", "--bind", f"127.0.0.1:{port}", *serve_args]
        else:  # gunicorn's control socket is one per machine user
            command = [executable, "-w", "2", "-k", "gthread", "--threads", "4", "-b", f"127.0.0.1:{port}",
                       "--no-control-socket", "wsgi:app"]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        base_url = f"http://127.0.0.1:{port}"
        wait_until_serving(process, base_url, log_path)
        return base_url, log_path

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def gunicorn(tmp_path):
    with gunicorn_servers(tmp_path) as start:
        yield start


def wait_until_serving(process, base_url, log_path, seconds=15):
    """Returns once the server started as `process` answers at base_url; fails with its log when it
    exits or does not answer within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"the server exited:\n{log_path.read_text()}"
        try:
            requests.get(f"{base_url}/api/v1/", timeout=5)
            return
        except (requests.ConnectionError, requests.Timeout):  # not listening, or workers still booting
            assert time.monotonic() < deadline, f"the server did not answer in {seconds} s:\n{log_path.read_text()}"
            time.sleep(0.1)


VENV_BIN = Path(sys.executable).parent


def clean_environment():
    """This process's environment without GATEWAY_* settings, which must not change what a block does."""
    return {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}


class DemoStores:
    """The demo store of one kind (sqlite | postgresql) and a second one for the blocks that make what can be
    made only once, each seeded by `gateway demo`, and the servers that `gateway serve` runs on the first, one
    per set of extra settings."""

    def __init__(self, request, kind, folder, start_server):
        self.request, self.kind, self.folder, self.start_server = request, kind, folder, start_server
        self.stores = 0
        self.env = self.new_store()
        self.app = create_app({"DATABASE_URL": self.env["GATEWAY_DATABASE_URL"],
                               "STORAGE_DIR": self.env["GATEWAY_STORAGE_DIR"]})
        self.servers = {}
        self._second_store = None

    def second_store(self):
        if self._second_store is None:
            self._second_store = self.new_store()
        return self._second_store

    def new_store(self):
        """The settings of a new store that `gateway demo` has seeded, as `make serve` seeds one."""
        self.stores += 1
        if self.kind == "sqlite":
            url = f"sqlite:///{self.folder / f'gateway-{self.stores}.sqlite'}"
        else:
            url = self.request.getfixturevalue("postgres_server").create_database()
        env = {"GATEWAY_DATABASE_URL": url, "GATEWAY_STORAGE_DIR": str(self.folder / f"storage-{self.stores}")}
        seeded = subprocess.run([VENV_BIN / "gateway", "demo"], env={**clean_environment(), **env},
                                capture_output=True, text=True, timeout=120)
        assert seeded.returncode == 0, seeded.stdout + seeded.stderr
        return env

    def server(self, extra_env=()):
        """The base URL of `gateway serve` on the demo store, with `extra_env` settings besides."""
        if extra_env not in self.servers:
            self.servers[extra_env], _log = self.start_server(self.app, dict(extra_env), via_cli=True)
        return self.servers[extra_env]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def demo(request, tmp_path_factory):
    """The demo of `make serve` (`gateway demo`, then `gateway serve`) on each store, shared by a module's tests."""
    folder = tmp_path_factory.mktemp(f"demo-{request.param}")
    with gunicorn_servers(folder) as start_server:
        demo = DemoStores(request, request.param, folder, start_server)
        yield demo
    with demo.app.app_context():
        db.engine.dispose()


ANNOTATION_FIXTURES = Path(__file__).parent / "fixtures" / "annotations"

# A hand-made dictionary: (cui, pref, semantic group) and (parent, child) narrower relations.
FIXTURE_CONCEPTS = [
    ("C0000001", "Chest", "ANAT"),
    ("C0000002", "Chest wall", "ANAT"),
    ("C0000003", "Lung", "ANAT"),
    ("C0000004", "Rib", "ANAT"),
    ("C0000005", "First rib", "ANAT"),
    ("C0000006", "Lung apex", "ANAT"),
    ("C0000010", "Chest pain", "DISO"),
    ("C0000011", "Pleuritic chest pain", "DISO"),
    ("C0000020", "Cycle A", "DISO"),
    ("C0000021", "Cycle B", "DISO"),
    ("C0000030", "Pneumonia", "DISO"),
    ("C0000031", "Lung lesion", "DISO"),
]
FIXTURE_RELATIONS = [
    ("C0000001", "C0000002"),
    ("C0000001", "C0000003"),
    ("C0000001", "C0000010"),
    ("C0000002", "C0000004"),
    ("C0000004", "C0000005"),
    ("C0000010", "C0000011"),
    ("C0000003", "C0000031"),
    ("C0000031", "C0000006"),
    ("C0000020", "C0000021"),
    ("C0000021", "C0000020"),
]
FIXTURE_SNOMED = [("233604007", "C0000030"), ("78904004", "C0000002")]


def load_fixture_dictionary():
    from gateway.models import concept_relations, concept_snomed, concept_types, concepts

    with write_engine().begin() as connection:
        connection.execute(concepts.insert(), [{"cui": cui, "pref": pref} for cui, pref, _ in FIXTURE_CONCEPTS])
        connection.execute(
            concept_types.insert(),
            [{"cui": cui, "sty": group.title(), "tui": None, "semantic_group": group} for cui, _, group in FIXTURE_CONCEPTS],
        )
        connection.execute(concept_relations.insert(), [{"parent_cui": p, "child_cui": c} for p, c in FIXTURE_RELATIONS])
        connection.execute(concept_snomed.insert(), [{"snomed_id": s, "cui": c} for s, c in FIXTURE_SNOMED])


def table_rows():
    """Every row of the models' tables, by table, for the tables that hold any (in the models' order)."""
    with db.engine.connect() as connection:
        rows = {table: connection.execute(select(table)).mappings().all() for table in db.metadata.sorted_tables}
    return {table: [dict(row) for row in found] for table, found in rows.items() if found}


def restore_rows(rows):
    """Insert what table_rows() read into an empty store; identities go on after the highest id, as
    after the inserts that made those rows. SQLite's triggers fill its full-text index."""
    with write_engine().begin() as connection:
        for table, table_rows in rows.items():
            connection.execute(table.insert(), table_rows)
            identity = table.autoincrement_column
            if identity is not None and connection.dialect.name == "postgresql":
                sequence = func.pg_get_serial_sequence(table.name, identity.name)
                connection.execute(select(func.setval(sequence, select(func.max(identity)).scalar_subquery())))


@pytest.fixture(scope="session")
def annotated_rows():
    """The rows that the fixture import left, by store: the first test to ask imports, the others restore."""
    return {}


@pytest.fixture
def annotated(app, store, annotated_rows):
    """The app with the fixture dictionary and the eight fixture documents imported: by the importer in a
    run's first test on each store, from the rows it left in the others (an import takes a while)."""
    from gateway.annotations.importer import import_folder

    kind = store[0]
    with app.app_context():
        if kind in annotated_rows:
            restore_rows(annotated_rows[kind])
            return app
        load_fixture_dictionary()
        summary = import_folder(
            ANNOTATION_FIXTURES / "nlp", ANNOTATION_FIXTURES / "text", ANNOTATION_FIXTURES / "meta"
        )
        assert (summary.imported, summary.replaced, summary.skipped) == (8, 0, [])
        annotated_rows[kind] = table_rows()
    return app
