"""Algorithm results per series: typed scalars, files, the zip with results.xml, and series status."""
import io
import re
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from xml.etree import ElementTree

import pytest
import requests
from sqlalchemy import delete, select, update

from gateway.db import db, write_engine
from gateway.models import series, series_results
from gateway.results import typed_value
from tests.conftest import credentials, instance
from tests.conftest import assert_error
from tests.test_v1_calls import PATIENT, SERIES, SERIES_PARAMS, STUDY

PNG = b"\x89PNG\r\n\x1a\n" + b"not really an image, but bytes to round-trip" * 10
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4


@pytest.fixture
def series_with_instance(api):
    assert api.upload(instance()).status_code == 200
    return api


def add(api, name, value=None, file=None, result_type="cad4tb", algorithm="CAD4TB", params=SERIES_PARAMS, headers=None):
    form = {**params, "Type": result_type, "Name": name, "Algorithm": algorithm}
    if value is not None:
        form["Value"] = value
    if file is not None:
        form["file"] = file
    return api.post("series/results/add/", form, headers=headers)


def get(api, names, result_type="cad4tb", params=SERIES_PARAMS, **extra):
    return api.get("series/results/", **params, Type=result_type, Results=names, **extra)


@pytest.mark.parametrize(
    "text, expected",
    [("7", 7), ("-12", -12), ("12.345", 12.345), ("1e3", 1000.0), (".5", 0.5), ("CAD4TB", "CAD4TB"),
     ("7a", "7a"), ("", ""), ("nan", "nan"), ("inf", "inf"), ("1e999", "1e999"),
     ("99999999999999999999", "99999999999999999999"), ("0x10", "0x10"), ("7" * 5000, "7" * 5000)],
)
def test_values_are_typed_on_the_way_in(text, expected):
    typed = typed_value(text)
    assert typed == expected and type(typed) is type(expected)


def test_scalar_results_round_trip_with_their_json_types(series_with_instance):
    api = series_with_instance
    assert add(api, "CAD4TB 5", "12.345").json == {"name": "CAD4TB 5", "algorithm": "CAD4TB", "value": 12.345}
    assert add(api, "CAD4TB 6", "87").status_code == 200
    assert add(api, "Finding", "nodule").status_code == 200
    response = get(api, "CAD4TB 6,CAD4TB 5,Finding")
    assert response.status_code == 200
    assert response.json == [
        {"name": "CAD4TB 6", "algorithm": "CAD4TB", "value": 87},
        {"name": "CAD4TB 5", "algorithm": "CAD4TB", "value": 12.345},
        {"name": "Finding", "algorithm": "CAD4TB", "value": "nodule"},
    ]
    assert type(response.json[0]["value"]) is int and type(response.json[1]["value"]) is float
    assert get(api, "CAD4TB 5").json == [{"name": "CAD4TB 5", "algorithm": "CAD4TB", "value": 12.345}]


def test_writing_a_name_again_replaces_the_result(seeded, series_with_instance):
    api = series_with_instance
    assert add(api, "Heatmap", file=("map.png", PNG)).status_code == 200
    assert add(api, "Heatmap", file=("map2.png", PNG[::-1])).status_code == 200
    with zipfile.ZipFile(io.BytesIO(get(api, "Heatmap").data)) as archive:
        assert archive.read("Heatmap.png") == PNG[::-1]
    assert add(api, "Heatmap", "3").status_code == 200
    assert get(api, "Heatmap").json == [{"name": "Heatmap", "algorithm": "CAD4TB", "value": 3}]
    storage_root = seeded.extensions["gateway.storage"].root
    assert list(storage_root.rglob("*.bin")) == []  # both replaced files are gone


def test_a_file_result_makes_a_zip_with_results_xml(series_with_instance):
    api = series_with_instance
    add(api, "CAD4TB 5", "12.345")
    add(api, "Label", "<b>&amp; \"quoted\"</b>")
    add(api, "Heatmap", file=("heat map (1).png", PNG))
    add(api, "Report", file=("report.pdf", PDF))
    response = get(api, "Heatmap,CAD4TB 5,Report,Label")
    assert response.status_code == 200
    assert response.mimetype == "application/zip"
    assert response.headers["Content-Disposition"] == 'attachment; filename="results.zip"'
    with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["Heatmap.png", "Report.pdf", "results.xml"]
        assert archive.read("Heatmap.png") == PNG
        assert archive.read("Report.pdf") == PDF
        root = ElementTree.fromstring(archive.read("results.xml"))
    assert root.tag == "results"
    assert [
        {child.tag: child.text for child in element} for element in root.findall("result")
    ] == [
        {"name": "CAD4TB 5", "algorithm": "CAD4TB", "type": "float", "value": "12.345"},
        {"name": "Label", "algorithm": "CAD4TB", "type": "string", "value": "<b>&amp; \"quoted\"</b>"},
    ]


def test_only_files_requested_gives_a_zip_without_xml(series_with_instance):
    add(series_with_instance, "Heatmap", file=("map.png", PNG))
    with zipfile.ZipFile(io.BytesIO(get(series_with_instance, "Heatmap").data)) as archive:
        assert archive.namelist() == ["Heatmap.png"]


def test_missing_results_are_named(series_with_instance):
    add(series_with_instance, "CAD4TB 5", "1")
    response = get(series_with_instance, "CAD4TB 5,Nope,Other")
    assert_error(response, 404, "object_not_found", "result_not_found")
    assert "'Nope'" in response.json["message"] and "'Other'" in response.json["message"]


def test_type_must_be_the_projects_kind(series_with_instance):
    add(series_with_instance, "CAD4TB 5", "1")
    assert_error(get(series_with_instance, "CAD4TB 5", result_type="retina"), 400, "invalid_get_value", "invalid_type")
    assert_error(get(series_with_instance, "CAD4TB 5", result_type="mri"), 400, "invalid_get_value", "invalid_type")
    assert_error(add(series_with_instance, "X", "1", result_type="retina"), 400, "invalid_post_value", "invalid_type")


def test_add_needs_a_value_or_a_file_and_a_known_series(series_with_instance):
    api = series_with_instance
    assert_error(add(api, "X"), 400, "invalid_post_value", "missing_parameter")
    assert_error(add(api, "X", "1", file=("a.png", PNG)), 400, "invalid_post_value", "missing_parameter")
    assert_error(add(api, "X", file=("a.png", b"")), 400, "invalid_post_value", "no_data_submitted")
    assert_error(add(api, "X", "bad\x01value"), 400, "invalid_post_value", "invalid_value")
    for unaskable in ("a,b", " padded"):  # names that a comma list of Results could not ask for
        assert_error(add(api, unaskable, "1"), 400, "invalid_post_value", "invalid_value")
    unknown = {**SERIES_PARAMS, "SeriesInstanceUID": "9.9"}
    assert_error(add(api, "X", "1", params=unknown), 404, "object_not_found", "series_not_found")
    assert_error(get(api, "X", params=unknown), 404, "object_not_found", "series_not_found")
    assert_error(api.get("series/results/", **SERIES_PARAMS, Type="cad4tb"), 400, "invalid_get_value", "missing_parameter")


def test_results_permissions_and_isolation(seeded, series_with_instance, api_for):
    from gateway.auth.users import create_user, grant
    from gateway.projects import add_member

    add(series_with_instance, "CAD4TB 5", "1")
    with seeded.app_context():
        create_user("reader", "reader@example.org", "pw")
        grant("reader", ["api_series_results"])
        add_member("alpha", "reader")
    reader = credentials("reader", "pw")
    assert get(series_with_instance, "CAD4TB 5").status_code == 200
    assert series_with_instance.get("series/results/", headers=reader, **SERIES_PARAMS, Type="cad4tb",
                                    Results="CAD4TB 5").status_code == 200
    assert_error(add(series_with_instance, "Y", "1", headers=reader), 403, "api_call_not_allowed", None)
    assert_error(get(api_for("bob"), "CAD4TB 5"), 404, "object_not_found", "project_not_found")


def test_results_move_the_series_status(app, series_with_instance):
    from gateway.projects import archive_by_name
    from gateway.results import set_series_status

    with app.app_context():
        set_series_status(archive_by_name("alpha", "main"), PATIENT, STUDY, SERIES, "processing", "queued 2 of 5")
    series = series_with_instance.get("series/get/", **SERIES_PARAMS).json
    assert (series["status"], series["status_message"]) == ("processing", "queued 2 of 5")
    add(series_with_instance, "CAD4TB 5", "1")
    series = series_with_instance.get("series/get/", **SERIES_PARAMS).json
    assert (series["status"], series["status_message"]) == ("processed", None)


def test_retina_results_are_addressed_by_the_instance_uid(api):
    data = instance(5, patient="EYE-1")
    answer = api.upload(data, project="eyes").json
    assert answer["SeriesInstanceUID"] == answer["SOPInstanceUID"]
    params = {"Project": "eyes", "Archive": "main", "PatientID": "EYE-1",
              "StudyInstanceUID": answer["StudyInstanceUID"], "SeriesInstanceUID": answer["SOPInstanceUID"]}
    assert add(api, "DR grade", "2", result_type="retina", algorithm="RetCAD", params=params).status_code == 200
    assert get(api, "DR grade", result_type="retina", params=params).json == [
        {"name": "DR grade", "algorithm": "RetCAD", "value": 2}
    ]
    assert_error(add(api, "DR grade", "2", params=params), 400, "invalid_post_value", "invalid_type")


@pytest.mark.parametrize("call", ["series/delete/", "study/delete/", "patient/delete/"])
def test_deletes_take_results_and_their_files_along(seeded, series_with_instance, call):
    api = series_with_instance
    add(api, "Heatmap", file=("map.png", PNG))
    add(api, "CAD4TB 5", "1")
    storage_root = seeded.extensions["gateway.storage"].root
    assert len(list(storage_root.rglob("*.bin"))) == 1
    assert api.get(call, **SERIES_PARAMS).json == {"status": "Ok"}
    assert list(storage_root.rglob("*.bin")) == [] and list(storage_root.rglob("*.dcm")) == []
    assert api.upload(instance()).status_code == 200
    assert_error(get(api, "CAD4TB 5"), 404, "object_not_found", "result_not_found")


def test_cli_adds_results_and_sets_status(app, series_with_instance, tmp_path):
    runner = app.test_cli_runner()
    keys = ["alpha", "main", PATIENT, STUDY, SERIES]
    result = runner.invoke(args=["results", "add", *keys, "--type", "cad4tb", "--name", "CAD4TB 5",
                                 "--algorithm", "CAD4TB", "--value", "42"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "report.pdf"
    report.write_bytes(PDF)
    result = runner.invoke(args=["results", "add", *keys, "--type", "cad4tb", "--name", "Report",
                                 "--algorithm", "CAD4TB", "--file", str(report)])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(io.BytesIO(get(series_with_instance, "Report,CAD4TB 5").data)) as archive:
        assert archive.read("Report.pdf") == PDF
        assert b"<value>42</value>" in archive.read("results.xml")
    result = runner.invoke(args=["series", "status", *keys, "failed", "--message", "model crashed"])
    assert result.exit_code == 0, result.output
    series = series_with_instance.get("series/get/", **SERIES_PARAMS).json
    assert (series["status"], series["status_message"]) == ("failed", "model crashed")
    bad = runner.invoke(args=["results", "add", *keys, "--type", "retina", "--name", "x", "--algorithm", "y",
                              "--value", "1"])
    assert bad.exit_code == 1 and "cad4tb project" in bad.output
    unknown = runner.invoke(args=["series", "status", "alpha", "main", PATIENT, STUDY, "9.9", "failed"])
    assert unknown.exit_code == 1 and "not found" in unknown.output


def test_a_result_file_that_vanished_is_a_404_not_a_broken_zip(seeded, series_with_instance):
    add(series_with_instance, "Heatmap", file=("map.png", PNG))
    for path in seeded.extensions["gateway.storage"].root.rglob("*.bin"):
        path.unlink()
    assert_error(get(series_with_instance, "Heatmap"), 404, "object_not_found", "result_not_found")


def test_result_zip_entry_names_are_safe_whatever_is_stored(seeded, series_with_instance):
    """Rows that older code stored may hold any name and filename; names that differ only in case would
    unpack onto one file on a case-insensitive file system; results.xml keeps its name."""
    api = series_with_instance
    stored = {"../../evil": "map.\\..\\..\\evil", "/etc/passwd": "/etc/passwd", "Heatmap": "a.png",
              "heatmap": "b.png", "results": "r.xml"}
    for number in range(len(stored)):
        assert add(api, f"R{number}", file=(f"r{number}.png", PNG + bytes([number]))).status_code == 200
    assert add(api, "Score", "7").status_code == 200
    with seeded.app_context(), write_engine().begin() as connection:
        for number, (name, filename) in enumerate(stored.items()):
            connection.execute(
                update(series_results).where(series_results.c.name == f"R{number}").values(name=name, filename=filename)
            )
    response = get(api, ",".join([*stored, "Score"]))
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
        names = archive.namelist()
        assert b"<name>Score</name>" in archive.read("results.xml")
        files = sorted(archive.read(name) for name in names if name != "results.xml")
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name), name  # no folder, `..`, `\\` or leading /
    assert len({name.casefold() for name in names}) == len(names) == len(stored) + 1
    assert files == sorted(PNG + bytes([number]) for number in range(len(stored)))


def test_a_long_result_filename_is_cut_to_what_the_store_keeps(series_with_instance):
    response = add(series_with_instance, "Report", file=("r" * 300 + ".pdf", PDF))
    assert response.status_code == 200, response.json  # PostgreSQL refuses a filename over 255 characters
    assert response.json["file"] == "r" * 255
    with zipfile.ZipFile(io.BytesIO(get(series_with_instance, "Report").data)) as archive:
        assert archive.read("Report") == PDF


def test_a_result_whose_series_is_deleted_meanwhile_is_a_404_that_keeps_no_file(seeded, series_with_instance,
                                                                                monkeypatch):
    from gateway import results

    find_series = results.find_series

    def find_then_delete(*args):
        found = find_series(*args)
        with write_engine().begin() as connection:  # another client's delete, committed in between
            connection.execute(delete(series))
        return found

    monkeypatch.setattr(results, "find_series", find_then_delete)
    response = add(series_with_instance, "Heatmap", file=("map.png", PNG))
    assert_error(response, 404, "object_not_found", "series_not_found")
    assert list(seeded.extensions["gateway.storage"].root.rglob("*.bin")) == []


WRITERS = 8
ROUNDS = 4


def test_concurrent_writers_of_one_result_name_leave_one_row_and_its_file(seeded, gunicorn):
    """Writers of one Name at once, through gunicorn (2 processes x 4 threads). On PostgreSQL, writers that
    each found no row of that name yet raced into the unique constraint (a 500); each answer must be a 200
    and leave one row, whose file is the only one stored."""
    base_url, log_path = gunicorn(seeded)
    storage_root = seeded.extensions["gateway.storage"].root
    uploaded = requests.post(f"{base_url}/api/v1/instance/upload/", data={"Project": "alpha", "Archive": "main"},
                             files={"file": ("image.dcm", instance())}, headers=credentials(), timeout=30)
    assert uploaded.status_code == 200, uploaded.text
    start = threading.Barrier(WRITERS)

    def payload(round_number, writer):
        return PNG + f"round {round_number}, writer {writer}".encode()

    def write(round_number, writer):
        start.wait(timeout=30)  # the writers of a round send at the same moment
        return requests.post(
            f"{base_url}/api/v1/series/results/add/",
            data={**SERIES_PARAMS, "Type": "cad4tb", "Name": "Heatmap", "Algorithm": "CAD4TB"},
            files={"file": ("map.png", payload(round_number, writer))}, headers=credentials(), timeout=30,
        )

    with ThreadPoolExecutor(WRITERS) as pool:
        for round_number in range(ROUNDS):
            answers = list(pool.map(write, [round_number] * WRITERS, range(WRITERS)))
            failures = [(answer.status_code, answer.text) for answer in answers if answer.status_code != 200]
            assert failures == [], f"round {round_number}: {failures[:2]}\n{log_path.read_text()[-3000:]}"

    with seeded.app_context():
        rows = db.session.execute(select(series_results.c.storage_key)).scalars().all()
    assert len(rows) == 1
    assert [path.relative_to(storage_root).as_posix() for path in storage_root.rglob("*.bin")] == rows
    kept = (storage_root / rows[0]).read_bytes()
    assert kept in {payload(ROUNDS - 1, writer) for writer in range(WRITERS)}
    downloaded = requests.get(f"{base_url}/api/v1/series/results/", headers=credentials(), timeout=30,
                              params={**SERIES_PARAMS, "Type": "cad4tb", "Results": "Heatmap"})
    with zipfile.ZipFile(io.BytesIO(downloaded.content)) as archive:
        assert archive.read("Heatmap.png") == kept
