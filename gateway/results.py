"""Algorithm results per series (scalars or files) and the series' processing status."""
import functools
import io
import logging
import math
import os
import re
from xml.etree import ElementTree

from sqlalchemy import select, update
from werkzeug.utils import secure_filename

from .archive import clean_filename, find_series, remove_files, storage
from .db import DIALECT_INSERTS, db, utcnow, write_transaction
from .errors import InvalidValue, ObjectNotFound
from .models import PROJECT_KINDS, SERIES_STATUSES, series, series_results
from .zipstream import ZipEntry, zip_stream

log = logging.getLogger(__name__)

_INTEGER = re.compile(r"[+-]?\d{1,19}")  # more digits are beyond 64 bits (and int() refuses over 4300)
_DECIMAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][+-]?\d+)?")
_INT64 = (-(2**63), 2**63 - 1)
# XML 1.0 cannot carry these; a value holding one could not go into results.xml.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# What replacing a result overwrites: all but its key (series, name) and its id.
_REPLACED_COLUMNS = [column.name for column in series_results.c if column.name not in ("id", "series_pk", "name")]


def typed_value(text):
    """A posted value typed on the way in: an integer literal becomes an int, a decimal a float, else a str.

    Integers outside 64 bits and decimals outside the float range stay strings (nothing is rounded).
    """
    if _INTEGER.fullmatch(text):
        number = int(text)
        if _INT64[0] <= number <= _INT64[1]:
            return number
    elif _DECIMAL.fullmatch(text):
        number = float(text)
        if math.isfinite(number):
            return number
    return text


def check_result_type(archive, result_type):
    if result_type not in PROJECT_KINDS:
        raise InvalidValue("invalid_type", f"Type must be one of {', '.join(PROJECT_KINDS)}, not {result_type!r}")
    if result_type != archive.project_kind:
        raise InvalidValue(
            "invalid_type", f"this is a {archive.project_kind} project: its results are of Type {archive.project_kind}"
        )


def _check_text(name, value, limit=None):
    if _XML_ILLEGAL.search(value):
        raise InvalidValue("invalid_value", f"{name} holds control characters")
    if limit is not None and len(value) > limit:
        raise InvalidValue("invalid_value", f"{name} is longer than {limit} characters")


def add_result(archive, patient_id, study_uid, series_uid, result_type, name, algorithm, value=None, upload=None):
    """Store a result (a scalar `value`, or `upload`: (open storage temp file, filename, size)).

    A result of the same name is replaced atomically; the series moves to status 'processed'.
    """
    check_result_type(archive, result_type)
    _check_text("Name", name, 200)
    if "," in name or name != name.strip():
        # `Results` asks for names as a comma list, whose items are stripped: this name could not be asked for
        raise InvalidValue("invalid_value", "a result Name cannot hold a comma or start or end with a space")
    _check_text("Algorithm", algorithm, 200)
    if (value is None) == (upload is None):
        raise InvalidValue("missing_parameter", "a result needs either a Value or a file, not both")
    series_row = find_series(archive, patient_id, study_uid, series_uid)
    row = {
        "series_pk": series_row.id,
        "result_type": result_type,
        "name": name,
        "algorithm": algorithm,
        "created_at": utcnow(),
    }
    if upload is None:
        typed = typed_value(value)
        if isinstance(typed, str):
            _check_text("Value", typed)
        kind = {int: "int", float: "float", str: "string"}[type(typed)]
        row.update(value_kind=kind, **{f"{kind}_value": typed})
    else:
        handle, filename, size = upload
        if size == 0:
            raise InvalidValue("no_data_submitted", "the result file is empty")
        key = storage().new_key("bin")
        storage().prepare(handle)  # the fsync before the transaction (SQLite's write lock)
        row.update(
            value_kind="file",
            storage_key=key,
            filename=clean_filename(filename, "result.bin"),
            size_bytes=size,
        )
    replaced = _replace_result(series_row.id, name, row, handle=upload[0] if upload else None)
    remove_files(replaced)
    if upload is None:
        return {"name": name, "algorithm": algorithm, "value": _json_value(row)}
    return {"name": name, "algorithm": algorithm, "file": row["filename"]}


def _replace_result(series_pk, name, row, handle):
    """Write the result row over one of the same name (and place the new file) in one transaction; returns
    the keys of old files.

    The series' status is updated first, which locks the series row (before its results, as a delete's
    cascade does): writers of one series' results take turns, so each finds the file of the row it
    overwrites, where under PostgreSQL's READ COMMITTED two could both find no row yet (SQLite's write
    lock keeps them apart anyway).
    """
    files = storage()
    placed = False
    try:
        with write_transaction() as session:
            marked = session.execute(
                update(series).where(series.c.id == series_pk).values(status="processed", status_message=None)
            )
            if marked.rowcount != 1:
                raise ObjectNotFound("series_not_found", "the series was deleted while its result was being stored")
            old_keys = session.execute(
                select(series_results.c.storage_key).where(
                    series_results.c.series_pk == series_pk,
                    series_results.c.name == name,
                    series_results.c.storage_key.is_not(None),
                )
            ).scalars().all()
            session.execute(_upsert_result(session, row))
            if handle is not None:
                placed = True  # from here on a failure must remove the file, wherever place() stopped
                files.place(handle, row["storage_key"])
    except BaseException:
        if placed:
            files.delete(row["storage_key"])
        raise
    return old_keys


def _upsert_result(session, row):
    """INSERT … ON CONFLICT (series_pk, name) DO UPDATE: the columns that `row` leaves out become NULL."""
    insert_for_dialect = DIALECT_INSERTS[session.get_bind().dialect.name]
    statement = insert_for_dialect(series_results).values({column: None for column in _REPLACED_COLUMNS} | row)
    return statement.on_conflict_do_update(
        index_elements=[series_results.c.series_pk, series_results.c.name],
        set_={column: statement.excluded[column] for column in _REPLACED_COLUMNS},
    )


def _json_value(row):
    return {"int": row.get("int_value"), "float": row.get("float_value"), "string": row.get("string_value")}[
        row["value_kind"]
    ]


def get_results(archive, patient_id, study_uid, series_uid, result_type, names_text):
    """('json', [{name, algorithm, value}]) when only scalars are asked for, else ('zip', generator)."""
    check_result_type(archive, result_type)
    names = list(dict.fromkeys(name.strip() for name in names_text.split(",") if name.strip()))
    if not names:
        raise InvalidValue("missing_parameter", "Results must name at least one result")
    series_row = find_series(archive, patient_id, study_uid, series_uid)
    rows = db.session.execute(
        select(series_results).where(
            series_results.c.series_pk == series_row.id,
            series_results.c.result_type == result_type,
            series_results.c.name.in_(names),
        )
    ).all()
    by_name = {row.name: row._mapping for row in rows}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ObjectNotFound("result_not_found", f"no result named {', '.join(map(repr, missing))} for this series")
    ordered = [by_name[name] for name in names]
    scalars = [row for row in ordered if row["value_kind"] != "file"]
    if len(scalars) == len(ordered):
        return "json", [{"name": row["name"], "algorithm": row["algorithm"], "value": _json_value(row)} for row in ordered]
    return "zip", _results_zip(ordered, scalars)


def results_xml(rows):
    root = ElementTree.Element("results")
    for row in rows:
        element = ElementTree.SubElement(root, "result")
        for tag, text in (
            ("name", row["name"]),
            ("algorithm", row["algorithm"]),
            ("type", row["value_kind"]),
            ("value", repr(_json_value(row)) if row["value_kind"] == "float" else str(_json_value(row))),
        ):
            ElementTree.SubElement(element, tag).text = text
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def _results_zip(ordered, scalars):
    files = storage()
    entries = []
    if scalars:  # first, so that it keeps its name: zip_stream numbers a later entry of the same name
        xml = results_xml(scalars)
        now = utcnow().timetuple()[:6]
        entries.append(ZipEntry("results.xml", now, len(xml), functools.partial(io.BytesIO, xml)))
    for row in ordered:
        if row["value_kind"] != "file":
            continue
        if not files.exists(row["storage_key"]):  # checked before the first byte: no broken download
            log.error("the file of result %r (%s) is missing", row["name"], row["storage_key"])
            raise ObjectNotFound("result_not_found", f"the file of result {row['name']!r} is not available")
        stem, extension = os.path.splitext(row["filename"])
        name = (secure_filename(row["name"]) or stem or "result") + extension
        entries.append(
            ZipEntry(name, row["created_at"].timetuple()[:6], row["size_bytes"], functools.partial(files.open, row["storage_key"]))
        )
    return zip_stream(entries)


def set_series_status(archive, patient_id, study_uid, series_uid, status, message=None):
    if status not in SERIES_STATUSES:
        raise InvalidValue("invalid_value", f"a series status is one of {', '.join(SERIES_STATUSES)}")
    series_row = find_series(archive, patient_id, study_uid, series_uid)
    with write_transaction() as session:
        session.execute(update(series).where(series.c.id == series_row.id).values(status=status, status_message=message))
