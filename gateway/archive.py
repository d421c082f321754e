"""The archive's domain logic: storing uploaded instances, browsing, streaming a series, deleting.

Every function works inside one archive (a projects.ArchiveRef); the same
UIDs in two archives are two different objects.
"""
import filecmp
import functools
import itertools
import logging
import time

from flask import current_app
from sqlalchemy import and_, bindparam, delete, literal, select
from sqlalchemy.exc import IntegrityError
from werkzeug.utils import secure_filename

from .db import DIALECT_INSERTS, db, in_values, utcnow, write_transaction
from .dicom_ingest import REPORT_SOP_CLASSES, read_instance
from .errors import Conflict, ObjectNotFound
from .models import documents, instances, patients, report_documents, report_jobs, series, series_results, studies
from .zipstream import ZipEntry, zip_stream

log = logging.getLogger(__name__)


def storage():
    return current_app.extensions["gateway.storage"]


# --- upload ---------------------------------------------------------------------------------------


def clean_filename(name, fallback):
    """The spec's filename advice: only letters, digits, '-', '_' and '.' survive."""
    return (secure_filename(name or "") or fallback)[:255]


def _insert_ignoring_conflict(session, table, values):
    insert_for_dialect = DIALECT_INSERTS[session.get_bind().dialect.name]
    session.execute(insert_for_dialect(table).values(**values).on_conflict_do_nothing())


class _LostToADelete(Exception):
    """A row or file that an upload's transaction had seen was removed by a delete that committed since."""


def _get_or_create(session, table, key_columns, values):
    """The row (id plus key columns) with these key values, created from `values` if absent; race-safe."""
    where = and_(*(table.c[column] == values[column] for column in key_columns))
    query = select(table).where(where)
    row = session.execute(query).first()
    if row is None:
        _insert_ignoring_conflict(session, table, values)
        row = session.execute(query).first()
        if row is None:  # the row that our insert gave way to is deleted already
            raise _LostToADelete(table.name)
    return row


def _select_series_by_uids(*columns):
    """SELECT columns of the series that bind parameters archive_id, patient_id, study_uid and series_uid name."""
    return (
        select(*columns)
        .join(studies, studies.c.id == series.c.study_pk)
        .join(patients, patients.c.id == studies.c.patient_pk)
        .where(
            series.c.archive_id == bindparam("archive_id"),
            series.c.series_instance_uid == bindparam("series_uid"),
            studies.c.study_instance_uid == bindparam("study_uid"),
            patients.c.patient_id == bindparam("patient_id"),
        )
    )


# What an upload needs to know, in one statement: which of its patient, study, series and instance
# exist already, and what they are tied to.
_instance_of = series.alias("instance_series")
_UPLOAD_LOOKUP = (
    select(
        patients.c.id.label("patient_pk"),
        studies.c.id.label("study_pk"),
        studies.c.patient_pk.label("study_patient_pk"),
        series.c.id.label("series_pk"),
        series.c.study_pk.label("series_study_pk"),
        instances.c.storage_key,
        instances.c.size_bytes,
        _instance_of.c.series_instance_uid.label("instance_series_uid"),
    )
    .select_from(select(literal(1).label("anchor")).subquery())
    .outerjoin(
        patients, and_(patients.c.archive_id == bindparam("archive_id"), patients.c.patient_id == bindparam("patient_id"))
    )
    .outerjoin(
        studies, and_(studies.c.archive_id == bindparam("archive_id"), studies.c.study_instance_uid == bindparam("study_uid"))
    )
    .outerjoin(
        series, and_(series.c.archive_id == bindparam("archive_id"), series.c.series_instance_uid == bindparam("series_uid"))
    )
    .outerjoin(
        instances,
        and_(instances.c.archive_id == bindparam("archive_id"), instances.c.sop_instance_uid == bindparam("sop_uid")),
    )
    .outerjoin(_instance_of, _instance_of.c.id == instances.c.series_pk)
)
_INSERT_INSTANCE = {
    dialect: insert_for_dialect(instances).on_conflict_do_nothing().returning(instances.c.id)
    for dialect, insert_for_dialect in DIALECT_INSERTS.items()
}
_INSTANCE_COLUMNS = ("archive_id", "series_pk", "sop_instance_uid", "sop_class_uid", "filename", "storage_key",
                     "size_bytes", "created_at")
# The common case in one statement: a new instance of a series that is stored already.
_INSERT_INTO_STORED_SERIES = {
    dialect: insert_for_dialect(instances)
    .from_select(
        _INSTANCE_COLUMNS,
        _select_series_by_uids(
            bindparam("archive_id"), series.c.id, *(bindparam(name) for name in _INSTANCE_COLUMNS[2:])
        ),
    )
    .on_conflict_do_nothing()
    .returning(instances.c.id)
    for dialect, insert_for_dialect in DIALECT_INSERTS.items()
}


def store_instance(archive, handle, size, filename):
    """Store the uploaded file open in `handle` (a storage temp file) and return its four identifiers.

    The file is validated first and moved into place before its row is written: a crash in between
    leaves an unreferenced file, never a row without its file, and any failure removes the file. The
    same bytes again are accepted as they are; different bytes under a stored SOPInstanceUID, or a
    study or series that the stored objects tie to another patient or study, are a Conflict.
    """
    tags = read_instance(handle, size)
    if archive.project_kind == "retina":
        tags.series["series_instance_uid"] = tags.sop_uid
    answer = {
        "PatientID": tags.patient_id,
        "StudyInstanceUID": tags.study_uid,
        "SeriesInstanceUID": tags.series_uid,
        "SOPInstanceUID": tags.sop_uid,
    }
    files = storage()
    key = files.new_key()
    lookup = {
        "archive_id": archive.id,
        "patient_id": tags.patient_id,
        "study_uid": tags.study_uid,
        "series_uid": tags.series_uid,
        "sop_uid": tags.sop_uid,
    }
    row = {
        "sop_instance_uid": tags.sop_uid,
        "sop_class_uid": tags.instance["sop_class_uid"],
        "filename": clean_filename(filename, f"{tags.sop_uid}.dcm"),
        "storage_key": key,
        "size_bytes": size,
        "created_at": utcnow(),
    }
    try:
        files.place(handle, key)
        for attempt in range(1, _UPLOAD_ATTEMPTS + 1):
            try:
                written = _write_instance_row(archive, tags, lookup, row)
                break
            except (IntegrityError, _LostToADelete) as error:
                if attempt == _UPLOAD_ATTEMPTS or not _lost_to_a_delete(error):
                    raise
                log.info("an upload to archive %s lost a race with a delete; trying again", archive.id)
        if not written:
            files.delete(key)  # the same instance was stored already
    except BaseException:
        files.delete(key)
        raise
    return answer


_UPLOAD_ATTEMPTS = 3
_FOREIGN_KEY_VIOLATION = "23503"


def _lost_to_a_delete(error):
    """Whether a delete committed under the upload's transaction (only PostgreSQL lets one; SQLite's write
    lock keeps the two apart): a row or file it had seen is gone, or its new row's parent. Another go at
    the whole transaction sees the delete and creates what it removed."""
    if isinstance(error, IntegrityError):
        return getattr(error.orig, "sqlstate", None) == _FOREIGN_KEY_VIOLATION
    return True


def _write_instance_row(archive, tags, lookup, row):
    """True when the instance's row was written; False when the same instance was stored already."""
    if row["sop_class_uid"] in REPORT_SOP_CLASSES:  # its job for the report annotator goes in with it
        return _store_in_new_or_other_series(archive, tags, lookup, row)
    with write_transaction(single_statement=True) as session:
        connection = session.connection()
        if connection.execute(_INSERT_INTO_STORED_SERIES[connection.dialect.name], {**lookup, **row}).first():
            return True
    return _store_in_new_or_other_series(archive, tags, lookup, row)


def _store_in_new_or_other_series(archive, tags, lookup, row):
    """The rest of the cases, in one transaction; False when the instance is stored already."""
    our_file = storage().path(row["storage_key"])
    with write_transaction() as session:
        connection = session.connection()
        known = connection.execute(_UPLOAD_LOOKUP, lookup).one()
        if known.storage_key is not None:
            _check_same_instance(known, our_file, row["size_bytes"], tags)
            return False
        series_pk = known.series_pk
        if series_pk is None or known.study_pk is None or known.patient_pk is None:
            series_pk = _create_parents(session, archive, tags)
        elif known.study_patient_pk != known.patient_pk or known.series_study_pk != known.study_pk:
            _refuse_other_parents(tags, known.study_patient_pk != known.patient_pk)
        inserted = connection.execute(
            _INSERT_INSTANCE[connection.dialect.name], {**row, "archive_id": archive.id, "series_pk": series_pk}
        ).first()
        if inserted is None:  # another client stored this instance a moment ago
            stored = connection.execute(_UPLOAD_LOOKUP, lookup).one()
            if stored.storage_key is None:  # and it is deleted already
                raise _LostToADelete("instances")
            _check_same_instance(stored, our_file, row["size_bytes"], tags)
            return False
        if row["sop_class_uid"] in REPORT_SOP_CLASSES:
            connection.execute(report_jobs.insert().values(
                instance_id=inserted.id, enqueued_at=row["created_at"], attempts=0, failed=False))
    return True


def _refuse_other_parents(tags, study_of_other_patient):
    if study_of_other_patient:
        raise Conflict(
            "conflicting_instance", f"study {tags.study_uid} belongs to another patient than {tags.patient_id}"
        )
    raise Conflict("conflicting_instance", f"series {tags.series_uid} belongs to another study than {tags.study_uid}")


def _create_parents(session, archive, tags):
    """Find or create the instance's patient, study and series (race-safe); the series' id."""
    patient = _get_or_create(
        session, patients, ("archive_id", "patient_id"), {"archive_id": archive.id, **tags.patient}
    )
    study = _get_or_create(
        session,
        studies,
        ("archive_id", "study_instance_uid"),
        {"archive_id": archive.id, "patient_pk": patient.id, **tags.study},
    )
    if study.patient_pk != patient.id:
        _refuse_other_parents(tags, True)
    series_row = _get_or_create(
        session,
        series,
        ("archive_id", "series_instance_uid"),
        {"archive_id": archive.id, "study_pk": study.id, "status": "uploaded", **tags.series},
    )
    if series_row.study_pk != study.id:
        _refuse_other_parents(tags, False)
    return series_row.id


def _check_same_instance(existing, our_file, size, tags):
    stored_file = storage().path(existing.storage_key)
    try:
        same = (
            existing.instance_series_uid == tags.series_uid
            and existing.size_bytes == size
            and filecmp.cmp(our_file, stored_file, shallow=False)
        )
    except FileNotFoundError:
        if stored_file.exists():  # it is our own file that is missing
            raise
        raise _LostToADelete("instances") from None  # a delete removes the rows, then the files
    if not same:
        raise Conflict(
            "conflicting_instance",
            f"another file is stored under SOPInstanceUID {tags.sop_uid}; delete it before uploading a new one",
        )


# --- lookups ----------------------------------------------------------------------------------------


def _iso(value):
    return value.isoformat() if value is not None else None


def _patient_json(row):
    return {
        "PatientID": row.patient_id,
        "PatientName": row.patient_name,
        "PatientSex": row.patient_sex,
        "PatientBirthDate": _iso(row.patient_birth_date),
    }


def _study_json(row):
    return {
        "StudyInstanceUID": row.study_instance_uid,
        "StudyDate": _iso(row.study_date),
        "StudyTime": row.study_time,
        "StudyDescription": row.study_description,
        "ReferringPhysicianName": row.referring_physician_name,
        "InstitutionName": row.institution_name,
        "AccessionNumber": row.accession_number,
    }


def _series_json(row):
    return {
        "SeriesInstanceUID": row.series_instance_uid,
        "SOPClassUID": row.sop_class_uid,
        "SeriesDate": _iso(row.series_date),
        "SeriesTime": row.series_time,
        "SeriesDescription": row.series_description,
        "Manufacturer": row.manufacturer,
        "ManufacturerModelName": row.manufacturer_model_name,
        "status": row.status,
        "status_message": row.status_message,
    }


def _patient_not_found(patient_id):
    return ObjectNotFound("patient_not_found", f"patient {patient_id!r} not found")


def _study_not_found(patient_id, study_uid):
    return ObjectNotFound("study_not_found", f"study {study_uid!r} of patient {patient_id!r} not found")


def _series_not_found(patient_id, study_uid, series_uid):
    return ObjectNotFound(
        "series_not_found", f"series {series_uid!r} of study {study_uid!r} and patient {patient_id!r} not found"
    )


_PATIENT = select(patients).where(
    patients.c.archive_id == bindparam("archive_id"), patients.c.patient_id == bindparam("patient_id")
)
_STUDY = (
    select(studies)
    .join(patients, patients.c.id == studies.c.patient_pk)
    .where(
        studies.c.archive_id == bindparam("archive_id"),
        studies.c.study_instance_uid == bindparam("study_uid"),
        patients.c.patient_id == bindparam("patient_id"),
    )
)
_SERIES = _select_series_by_uids(series)


def _first(statement, **params):
    # Prebuilt statements on the session's connection: building and ORM-executing them per call
    # cost more than the queries themselves.
    return db.session.connection().execute(statement, params).first()


def _find_patient(archive, patient_id):
    row = _first(_PATIENT, archive_id=archive.id, patient_id=patient_id)
    if row is None:
        raise _patient_not_found(patient_id)
    return row


def _find_study(archive, patient_id, study_uid):
    row = _first(_STUDY, archive_id=archive.id, patient_id=patient_id, study_uid=study_uid)
    if row is None:
        raise _study_not_found(patient_id, study_uid)
    return row


def find_series(archive, patient_id, study_uid, series_uid):
    row = _first(_SERIES, archive_id=archive.id, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid)
    if row is None:
        raise _series_not_found(patient_id, study_uid, series_uid)
    return row


def get_patient(archive, patient_id):
    return _patient_json(_find_patient(archive, patient_id))


def list_studies(archive, patient_id):
    patient = _find_patient(archive, patient_id)
    rows = db.session.execute(select(studies).where(studies.c.patient_pk == patient.id).order_by(studies.c.id))
    return [_study_json(row) for row in rows]


def get_study(archive, patient_id, study_uid):
    return _study_json(_find_study(archive, patient_id, study_uid))


def list_series(archive, patient_id, study_uid):
    study = _find_study(archive, patient_id, study_uid)
    rows = db.session.execute(select(series).where(series.c.study_pk == study.id).order_by(series.c.id))
    return [_series_json(row) for row in rows]


def get_series(archive, patient_id, study_uid, series_uid):
    return _series_json(find_series(archive, patient_id, study_uid, series_uid))


# --- series download ----------------------------------------------------------------------------------


def series_zip(archive, patient_id, study_uid, series_uid):
    """A generator of the zip of every instance of the series, one `<SOPInstanceUID>.dcm` entry each.

    The rows are read before the first byte is produced, so a missing series is an error, not a
    broken download; the files are read chunk by chunk while the zip is sent.
    """
    series_row = find_series(archive, patient_id, study_uid, series_uid)
    members = db.session.execute(
        select(instances.c.sop_instance_uid, instances.c.storage_key, instances.c.size_bytes, instances.c.created_at)
        .where(instances.c.series_pk == series_row.id)
        .order_by(instances.c.id)
    ).all()
    files = storage()
    if not members or not all(files.exists(member.storage_key) for member in members):
        if members:
            log.error("series %s has instances whose files are missing", series_row.id)
        raise ObjectNotFound("no_dicom_available", f"no DICOM files are available for series {series_uid!r}")
    return zip_stream(
        ZipEntry(
            name=f"{member.sop_instance_uid}.dcm",
            date_time=member.created_at.timetuple()[:6],
            size=member.size_bytes,
            open=functools.partial(files.open, member.storage_key),
        )
        for member in members
    )


# --- deletes ------------------------------------------------------------------------------------------


def _delete_rows_then_files(table, row_id, series_ids, not_found):
    """Delete a row (the schema cascades to everything below it), then the files of the series below it.
    The documents that the report annotator read from its SR instances go with the rows.

    The rows go first: a crash between the two steps leaves unreferenced files, never a row whose
    file is missing.
    """
    with write_transaction() as session:
        deleted_instances = select(instances.c.id).where(instances.c.series_pk.in_(series_ids))
        session.execute(delete(documents).where(documents.c.id.in_(
            select(report_documents.c.document_id).where(report_documents.c.instance_id.in_(deleted_instances)))))
        keys = session.execute(
            select(instances.c.storage_key)
            .where(instances.c.series_pk.in_(series_ids))
            .union_all(
                select(series_results.c.storage_key).where(
                    series_results.c.series_pk.in_(series_ids), series_results.c.storage_key.is_not(None)
                )
            )
        ).scalars().all()
        if session.execute(delete(table).where(table.c.id == row_id)).rowcount != 1:
            raise not_found  # deleted by another client since it was looked up
    remove_files(keys)


# --- storage sweep -------------------------------------------------------------------------------------

_SWEEP_BATCH = 1000


def sweep_storage(min_age_seconds, remove=True):
    """Yield (name, size) of each file that no row refers to, older than `min_age_seconds`, and remove
    it unless `remove` is false: files that a crash left between placing them and committing their row,
    or that a delete could not remove, and the temp files of uploads whose worker was killed.

    The age keeps the sweep away from uploads in flight (a file is placed just before its row commits);
    every upload gets a new key, so an unreferenced file of that age never gains a row. ValueError,
    before anything is removed, when the database does not describe this storage folder.
    """
    cutoff = time.time() - min_age_seconds
    files = storage()
    _check_database_describes(files)
    old_files = (
        (key, size) for key, path in files.placed_files() if (size := _size_if_older(path, cutoff)) is not None
    )
    while batch := dict(itertools.islice(old_files, _SWEEP_BATCH)):
        referenced = set(_referenced_keys(batch))
        db.session.rollback()  # no read transaction (on SQLite, a WAL snapshot) held across the walk
        for key in sorted(batch.keys() - referenced):
            if remove:
                files.delete(key)
            yield key, batch[key]
    for path in sorted(files.temp_paths()):
        size = _size_if_older(path, cutoff)
        if size is not None:
            if remove:
                files.discard_temp(path)
            yield f"tmp/{path.name}", size


def _referenced_keys(keys):
    return db.session.execute(
        select(instances.c.storage_key)
        .where(in_values(instances.c.storage_key, keys))
        .union_all(select(series_results.c.storage_key).where(in_values(series_results.c.storage_key, keys)))
    ).scalars()


def _check_database_describes(files):
    """A sweep against another gateway's database would take every file here for an orphan."""
    some_key = db.session.execute(select(instances.c.storage_key).limit(1)).scalar() or db.session.execute(
        select(series_results.c.storage_key).where(series_results.c.storage_key.is_not(None)).limit(1)
    ).scalar()
    if some_key is None:
        raise ValueError("the database refers to no stored file at all, so every file in the storage folder would "
                         "go: check GATEWAY_DATABASE_URL and GATEWAY_STORAGE_DIR")
    if not files.exists(some_key):
        raise ValueError("the database refers to files that are not in this storage folder: "
                         "GATEWAY_DATABASE_URL and GATEWAY_STORAGE_DIR must be the same gateway's")


def _size_if_older(path, cutoff):
    """The file's size if it was last written before `cutoff`; None if it is newer or gone."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_size if status.st_mtime < cutoff else None


def remove_files(keys):
    files = storage()
    for key in keys:
        try:
            files.delete(key)
        except OSError:  # the rows are gone; an unreferenced file is harmless, a failed answer is not
            log.exception("could not remove stored file %s", key)


def delete_patient(archive, patient_id):
    patient = _find_patient(archive, patient_id)
    series_ids = (
        select(series.c.id).join(studies, studies.c.id == series.c.study_pk).where(studies.c.patient_pk == patient.id)
    )
    _delete_rows_then_files(patients, patient.id, series_ids, _patient_not_found(patient_id))


def delete_study(archive, patient_id, study_uid):
    study = _find_study(archive, patient_id, study_uid)
    series_ids = select(series.c.id).where(series.c.study_pk == study.id)
    _delete_rows_then_files(studies, study.id, series_ids, _study_not_found(patient_id, study_uid))


def delete_series(archive, patient_id, study_uid, series_uid):
    series_row = find_series(archive, patient_id, study_uid, series_uid)
    _delete_rows_then_files(
        series, series_row.id, [series_row.id], _series_not_found(patient_id, study_uid, series_uid)
    )
