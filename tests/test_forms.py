"""Reporting forms: definitions from the CLI, submissions validated field by field."""
import json

import pytest

from gateway.forms import create_form, parse_definition
from tests.conftest import instance
from tests.conftest import assert_error
from tests.test_v1_calls import SERIES_PARAMS

DEFINITION = {
    "fields": [
        {"name": "quality", "label": "Image quality", "type": "choice", "required": True,
         "choices": ["good", "poor"]},
        {"name": "tb", "label": "TB suspected", "type": "boolean", "required": True},
        {"name": "score", "label": "Score", "type": "integer"},
        {"name": "size", "label": "Lesion size (mm)", "type": "number"},
        {"name": "read_on", "label": "Read on", "type": "date"},
        {"name": "remarks", "label": "Remarks", "type": "string"},
    ]
}


@pytest.fixture
def form_api(seeded, api):
    with seeded.app_context():
        create_form("alpha", "CXR", json.dumps(DEFINITION))
    assert api.upload(instance()).status_code == 200
    return api


def submit(api, submission, form="CXR", params=SERIES_PARAMS):
    body = {**params, "FormName": form,
            "FormSubmission": submission if isinstance(submission, str) else json.dumps(submission)}
    return api.client.post("/api/v1/patient/study/series/forms/add/", data=body, headers=api.headers)


def test_a_submission_with_every_field_type_round_trips(form_api):
    entry = {"quality": "good", "tb": False, "score": 7, "size": 12.5, "read_on": "2024-05-01", "remarks": "clear"}
    response = submit(form_api, entry)
    assert response.status_code == 200, response.json
    assert response.json == {
        "id": response.json["id"],
        "entry": entry,
        "entry_formatted": "Image quality: good\nTB suspected: No\nScore: 7\nLesion size (mm): 12.5\n"
                           "Read on: 2024-05-01\nRemarks: clear",
        "user": "alice@example.org",
        "series": SERIES_PARAMS["SeriesInstanceUID"],
        "form": "CXR",
    }
    listed = form_api.get("patient/study/series/forms/list/", **SERIES_PARAMS)
    assert listed.status_code == 200 and listed.json == [response.json]


def test_optional_fields_may_be_left_out_or_null(form_api):
    response = submit(form_api, {"quality": "poor", "tb": True, "score": None})
    assert response.status_code == 200
    assert response.json["entry_formatted"] == "Image quality: poor\nTB suspected: Yes\nScore: "


@pytest.mark.parametrize(
    "submission, named",
    [
        ({"tb": True}, "quality"),  # a required field missing
        ({"quality": "good"}, "tb"),
        ({"quality": "great", "tb": True}, "quality"),  # outside the choices
        ({"quality": "good", "tb": 1}, "tb"),  # wrong types
        ({"quality": "good", "tb": "yes"}, "tb"),
        ({"quality": "good", "tb": True, "score": "7"}, "score"),
        ({"quality": "good", "tb": True, "score": 7.5}, "score"),
        ({"quality": "good", "tb": True, "size": "12"}, "size"),
        ({"quality": "good", "tb": True, "size": True}, "size"),
        ({"quality": "good", "tb": True, "read_on": "2024-02-30"}, "read_on"),
        ({"quality": "good", "tb": True, "remarks": 5}, "remarks"),
        ({"quality": "good", "tb": True, "colour": "red"}, "colour"),  # an unknown field
        ({"quality": None, "tb": True}, "quality"),  # required fields may not be null
    ],
)
def test_invalid_submissions_are_a_400_naming_the_field(form_api, submission, named):
    response = submit(form_api, submission)
    assert_error(response, 400, "invalid_post_value", "invalid_form_submission")
    assert f"{named}:" in response.json["message"]
    assert form_api.get("patient/study/series/forms/list/", **SERIES_PARAMS).json == []


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "42", "", "[" * 100_000 + "]" * 100_000])
def test_form_submission_must_be_a_json_object(form_api, text):
    response = submit(form_api, text)
    if text == "":
        assert_error(response, 400, "invalid_post_value", "missing_parameter")
    else:
        assert_error(response, 400, "invalid_post_value", "invalid_form_submission")
        assert "FormSubmission" in response.json["message"]


def test_unknown_form_and_series(form_api):
    assert_error(submit(form_api, {"quality": "good", "tb": True}, form="Nope"), 404, "object_not_found",
                 "form_not_found")
    unknown = {**SERIES_PARAMS, "SeriesInstanceUID": "9.9"}
    assert_error(submit(form_api, {}, params=unknown), 404, "object_not_found", "series_not_found")
    assert_error(form_api.get("patient/study/series/forms/list/", **unknown), 404, "object_not_found",
                 "series_not_found")


def test_form_names_match_case_insensitively_unless_ambiguous(seeded, form_api):
    assert submit(form_api, {"quality": "good", "tb": True}, form="cxr").json["form"] == "CXR"
    with seeded.app_context():
        create_form("alpha", "Cxr", json.dumps({"fields": [{"name": "x", "type": "string"}]}))
    # two forms now match 'cxr' when case is ignored: the client must say which
    response = submit(form_api, {"quality": "good", "tb": True}, form="cxr")
    assert_error(response, 409, "multiple_objects_found", "multiple_forms_found")
    assert submit(form_api, {"x": "y"}, form="Cxr").json["form"] == "Cxr"


def test_forms_belong_to_their_project(seeded, form_api, api_for):
    with seeded.app_context():
        create_form("beta", "Other", json.dumps({"fields": [{"name": "x", "type": "string"}]}))
    assert_error(submit(form_api, {"x": "y"}, form="Other"), 404, "object_not_found", "form_not_found")
    bob = api_for("bob")
    assert_error(submit(bob, {"quality": "good", "tb": True}), 404, "object_not_found", "project_not_found")


def test_deleting_the_series_deletes_its_submissions(form_api):
    assert submit(form_api, {"quality": "good", "tb": True}).status_code == 200
    assert form_api.get("series/delete/", **SERIES_PARAMS).json == {"status": "Ok"}
    assert form_api.upload(instance()).status_code == 200
    assert form_api.get("patient/study/series/forms/list/", **SERIES_PARAMS).json == []


@pytest.mark.parametrize(
    "definition, problem",
    [
        ("{", "not JSON"),
        ({"fields": []}, "at least one field"),
        ({"fields": [{"label": "x", "type": "string"}]}, "needs a name"),
        ({"fields": [{"name": "x", "type": "colour"}]}, "has type 'colour'"),
        ({"fields": [{"name": "x", "type": "choice"}]}, "choices"),
        ({"fields": [{"name": "x", "type": "string", "choices": ["a"]}]}, "choices"),
        ({"fields": [{"name": "x", "type": "string"}, {"name": "x", "type": "date"}]}, "defined twice"),
        ({"fields": [{"name": "x", "type": "string", "colour": 1}]}, "unknown keys: colour"),
    ],
)
def test_bad_form_definitions_are_refused(definition, problem):
    text = definition if isinstance(definition, str) else json.dumps(definition)
    with pytest.raises(ValueError, match=problem):
        parse_definition(text)


def test_cli_form_create(seeded, tmp_path):
    runner = seeded.test_cli_runner()
    schema = tmp_path / "form.json"
    schema.write_text(json.dumps(DEFINITION))
    result = runner.invoke(args=["form", "create", "alpha", "Reading", "--schema", str(schema)])
    assert result.exit_code == 0 and "6 fields" in result.output
    again = runner.invoke(args=["form", "create", "alpha", "Reading", "--schema", str(schema)])
    assert again.exit_code == 1 and "exists already" in again.output
    schema.write_text("{")
    broken = runner.invoke(args=["form", "create", "alpha", "Broken", "--schema", str(schema)])
    assert broken.exit_code == 1 and "not JSON" in broken.output
    unknown = runner.invoke(args=["form", "create", "nope", "Reading", "--schema", str(tmp_path / "form.json")])
    assert unknown.exit_code == 1


def test_forms_permissions(seeded, form_api):
    from gateway.auth.users import create_user
    from gateway.projects import add_member
    from tests.conftest import credentials

    with seeded.app_context():
        create_user("nobody", "n@example.org", "pw")
        add_member("alpha", "nobody")
    headers = credentials("nobody", "pw")
    listed = form_api.client.get("/api/v1/patient/study/series/forms/list/", query_string=SERIES_PARAMS,
                                 headers=headers)
    assert_error(listed, 403, "api_call_not_allowed", None)
    body = {**SERIES_PARAMS, "FormName": "CXR", "FormSubmission": "{}"}
    added = form_api.client.post("/api/v1/patient/study/series/forms/add/", data=body, headers=headers)
    assert_error(added, 403, "api_call_not_allowed", None)
