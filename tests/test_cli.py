"""The admin command line, run through Flask's CLI runner against both stores."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from gateway import create_app
from gateway.annotations.mappings import get_mapping
from gateway.annotations.query import parse_query, search_annotations
from gateway.annotations.store import doc_detail, document_uids, linked_instances
from gateway.cli import main
from gateway.db import db
from gateway.demo import DEMO_MAPPING, DEMO_PASSWORD, DEMO_USER, demo_uid
from gateway.models import annotations, concepts, documents, projects
from tests.conftest import ANNOTATION_FIXTURES, credentials, instance, release_connections
from tests.test_results import PNG
from tests.test_results import add as add_result
from tests.test_results import get as get_results
from tests.test_upload import stored_keys
from tests.test_v1_calls import SERIES_PARAMS


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def run(*args, input=None):
        return runner.invoke(args=list(args), input=input)

    return run


def test_init_db_is_idempotent(cli):
    result = cli("init-db")
    assert result.exit_code == 0
    assert result.output.strip() == "database already initialised"


GATEWAY_COMMANDS = ["annotate", "annotations", "archive", "concepts", "db", "demo", "form", "init-db", "mappings",
                    "project", "results", "series", "serve", "storage", "transactions", "user", "worker"]


def test_gateway_help_lists_only_the_gateways_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    options = result.output.split("Options:")[1].split("Commands:")[0]
    assert options.split() == ["--help", "Show", "this", "message", "and", "exit."]  # no --app, --env-file, --debug
    commands = result.output.split("Commands:")[1].splitlines()
    assert [line.split()[0] for line in commands if line.strip()] == GATEWAY_COMMANDS  # no run, shell, routes


def test_gateway_runs_its_commands_on_the_store_its_variables_name(app):
    environment = {"GATEWAY_DATABASE_URL": app.config["DATABASE_URL"], "GATEWAY_STORAGE_DIR": app.config["STORAGE_DIR"]}
    result = CliRunner().invoke(main, ["project", "create", "from-env"], env=environment)
    assert (result.exit_code, result.output) == (0, "project from-env (cad4tb) created\n")
    with app.app_context():
        assert db.session.execute(select(projects.c.name)).scalars().all() == ["from-env"]
    bad = CliRunner().invoke(main, ["project", "create", "other"], env={**environment, "GATEWAY_MAX_UPLOAD_MB": "lots"})
    assert (bad.exit_code, bad.stderr) == (1, "Error: GATEWAY_MAX_UPLOAD_MB must be a number, not 'lots'\n")


def test_admin_commands_set_up_a_working_account(app, cli):
    assert cli("user", "create", "frank", "--email", "frank@example.org", input="s3cret pass\n").exit_code == 0
    assert cli("user", "grant", "frank", "api_get_patient", "api_instance_upload").exit_code == 0
    assert cli("project", "create", "gamma", "--kind", "retina").exit_code == 0
    assert cli("archive", "create", "gamma", "main").exit_code == 0
    assert cli("project", "add-member", "gamma", "frank", "--upload").exit_code == 0

    client = app.test_client()
    headers = credentials("frank", "s3cret pass")
    response = client.get("/api/v1/patient/get/", query_string={"Project": "gamma", "Archive": "main", "PatientID": "x"},
                          headers=headers)
    assert (response.status_code, response.json["suberror_type"]) == (404, "patient_not_found")
    # the password is one line of stdin, spaces included, and never on the command line
    assert client.get("/api/v1/patient/get/", headers=credentials("frank", "s3cret")).status_code == 401


def test_set_password_takes_effect_at_once(app, cli):
    assert cli("user", "create", "gina", "--email", "g@example.org", input="first\n").exit_code == 0
    assert cli("user", "grant", "gina", "all").exit_code == 0
    client = app.test_client()
    assert client.get("/api/v1/patient/get/", headers=credentials("gina", "first")).status_code == 400
    assert cli("user", "set-password", "gina", input="second\n").exit_code == 0
    # the old password was verified (and cached) a moment ago: it must not be accepted any more
    assert client.get("/api/v1/patient/get/", headers=credentials("gina", "first")).status_code == 401
    assert client.get("/api/v1/patient/get/", headers=credentials("gina", "second")).status_code == 400


@pytest.mark.parametrize(
    "args, input, reason",
    [
        (("user", "create", "x", "--email", "x@example.org"), "", "no password on standard input"),
        (("user", "grant", "nobody", "all"), None, "no user 'nobody'"),
        (("user", "grant", "demo", "api_fly"), None, "unknown permission 'api_fly'"),
        (("project", "create", "p", "--kind", "mri"), None, "Invalid value for '--kind'"),
        (("archive", "create", "no-project", "main"), None, "no project 'no-project'"),
        (("project", "add-member", "no-project", "demo"), None, "no project 'no-project'"),
    ],
)
def test_bad_input_exits_non_zero_with_a_reason(cli, args, input, reason):
    if args[:3] == ("user", "grant", "demo"):
        assert cli("user", "create", "demo", "--email", "d@example.org", input="pw\n").exit_code == 0
    result = cli(*args, input=input)
    assert result.exit_code != 0
    assert reason in result.output


def test_duplicates_are_refused(cli):
    assert cli("project", "create", "delta").exit_code == 0
    result = cli("project", "create", "delta")
    assert result.exit_code == 1 and "exists already" in result.output
    assert cli("archive", "create", "delta", "main").exit_code == 0
    assert cli("archive", "create", "delta", "main").exit_code == 1


def test_demo_seeds_idempotently_and_the_readme_examples_work(app, cli):
    first = cli("demo")
    assert first.exit_code == 0, first.output
    second = cli("demo")
    assert second.exit_code == 0 and "created" not in second.output

    client = app.test_client()
    headers = credentials(DEMO_USER, DEMO_PASSWORD)
    params = {"Project": "demo", "Archive": "main", "PatientID": "DEMO-001"}
    patient = client.get("/api/v1/patient/get/", query_string=params, headers=headers)
    assert patient.json == {"PatientID": "DEMO-001", "PatientName": "Doe^Jane", "PatientSex": "F",
                            "PatientBirthDate": "1970-04-12"}
    series = client.get(
        "/api/v1/patient/study/series/list/",
        query_string={**params, "StudyInstanceUID": demo_uid(1, 1, 1)},
        headers=headers,
    )
    assert [item["SeriesInstanceUID"] for item in series.json] == [demo_uid(1, 1, 1, 1), demo_uid(1, 1, 1, 2)]
    retina = client.get(
        "/api/v1/patient/study/series/list/",
        query_string={"Project": "retina-demo", "Archive": "main", "PatientID": "RET-001",
                      "StudyInstanceUID": demo_uid(2, 1, 1)},
        headers=headers,
    )
    # a retina series is named by its instance's SOPInstanceUID
    assert [item["SeriesInstanceUID"] for item in retina.json] == [demo_uid(2, 1, 1, 1, 1), demo_uid(2, 1, 1, 1, 2)]


def test_demo_seeds_annotated_reports_of_demo_instances(app, cli):
    assert cli("demo").exit_code == 0
    with app.app_context():
        first_run = db.session.execute(select(documents.c.sop_instance_uid, documents.c.id, documents.c.imported_at)).all()
    second = cli("demo")
    assert second.exit_code == 0 and "loaded" not in second.output and "imported" not in second.output
    with app.app_context():
        assert sorted(first_run) == sorted(
            db.session.execute(select(documents.c.sop_instance_uid, documents.c.id, documents.c.imported_at)).all()
        )
        uids = document_uids()
        assert len(uids) == 40
        assert all(linked_instances(uid) for uid in uids)
        assert get_mapping(DEMO_MAPPING)["pneumothorax"] == ["C0020303", "C0032326"]
        # every annotation names a concept of the sample dictionary by its preferred name
        names = dict(db.session.execute(select(concepts.c.cui, concepts.c.pref)).all())
        assert names["C0205076"] == "Chest wall"
        for cui, pref in db.session.execute(select(annotations.c.cui, annotations.c.pref).distinct()):
            assert names[cui] == pref
        report = doc_detail(demo_uid(1, 3, 1, 1, 1))
        assert report["anns"]["ContentDate"] == "20170101"
        assert [(item["str"], item["temporality"]) for item in report["anns"]["annotations"]] == [
            ("pneumonia", "Recent"), ("tuberculosis", "Recent"), ("chest wall", "hypothetical"),
        ]
        for item in report["anns"]["annotations"]:
            assert report["content"][item["start"]:item["end"]] == item["str"]
        # the annotation API's own example query
        query = {"terms": [{"q": "C0205076"}], "filter": {"start_date": "2017-01-01", "end_date": "2017-01-03"}}
        assert search_annotations(parse_query(query)).all() == [demo_uid(1, 3, 1, 1, 1)]
        # report n has findings n, n + 7 and n + 13 of the 20 (modulo 20); of the mapping's, "No pneumothorax"
        # (2) and "No acute rib fractures" (17) are negated: reports 2, 4, 9, 10, 15, 17, 22, 24, 29, 30, 35, 37
        by_mapping = {"terms": [{"q": DEMO_MAPPING, "negation": "Negated"}], "returnFields": "PatientID"}
        assert search_annotations(parse_query(by_mapping)).all() == [
            "DEMO-002", "DEMO-004", "DEMO-008", "DEMO-009", "DEMO-013", "DEMO-014",
            "DEMO-018", "DEMO-020", "DEMO-024", "DEMO-025", "DEMO-029", "DEMO-030",
        ]


def test_mappings_load_prints_each_name_and_term_count(app, cli, tmp_path):
    (tmp_path / "chest findings.json").write_text(json.dumps({"rib": ["C0000004"], "apex": ["C0000006"]}))
    (tmp_path / "other.json").write_text(json.dumps({"rib": ["C0000004"]}))
    result = cli("mappings", "load", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["chest findings: 2 terms", "other: 1 terms"]
    with app.app_context():
        assert get_mapping("chest findings") == {"apex": ["C0000006"], "rib": ["C0000004"]}


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda folder: None, "no mapping files (*.json) in"),
        (lambda folder: (folder / "bad.json").write_text('{"rib": "C0000004"}'), "bad.json: term 'rib' does not map"),
    ],
)
def test_mappings_load_refuses_a_folder_without_good_mapping_files(app, cli, tmp_path, setup, reason):
    setup(tmp_path)
    result = cli("mappings", "load", str(tmp_path))
    assert result.exit_code == 1
    assert reason in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_annotations_import_shows_a_summary(app, cli):
    folders = ["--json-dir", ANNOTATION_FIXTURES / "nlp", "--text-dir", ANNOTATION_FIXTURES / "text",
               "--meta-dir", ANNOTATION_FIXTURES / "meta"]
    result = cli("annotations", "import", *map(str, folders), "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout == "imported 8, replaced 0, skipped 0\n"
    assert "importing" in result.stderr
    again = cli("annotations", "import", *map(str, folders))
    assert again.stdout == "imported 0, replaced 8, skipped 0\n"
    with app.app_context():
        assert doc_detail("1.1")["content"] == "The chest wall is intact. No fracture."


def test_annotations_import_lists_skipped_files_and_succeeds_when_some_imported(app, cli, tmp_path):
    shutil.copy(ANNOTATION_FIXTURES / "nlp" / "doc1.json", tmp_path / "doc1.json")
    (tmp_path / "doc2.json").write_text('{"annotations": [{"pref": "Rib"}]}')
    result = cli("annotations", "import", "--json-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["imported 1, replaced 0, skipped 1", "skipped doc2.json: annotation 0 has no 'cui'"]
    with app.app_context():
        assert document_uids() == ["doc1"]


def test_annotations_import_fails_when_every_file_is_skipped(app, cli, tmp_path):
    (tmp_path / "doc1.json").write_text("{")
    (tmp_path / "doc2.json").write_text("[]")
    result = cli("annotations", "import", "--json-dir", str(tmp_path))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[:3] == [
        "imported 0, replaced 0, skipped 2",
        "skipped doc1.json: doc1.json is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        "skipped doc2.json: not a JSON object",
    ]
    assert "Error: every file was skipped (2)" in result.stderr


@pytest.mark.parametrize(
    "options, exit_code, reason",
    [
        (["--json-dir", "{tmp}/missing"], 2, "Directory '{tmp}/missing' does not exist"),
        (["--json-dir", "{tmp}"], 1, "no NLP result files (*.json) in {tmp}"),
        (["--json-dir", "{nlp}", "--text-dir", "{tmp}/missing"], 2, "Directory '{tmp}/missing' does not exist"),
        (["--json-dir", "{nlp}", "--batch-size", "0"], 2, "Invalid value for '--batch-size'"),
        ([], 2, "Missing option '--json-dir'"),
    ],
)
def test_annotations_import_refuses_bad_input_with_a_reason(app, cli, tmp_path, options, exit_code, reason):
    places = {"tmp": tmp_path, "nlp": ANNOTATION_FIXTURES / "nlp"}
    result = cli("annotations", "import", *(option.format(**places) for option in options))
    assert result.exit_code == exit_code
    assert reason.format(**places) in result.output
    with app.app_context():
        assert document_uids() == []


@pytest.mark.parametrize("setting, value, reason", [
    ("MAX_UPLOAD_MB", "lots", "must be a number, not 'lots'"),
    ("CREDENTIAL_CACHE_SECONDS", "lots", "must be a number, not 'lots'"),
    ("AUTH_FAILURE_LIMIT", "2.5", "must be a whole number, not '2.5'"),
    ("AUTH_FAILURE_WINDOW_SECONDS", "-1", "must be a finite number, not negative"),
    ("SEARCH_SECONDS", "inf", "must be a finite number, not negative"),
    ("SEARCH_SECONDS", "nan", "must be a finite number, not negative"),
    ("TRUSTED_PROXIES", "one", "must be a whole number, not 'one'"),
])
def test_a_setting_that_is_not_a_number_stops_the_app_with_its_name(tmp_path, setting, value, reason):
    with pytest.raises(ValueError, match=f"^GATEWAY_{setting} {reason}$"):
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'g.sqlite'}", setting: value})


def test_settings_come_from_gateway_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'env.sqlite'}")
    monkeypatch.setenv("GATEWAY_STORAGE_DIR", str(tmp_path / "files"))
    monkeypatch.setenv("GATEWAY_MAX_UPLOAD_MB", "2")
    monkeypatch.setenv("GATEWAY_PASSPHRASE", "1234")  # stays the text it is, not the number
    app = create_app()
    assert app.config["SQLALCHEMY_DATABASE_URI"].endswith("env.sqlite")
    assert app.extensions["gateway.storage"].root == tmp_path / "files"
    assert app.config["MAX_CONTENT_LENGTH"] == 2 * 1024 * 1024
    assert app.config["PASSPHRASE"] == "1234"


def test_storage_sweep_removes_only_old_files_that_nothing_refers_to(app, cli, api, monkeypatch):
    monkeypatch.setattr("gateway.archive._SWEEP_BATCH", 1)  # every file its own batch
    assert api.upload(instance(1)).status_code == 200
    assert add_result(api, "heatmap", file=("map.png", PNG)).status_code == 200
    root = Path(app.config["STORAGE_DIR"])
    referenced = [root / key for key in stored_keys(app)]
    assert len(referenced) == 2  # the instance and the result file
    orphans = [root / "ab" / f"{'0' * 32}.dcm", root / "ff" / f"{'2' * 32}.bin"]  # as a crash leaves them
    recent_orphan = root / "cd" / f"{'1' * 32}.dcm"  # as an upload in flight has it
    stale_temp, fresh_temp = root / "tmp" / "dead.part", root / "tmp" / "live.part"
    stranger = root / "ab" / "notes.txt"  # not named as a key: not the storage's
    for path in (*orphans, recent_orphan, stale_temp, fresh_temp, stranger):
        path.write_bytes(b"x" * 1000)
    two_days_ago = time.time() - 48 * 3600
    for path in (*referenced, *orphans, stale_temp, stranger):
        os.utime(path, (two_days_ago, two_days_ago))
    listed = [f"ab/{'0' * 32}.dcm", f"ff/{'2' * 32}.bin", "tmp/dead.part"]

    dry_run = cli("storage", "sweep", "--dry-run")
    assert dry_run.exit_code == 0, dry_run.output
    assert dry_run.output.splitlines() == [*listed, "would remove 3 files (0.0 MB)"]
    assert all(path.exists() for path in (*orphans, stale_temp))

    swept = cli("storage", "sweep")
    assert swept.exit_code == 0, swept.output
    assert swept.output.splitlines() == [*listed, "removed 3 files (0.0 MB)"]
    assert not any(path.exists() for path in (*orphans, stale_temp))
    assert all(path.exists() for path in (*referenced, recent_orphan, fresh_temp, stranger))
    assert api.get("dicom/get/", **SERIES_PARAMS).status_code == 200
    assert get_results(api, "heatmap").status_code == 200
    assert cli("storage", "sweep").output == "removed 0 files (0.0 MB)\n"
    assert cli("storage", "sweep", "--min-age-hours", "0.5").exit_code == 2  # never near an upload in flight


def test_storage_sweep_refuses_a_database_that_does_not_describe_the_folder(app, cli, api, tmp_path):
    old_file = tmp_path / "storage" / "ab" / f"{'0' * 32}.dcm"
    old_file.write_bytes(b"x")
    os.utime(old_file, (0, 0))
    empty = cli("storage", "sweep")  # the database refers to no file at all
    assert empty.exit_code == 1 and "refers to no stored file" in empty.output
    assert api.upload(instance(1)).status_code == 200
    other_storage = create_app({**app.config, "STORAGE_DIR": str(tmp_path / "other")})
    (tmp_path / "other" / "ab" / old_file.name).write_bytes(b"x")
    other = other_storage.test_cli_runner().invoke(args=["storage", "sweep"])
    assert other.exit_code == 1 and "not in this storage folder" in other.output
    assert old_file.exists() and (tmp_path / "other" / "ab" / old_file.name).exists()
    release_connections(other_storage)
