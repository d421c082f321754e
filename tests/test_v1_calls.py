"""The archive API v1 browse, download and delete calls, their errors and who may see what."""
import io
import zipfile

import pydicom
import pytest
from sqlalchemy.exc import OperationalError

from gateway.auth.users import create_user, grant
from gateway.db import db
from tests.conftest import PASSWORD, assert_error, credentials, instance

ALPHA = {"Project": "alpha", "Archive": "main"}
PATIENT = "PAT-1"
STUDY = "1.2.826.0.1.3680043.8.498.99.1.1"
SERIES = STUDY + ".1"
SERIES_PARAMS = {**ALPHA, "PatientID": PATIENT, "StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES}


@pytest.fixture
def stored(api):
    """Patient PAT-1 with one study of two series (3 + 1 instances); patient PAT-2 with one study."""
    for number in (1, 2, 3):
        assert api.upload(instance(number, study_description="Thorax", series_description="Axial")).status_code == 200
    assert api.upload(instance(1, series=2)).status_code == 200
    assert api.upload(instance(1, patient="PAT-2")).status_code == 200
    return api


def test_get_patient_returns_the_tags_with_iso_dates(stored):
    response = stored.get("patient/get/", **ALPHA, PatientID=PATIENT)
    assert response.status_code == 200
    assert response.json == {
        "PatientID": PATIENT,
        "PatientName": "Anonymous",
        "PatientSex": "O",
        "PatientBirthDate": "1900-01-01",
    }


def test_list_and_get_studies(stored):
    listed = stored.get("patient/studies/list/", **ALPHA, PatientID=PATIENT)
    assert listed.status_code == 200
    assert listed.json == [
        {
            "StudyInstanceUID": STUDY,
            "StudyDate": "2024-01-02",
            "StudyTime": "10:15:00",
            "StudyDescription": "Thorax",
            "ReferringPhysicianName": "Referrer^Demo",
            "InstitutionName": "Demo Hospital",
            "AccessionNumber": "ACC-PAT-1",
        }
    ]
    single = stored.get("study/get/", **ALPHA, PatientID=PATIENT, StudyInstanceUID=STUDY)
    assert single.json == listed.json[0]


def test_list_and_get_series_with_status(stored):
    listed = stored.get("patient/study/series/list/", **ALPHA, PatientID=PATIENT, StudyInstanceUID=STUDY)
    assert [item["SeriesInstanceUID"] for item in listed.json] == [SERIES, STUDY + ".2"]
    series = stored.get("series/get/", **SERIES_PARAMS)
    assert series.status_code == 200
    assert series.json == {
        "SeriesInstanceUID": SERIES,
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "SeriesDate": "2024-01-02",
        "SeriesTime": "10:15:00",
        "SeriesDescription": "Axial",
        "Manufacturer": "Synthetic Imaging",
        "ManufacturerModelName": "pydicom",
        "status": "uploaded",
        "status_message": None,
    }
    assert listed.json[0] == series.json


def test_missing_values_come_back_as_null(api):
    data = instance(study_time="", study_date="notadate", patient_birth_date="")
    assert api.upload(data).status_code == 200
    study = api.get("study/get/", **ALPHA, PatientID=PATIENT, StudyInstanceUID=STUDY).json
    assert study["StudyDate"] is None and study["StudyTime"] is None
    assert api.get("patient/get/", **ALPHA, PatientID=PATIENT).json["PatientBirthDate"] is None


def test_time_fractions_are_kept(api):
    assert api.upload(instance(study_time="0930.5")).status_code == 200
    assert api.upload(instance(2, patient="PAT-2", study_time="235959.123456")).status_code == 200
    assert api.get("study/get/", **ALPHA, PatientID=PATIENT, StudyInstanceUID=STUDY).json["StudyTime"] == "09:30:00.5"
    other = api.get("study/get/", **ALPHA, PatientID="PAT-2", StudyInstanceUID="1.2.826.0.1.3680043.8.498.99.2.1")
    assert other.json["StudyTime"] == "23:59:59.123456"


def test_dicom_get_streams_a_zip_of_the_series(stored):
    response = stored.get("dicom/get/", **SERIES_PARAMS)
    assert response.status_code == 200
    assert response.mimetype == "application/zip"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{SERIES}.zip"'
    assert response.is_streamed
    with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == [f"{SERIES}.{n}.dcm" for n in (1, 2, 3)]
        assert archive.read(f"{SERIES}.2.dcm") == instance(2, study_description="Thorax", series_description="Axial")


def test_calls_answer_404_with_the_suberror_of_the_object_asked_for(stored):
    cases = [
        ("patient/get/", {"PatientID": "nobody"}, "patient_not_found"),
        ("patient/studies/list/", {"PatientID": "nobody"}, "patient_not_found"),
        ("study/get/", {"PatientID": PATIENT, "StudyInstanceUID": "9.9"}, "study_not_found"),
        # a missing parent is still reported as the object the call asks for
        ("study/get/", {"PatientID": "nobody", "StudyInstanceUID": STUDY}, "study_not_found"),
        ("patient/study/series/list/", {"PatientID": PATIENT, "StudyInstanceUID": "9.9"}, "study_not_found"),
        ("series/get/", {"PatientID": PATIENT, "StudyInstanceUID": "9.9", "SeriesInstanceUID": SERIES}, "series_not_found"),
        ("series/get/", {"PatientID": "PAT-2", "StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES}, "series_not_found"),
        ("dicom/get/", {"PatientID": PATIENT, "StudyInstanceUID": STUDY, "SeriesInstanceUID": "9.9"}, "series_not_found"),
    ]
    for call, params, suberror in cases:
        assert_error(stored.get(call, **ALPHA, **params), 404, "object_not_found", suberror)


def test_missing_parameters_are_a_400_naming_them(stored):
    response = stored.get("series/get/", **ALPHA, PatientID=PATIENT, StudyInstanceUID=STUDY)
    assert_error(response, 400, "invalid_get_value", "missing_parameter")
    assert "SeriesInstanceUID" in response.json["message"]
    assert_error(stored.get("patient/get/", PatientID=PATIENT), 400, "invalid_get_value", "missing_parameter")


def test_unknown_project_and_archive(stored):
    response = stored.get("patient/get/", Project="nope", Archive="main", PatientID=PATIENT)
    assert_error(response, 404, "object_not_found", "project_not_found")
    response = stored.get("patient/get/", Project="alpha", Archive="nope", PatientID=PATIENT)
    assert_error(response, 404, "object_not_found", "archive_not_found")


def test_same_uids_in_two_archives_are_two_objects(stored):
    second = {"Project": "alpha", "Archive": "second"}
    assert_error(stored.get("patient/get/", **second, PatientID=PATIENT), 404, "object_not_found", "patient_not_found")
    assert stored.upload(instance(1), archive="second").status_code == 200
    assert stored.get("patient/delete/", **second, PatientID=PATIENT).json == {"status": "Ok"}
    assert stored.get("patient/get/", **ALPHA, PatientID=PATIENT).status_code == 200


def test_error_precedence(seeded, stored):
    with seeded.app_context():
        create_user("dave", "dave@example.org", PASSWORD)
        grant("dave", ["api_get_patient"])
    client = seeded.test_client()
    no_headers = client.get("/api/v1/series/get/")
    assert_error(no_headers, 401, "not_authenticated", None)
    wrong = stored.get("series/get/", headers=credentials("alice", "wrong"))
    assert_error(wrong, 401, "not_authenticated", None)
    unknown_user = stored.get("series/get/", headers=credentials("nobody"))
    assert_error(unknown_user, 401, "not_authenticated", None)
    assert unknown_user.json["message"] == wrong.json["message"]
    # dave may get patients but not series: 403 comes before the missing parameters
    assert_error(stored.get("series/get/", headers=credentials("dave")), 403, "api_call_not_allowed", None)
    # then 400 for parameters before 404 for the project
    assert_error(stored.get("patient/get/", Project="nope"), 400, "invalid_get_value", "missing_parameter")


def test_a_non_member_learns_nothing_about_a_project(stored, api_for):
    bob = api_for("bob")
    foreign = bob.get("patient/get/", **ALPHA, PatientID=PATIENT)
    missing = bob.get("patient/get/", Project="no-such-project", Archive="main", PatientID=PATIENT)
    assert_error(foreign, 404, "object_not_found", "project_not_found")
    assert (foreign.status_code, foreign.json["error_type"], foreign.json["suberror_type"]) == (
        missing.status_code,
        missing.json["error_type"],
        missing.json["suberror_type"],
    )
    for call in ("dicom/get/", "series/delete/"):
        assert_error(bob.get(call, **SERIES_PARAMS), 404, "object_not_found", "project_not_found")
    assert stored.get("patient/get/", **ALPHA, PatientID=PATIENT).status_code == 200
    # a member without the upload right still reads
    assert api_for("carol").get("patient/get/", **ALPHA, PatientID=PATIENT).status_code == 200


def test_each_call_needs_its_own_permission(seeded, stored):
    calls = {
        "patient/get/": ("api_get_patient", {"PatientID": PATIENT}),
        "patient/delete/": ("api_delete_patient", {"PatientID": PATIENT}),
        "study/get/": ("api_get_study", {"PatientID": PATIENT, "StudyInstanceUID": STUDY}),
        "patient/studies/list/": ("api_list_studies", {"PatientID": PATIENT}),
        "study/delete/": ("api_delete_study", {"PatientID": PATIENT, "StudyInstanceUID": STUDY}),
        "series/get/": ("api_get_series", SERIES_PARAMS),
        "patient/study/series/list/": ("api_list_series", {"PatientID": PATIENT, "StudyInstanceUID": STUDY}),
        "dicom/get/": ("api_dicom_get", SERIES_PARAMS),
        "series/delete/": ("api_delete_series", SERIES_PARAMS),
    }
    with seeded.app_context():
        create_user("erin", "erin@example.org", PASSWORD)
        from gateway.projects import add_member

        add_member("alpha", "erin")
    for call, (permission, params) in calls.items():
        denied = stored.get(call, headers=credentials("erin"), **{**ALPHA, **params})
        assert_error(denied, 403, "api_call_not_allowed", None)
        assert permission in denied.json["message"]
    with seeded.app_context():
        grant("erin", ["api_get_patient"])
    assert stored.get("patient/get/", headers=credentials("erin"), **ALPHA, PatientID=PATIENT).status_code == 200


def _storage_files(app):
    root = app.extensions["gateway.storage"].root
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.dcm"))


def test_delete_series_study_patient_remove_rows_and_files(seeded, stored):
    assert len(_storage_files(seeded)) == 5
    assert stored.get("series/delete/", **SERIES_PARAMS).json == {"status": "Ok"}
    assert len(_storage_files(seeded)) == 2
    assert_error(stored.get("series/get/", **SERIES_PARAMS), 404, "object_not_found", "series_not_found")
    assert_error(stored.get("series/delete/", **SERIES_PARAMS), 404, "object_not_found", "series_not_found")

    study = {**ALPHA, "PatientID": PATIENT, "StudyInstanceUID": STUDY}
    response = stored.client.delete("/api/v1/study/delete/", query_string=study, headers=stored.headers)
    assert response.json == {"status": "Ok"}
    assert len(_storage_files(seeded)) == 1
    assert_error(stored.get("study/delete/", **study), 404, "object_not_found", "study_not_found")
    assert stored.get("patient/studies/list/", **ALPHA, PatientID=PATIENT).json == []

    assert stored.get("patient/delete/", **ALPHA, PatientID="PAT-2").json == {"status": "Ok"}
    assert _storage_files(seeded) == []
    assert_error(stored.get("patient/delete/", **ALPHA, PatientID="PAT-2"), 404, "object_not_found", "patient_not_found")
    # a deleted instance can be uploaded again
    assert stored.upload(instance(1, patient="PAT-2")).status_code == 200


def test_delete_answers_ok_when_a_file_cannot_be_removed(seeded, stored, monkeypatch):
    """Rows go before files: a file that cannot be removed leaves no row pointing at it."""
    def broken_delete(self, key):
        raise OSError("disk gone")

    monkeypatch.setattr("gateway.storage.FileStorage.delete", broken_delete)
    assert stored.get("patient/delete/", **ALPHA, PatientID=PATIENT).json == {"status": "Ok"}
    assert_error(stored.get("patient/get/", **ALPHA, PatientID=PATIENT), 404, "object_not_found", "patient_not_found")


def test_a_delete_whose_rows_stay_keeps_every_file(seeded, stored, monkeypatch):
    """Rows go before files: a delete that fails to commit has removed no file its rows point at."""
    files_before = _storage_files(seeded)
    refused = []

    def failing_commit(session):
        refused.append(1)
        raise OperationalError("COMMIT", {}, Exception("connection lost"))

    with seeded.app_context():
        monkeypatch.setattr(type(db.session()), "commit", failing_commit)
    study = {**ALPHA, "PatientID": PATIENT, "StudyInstanceUID": STUDY}
    for call, params in (("series/delete/", SERIES_PARAMS), ("study/delete/", study), ("patient/delete/", study)):
        assert_error(stored.get(call, **params), 500, "internal_error", None)
    monkeypatch.undo()
    assert len(refused) == 3  # each delete reached its commit
    assert _storage_files(seeded) == files_before
    with zipfile.ZipFile(io.BytesIO(stored.get("dicom/get/", **SERIES_PARAMS).data)) as archive:
        assert len(archive.namelist()) == 3


def test_series_whose_files_vanished_has_no_dicom_available(seeded, stored):
    root = seeded.extensions["gateway.storage"].root
    for path in root.rglob("*.dcm"):
        path.unlink()
    assert_error(stored.get("dicom/get/", **SERIES_PARAMS), 404, "object_not_found", "no_dicom_available")


V1_CALL_METHODS = {  # every call of the archive API v1 and the methods it answers
    "instance/upload/": {"POST"},
    "patient/get/": {"GET"},
    "patient/delete/": {"GET", "DELETE"},
    "study/get/": {"GET"},
    "patient/studies/list/": {"GET"},
    "study/delete/": {"GET", "DELETE"},
    "series/get/": {"GET"},
    "patient/study/series/list/": {"GET"},
    "dicom/get/": {"GET"},
    "series/delete/": {"GET", "DELETE"},
    "series/results/add/": {"POST"},
    "series/results/": {"GET"},
    "patient/study/series/forms/list/": {"GET"},
    "patient/study/series/forms/add/": {"POST"},
}


def _allowed(methods):
    """What Allow lists: OPTIONS always, HEAD beside a GET that does not delete."""
    return methods | {"OPTIONS"} | ({"HEAD"} if methods == {"GET"} else set())


@pytest.mark.store_independent
def test_wrong_method_and_unknown_call(stored):
    for call, methods in V1_CALL_METHODS.items():
        for method in {"GET", "POST", "PUT", "DELETE", "HEAD"} - _allowed(methods):
            response = stored.client.open(f"/api/v1/{call}", method=method, headers=stored.headers)
            assert response.status_code == 405, (call, method)
            if method != "HEAD":  # a HEAD answer has no body
                assert_error(response, 405, "method_not_allowed", None)
            assert set(response.headers["Allow"].split(", ")) == _allowed(methods), (call, method)
        options = stored.client.options(f"/api/v1/{call}")
        assert set(options.headers["Allow"].split(", ")) == _allowed(methods), call
    assert_error(stored.get("patient/nothing/"), 404, "object_not_found", "unknown_call")


@pytest.mark.store_independent
def test_wrong_method_on_a_call_without_its_trailing_slash(stored):
    """Routing took a method the call does not take, on its path without the slash, for no call (404)."""
    for call, methods in V1_CALL_METHODS.items():
        for method in {"GET", "POST", "PUT", "DELETE", "TRACE"} - _allowed(methods):
            response = stored.client.open(f"/api/v1/{call.rstrip('/')}", method=method, headers=stored.headers)
            assert_error(response, 405, "method_not_allowed", None)
            assert set(response.headers["Allow"].split(", ")) == _allowed(methods), (call, method)
    assert_error(stored.client.open("/api/v1/patient/nothing", method="TRACE"), 404, "object_not_found", "unknown_call")


def test_head_never_deletes(stored):
    study = {**ALPHA, "PatientID": PATIENT, "StudyInstanceUID": STUDY}
    for call, params in (("series/delete/", SERIES_PARAMS), ("study/delete/", study), ("patient/delete/", study)):
        response = stored.client.head(f"/api/v1/{call}", query_string=params, headers=stored.headers)
        assert (response.status_code, response.headers["Allow"]) == (405, "DELETE, GET, OPTIONS")
    assert stored.get("series/get/", **SERIES_PARAMS).status_code == 200
    assert stored.client.head("/api/v1/series/get/", query_string=SERIES_PARAMS, headers=stored.headers).status_code == 200


def test_a_nul_in_a_parameter_is_a_400_after_the_credentials(seeded, stored):
    """PostgreSQL refuses NUL in text outright; the answer is the same clear 400 on every store."""
    for params in (
        {**ALPHA, "Project": "al\x00pha", "PatientID": PATIENT},
        {**ALPHA, "Archive": "main\x00", "PatientID": PATIENT},
        {**ALPHA, "PatientID": "PAT\x00-1"},
        {**ALPHA, "PatientID": PATIENT, "Extra": "\x00"},
    ):
        response = stored.get("patient/get/", **params)
        assert_error(response, 400, "invalid_get_value", "invalid_parameter")
        assert_error(stored.get("patient/get/", headers=credentials("alice", "wrong"), **params),
                     401, "not_authenticated", None)
    assert_error(stored.get("patient/get/", headers=credentials("ali\x00ce"), **ALPHA, PatientID=PATIENT),
                 401, "not_authenticated", None)
    files_before = _storage_files(seeded)
    response = stored.post("instance/upload/", {"Project": "alpha", "Archive": "main\x00", "file": ("a.dcm", instance(9))})
    assert_error(response, 400, "invalid_post_value", "invalid_parameter")
    assert _storage_files(seeded) == files_before
    assert stored.get("patient/get/", **ALPHA, PatientID=PATIENT).status_code == 200


def test_unexpected_errors_are_json_without_a_trace(stored, monkeypatch):
    def explode(*_args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("gateway.archive.get_patient", explode)
    response = stored.get("patient/get/", **ALPHA, PatientID=PATIENT)
    assert_error(response, 500, "internal_error", None)
    assert b"secret internals" not in response.data and b"Traceback" not in response.data


@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100", "ISO 2022 IR 100"])
def test_names_are_decoded_with_the_files_character_set(api, charset):
    dataset = pydicom.dcmread(io.BytesIO(instance()))
    dataset.SpecificCharacterSet = charset
    dataset.PatientName = "Müller^Jürgen"
    dataset.InstitutionName = "Hôpital Général"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    assert api.upload(buffer.getvalue()).status_code == 200
    assert api.get("patient/get/", **ALPHA, PatientID=PATIENT).json["PatientName"] == "Müller^Jürgen"
    study = api.get("study/get/", **ALPHA, PatientID=PATIENT, StudyInstanceUID=STUDY).json
    assert study["InstitutionName"] == "Hôpital Général"


@pytest.mark.store_independent
def test_a_multipart_body_that_quotes_braces_in_its_error_is_a_400(api):
    """The parser's message quotes the client's bytes; they never pass through str.format."""
    body = b'--b\r\nContent-Disposition: form-data; name="{x}\xff"\r\n\r\nvalue\r\n--b--\r\n'
    response = api.client.post("/api/v1/instance/upload/", data=body, content_type="multipart/form-data; boundary=b",
                               headers=api.headers)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error_type"] == "invalid_post_value"
