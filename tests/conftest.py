"""Fixtures: every app-level test runs once on SQLite and once on PostgreSQL.

PostgreSQL comes from GATEWAY_TEST_POSTGRES_URL (default: the local server, user postgres); each test
run creates its own database there and drops it at the end. Where PostgreSQL cannot be reached its
half of the suite is skipped with the reason, unless GATEWAY_TEST_REQUIRE_POSTGRES=1 (as in CI),
which makes that a failure.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import sqlalchemy
from sqlalchemy import text
from urllib3 import encode_multipart_formdata

from gateway import create_app
from gateway.auth.users import create_user, grant
from gateway.db import db, init_db, write_engine
from gateway.projects import add_member, create_archive, create_project
from gateway.synthetic import make_instance

POSTGRES_ADMIN_URL = os.environ.get(
    "GATEWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("GATEWAY_TEST_REQUIRE_POSTGRES") == "1"

PASSWORD = "correct horse battery staple"


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
def postgres_server():
    server = PostgresServer(POSTGRES_ADMIN_URL)
    reason = server.reachable()
    if reason:
        if REQUIRE_POSTGRES:
            pytest.fail(reason + " (GATEWAY_TEST_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(reason)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """One database for the run; tests empty it between them."""
    return postgres_server.create_database()


def _empty_tables():
    tables = ", ".join(table.name for table in db.metadata.sorted_tables)
    with write_engine().begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request):
    """The store a test runs on: ('sqlite' | 'postgresql', database URL)."""
    if request.param == "sqlite":
        path = request.getfixturevalue("tmp_path") / "gateway.sqlite"
        return "sqlite", f"sqlite:///{path}"
    return "postgresql", request.getfixturevalue("postgres_url")


@pytest.fixture
def app(store, tmp_path):
    kind, url = store
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": url,
            "STORAGE_DIR": str(tmp_path / "storage"),
            "MAX_UPLOAD_MB": 4,
        }
    )
    with app.app_context():
        if not init_db() and kind == "postgresql":
            _empty_tables()
    yield app
    release_connections(app)


def release_connections(app):
    """Write the app's queued search records, then close what its pool holds: a test's database is
    dropped or emptied after it."""
    app.extensions["gateway.search_log"].flush()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


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


@pytest.fixture
def gunicorn(tmp_path):
    """Starts `gunicorn wsgi:app` (2 workers × 4 threads), or with `via_cli` `gateway serve` (its own
    defaults, then `serve_args`), on the store of an app; returns (base URL, log path)."""
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
        log_path = tmp_path / f"gunicorn-{port}.log"
        if via_cli:
            command = [executable, "serve", "--bind", f"127.0.0.1:{port}", *serve_args]
        else:  # gunicorn's control socket is one per machine user
            command = [executable, "-w", "2", "-k", "gthread", "--threads", "4", "-b", f"127.0.0.1:{port}",
                       "--no-control-socket", "wsgi:app"]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, f"gunicorn exited:\n{log_path.read_text()}"
            try:
                requests.get(f"{base_url}/api/v1/", timeout=5)
                return base_url, log_path
            except (requests.ConnectionError, requests.Timeout):  # not listening, or workers still booting
                assert time.monotonic() < deadline, f"gunicorn did not answer in 15 s:\n{log_path.read_text()}"
                time.sleep(0.1)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


@pytest.fixture
def annotated(app):
    """The app with the fixture dictionary and the eight fixture documents imported."""
    from gateway.annotations.importer import import_folder

    with app.app_context():
        load_fixture_dictionary()
        summary = import_folder(
            ANNOTATION_FIXTURES / "nlp", ANNOTATION_FIXTURES / "text", ANNOTATION_FIXTURES / "meta"
        )
        assert (summary.imported, summary.replaced, summary.skipped) == (8, 0, [])
    return app
