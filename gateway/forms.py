"""Reporting forms: definitions per project, submissions per series validated with marshmallow."""
import datetime
import json

from marshmallow import RAISE, Schema, ValidationError, fields, validate
from sqlalchemy import func, insert, select

from .archive import find_series
from .db import db, utcnow, write_transaction
from .errors import InvalidValue, MultipleObjectsFound, ObjectNotFound
from .models import form_submissions, forms, series, users
from .projects import project_id_of
from .validation import StrictBoolean, StrictNumber

FIELD_TYPES = ("string", "integer", "number", "boolean", "date", "choice")
_DEFINITION_KEYS = {"name", "label", "type", "required", "choices"}


def _field_for(spec):
    options = {"required": spec["required"], "allow_none": not spec["required"]}
    kind = spec["type"]
    if kind == "string":
        return fields.String(**options)
    if kind == "integer":
        return fields.Integer(strict=True, **options)
    if kind == "number":
        return StrictNumber(allow_nan=False, **options)
    if kind == "boolean":
        return StrictBoolean(**options)
    if kind == "date":
        return fields.Date(**options)
    return fields.Raw(validate=validate.OneOf(spec["choices"]), **options)


def parse_definition(text):
    """A form definition `{"fields": [{"name", "label", "type", "required", "choices"}]}`, checked; ValueError if bad."""
    try:
        definition = json.loads(text)
    except ValueError as error:
        raise ValueError(f"the form schema is not JSON: {error}") from None
    if not isinstance(definition, dict) or not isinstance(definition.get("fields"), list) or not definition["fields"]:
        raise ValueError('the form schema must be {"fields": [...]} with at least one field')
    checked, names = [], set()
    for position, spec in enumerate(definition["fields"], start=1):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError(f"field {position} needs a name")
        name = spec["name"]
        unknown = set(spec) - _DEFINITION_KEYS
        if unknown:
            raise ValueError(f"field {name!r} has unknown keys: {', '.join(sorted(unknown))}")
        if name in names:
            raise ValueError(f"field {name!r} is defined twice")
        names.add(name)
        if spec.get("type") not in FIELD_TYPES:
            raise ValueError(f"field {name!r} has type {spec.get('type')!r}; types are {', '.join(FIELD_TYPES)}")
        choices = spec.get("choices")
        if (spec["type"] == "choice") != (choices is not None):
            raise ValueError(f"field {name!r}: choices belong to (and are needed by) type choice only")
        if choices is not None and (not isinstance(choices, list) or not choices):
            raise ValueError(f"field {name!r}: choices must be a non-empty list")
        checked.append(
            {
                "name": name,
                "label": str(spec.get("label") or name),
                "type": spec["type"],
                "required": bool(spec.get("required", False)),
                **({"choices": choices} if choices is not None else {}),
            }
        )
    return {"fields": checked}


def create_form(project_name, name, definition_text):
    definition = parse_definition(definition_text)
    if not name:
        raise ValueError("a form needs a name")
    with write_transaction() as session:
        project_id = project_id_of(session, project_name)
        taken = select(forms.c.id).where(forms.c.project_id == project_id, forms.c.name == name)
        if session.execute(taken).first():
            raise ValueError(f"form {name!r} exists already in project {project_name!r}")
        session.execute(insert(forms).values(project_id=project_id, name=name, definition=json.dumps(definition)))
    return definition


def _find_form(project_id, name):
    """The project's form of that name; an exact match wins, else a case-insensitive one, which must be unique."""
    rows = db.session.execute(
        select(forms).where(forms.c.project_id == project_id, func.lower(forms.c.name) == name.lower())
    ).all()
    exact = [row for row in rows if row.name == name]
    if exact:
        return exact[0]
    if len(rows) > 1:
        raise MultipleObjectsFound(
            "multiple_forms_found",
            f"{len(rows)} forms match {name!r} when case is ignored ({', '.join(row.name for row in rows)}); "
            "give the exact name",
        )
    if not rows:
        raise ObjectNotFound("form_not_found", f"form {name!r} not found in this project")
    return rows[0]


def _format_value(value):
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if value is None:
        return ""
    return str(value)


def _submission_json(row, definition):
    entry = json.loads(row.entry)
    labels = {spec["name"]: spec["label"] for spec in definition["fields"]}
    lines = [f"{labels[name]}: {_format_value(entry[name])}" for name in labels if name in entry]
    return {
        "id": row.id,
        "entry": entry,
        "entry_formatted": "\n".join(lines),
        "user": row.email,
        "series": row.series_instance_uid,
        "form": row.form_name,
    }


def _submissions(where):
    return db.session.execute(
        select(
            form_submissions.c.id,
            form_submissions.c.entry,
            users.c.email,
            series.c.series_instance_uid,
            forms.c.name.label("form_name"),
            forms.c.definition,
        )
        .join(users, users.c.id == form_submissions.c.user_id)
        .join(series, series.c.id == form_submissions.c.series_pk)
        .join(forms, forms.c.id == form_submissions.c.form_id)
        .where(where)
        .order_by(form_submissions.c.id)
    ).all()


def list_submissions(archive, patient_id, study_uid, series_uid):
    series_row = find_series(archive, patient_id, study_uid, series_uid)
    return [
        _submission_json(row, json.loads(row.definition))
        for row in _submissions(form_submissions.c.series_pk == series_row.id)
    ]


def add_submission(archive, user_id, patient_id, study_uid, series_uid, form_name, submission_text):
    series_row = find_series(archive, patient_id, study_uid, series_uid)
    form = _find_form(archive.project_id, form_name)
    definition = json.loads(form.definition)
    try:
        submission = json.loads(submission_text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise InvalidValue("invalid_form_submission", "FormSubmission is not valid JSON") from None
    if not isinstance(submission, dict):
        raise InvalidValue("invalid_form_submission", "FormSubmission must be a JSON object")
    schema = Schema.from_dict({spec["name"]: _field_for(spec) for spec in definition["fields"]})(unknown=RAISE)
    try:
        entry = schema.load(submission)
    except ValidationError as error:
        problems = "; ".join(
            f"{name}: {' '.join(messages) if isinstance(messages, list) else messages}"
            for name, messages in sorted(error.messages.items())
        )
        raise InvalidValue(
            "invalid_form_submission", f"FormSubmission is not valid for form {form.name!r}: {problems}"
        ) from None
    stored = json.dumps({name: value.isoformat() if isinstance(value, datetime.date) else value
                         for name, value in entry.items()})
    with write_transaction() as session:
        submission_id = session.execute(
            insert(form_submissions)
            .values(
                form_id=form.id,
                series_pk=series_row.id,
                user_id=user_id,
                entry=stored,
                created_at=utcnow(),
            )
            .returning(form_submissions.c.id)
        ).scalar_one()
    (row,) = _submissions(form_submissions.c.id == submission_id)
    return _submission_json(row, definition)
