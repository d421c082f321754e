"""The admin command line, run through Flask's CLI runner against both stores."""
import pytest

from gateway.demo import DEMO_PASSWORD, DEMO_USER, demo_uid
from tests.conftest import credentials


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


@pytest.mark.parametrize("setting", ["MAX_UPLOAD_MB", "CREDENTIAL_CACHE_SECONDS"])
def test_a_setting_that_is_not_a_number_stops_the_app_with_its_name(tmp_path, setting):
    from gateway import create_app

    with pytest.raises(ValueError, match="GATEWAY_MAX_UPLOAD_MB and GATEWAY_CREDENTIAL_CACHE_SECONDS are numbers"):
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'g.sqlite'}", setting: "lots"})


def test_settings_come_from_gateway_variables(tmp_path, monkeypatch):
    from gateway import create_app

    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'env.sqlite'}")
    monkeypatch.setenv("GATEWAY_STORAGE_DIR", str(tmp_path / "files"))
    monkeypatch.setenv("GATEWAY_MAX_UPLOAD_MB", "2")
    monkeypatch.setenv("GATEWAY_PASSPHRASE", "1234")  # stays the text it is, not the number
    app = create_app()
    assert app.config["SQLALCHEMY_DATABASE_URI"].endswith("env.sqlite")
    assert app.extensions["gateway.storage"].root == tmp_path / "files"
    assert app.config["MAX_CONTENT_LENGTH"] == 2 * 1024 * 1024
    assert app.config["PASSPHRASE"] == "1234"
