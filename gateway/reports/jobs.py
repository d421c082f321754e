"""The queue of the archive's SR instances awaiting the report annotator, in the table report_jobs.

An upload of an SR instance writes its job in the same transaction as its row (gateway.archive), so no stored
report is missed. A worker takes jobs by a lease: it sets claimed_until, and nobody else takes them until then
(on PostgreSQL the rows are picked with FOR UPDATE SKIP LOCKED, so that workers on several machines never
wait for each other; SQLite's write lock keeps its claimers apart). A job that is done is deleted; one that
fails is tried again after a pause, MAX_ATTEMPTS times in all, and then kept with its reason. A worker that
dies leaves its jobs to be taken again when their lease ends. Annotating the same instance twice is harmless:
its document is replaced as a whole.
"""
import datetime
from typing import NamedTuple

import pydicom
from sqlalchemy import delete, func, literal, select, update
from sqlalchemy.exc import IntegrityError

from ..annotations.store import Document, dicom_date, import_documents
from ..archive import storage
from ..db import db, utcnow, write_transaction
from ..dicom_ingest import REPORT_SOP_CLASSES
from ..models import instances, patients, report_jobs, series, studies
from .sr import MODALITY_OF_SOP_CLASS, report_text

MAX_ATTEMPTS = 3
LEASE = datetime.timedelta(minutes=10)  # far longer than a report takes, even under load
RETRY_PAUSE = datetime.timedelta(seconds=30)
_REASON_CHARACTERS = 1_000


class QueueState(NamedTuple):
    pending: int
    failed: list  # (SOPInstanceUID, attempts, reason) of each job given up


def enqueue_stored(archive_id=None):
    """Queue every stored SR instance (of one archive, or of all) for the annotator again, failed ones too;
    the number queued."""
    reports = select(instances.c.id).where(instances.c.sop_class_uid.in_(REPORT_SOP_CLASSES))
    if archive_id is not None:
        reports = reports.where(instances.c.archive_id == archive_id)
    now = utcnow()
    with write_transaction() as session:
        session.execute(delete(report_jobs).where(report_jobs.c.instance_id.in_(reports)))
        queued = select(instances.c.id, literal(now, report_jobs.c.enqueued_at.type), literal(0), literal(False)).where(
            instances.c.id.in_(reports))
        return len(session.execute(report_jobs.insert().from_select(
            ["instance_id", "enqueued_at", "attempts", "failed"], queued).returning(report_jobs.c.instance_id)).all())


def claim(count, lease=LEASE):
    """Take up to `count` jobs that nobody holds, oldest first, for `lease`; their instance ids."""
    now = utcnow()
    free = ~report_jobs.c.failed & (report_jobs.c.claimed_until.is_(None) | (report_jobs.c.claimed_until < now))
    if db.session.execute(select(literal(1)).where(free).limit(1)).first() is None:
        db.session.rollback()
        return []  # the common case of an idle worker, answered without a write transaction
    oldest = (
        select(report_jobs.c.instance_id)
        .where(free)
        .order_by(report_jobs.c.enqueued_at, report_jobs.c.instance_id)
        .limit(count)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has no row locks and renders nothing
    )
    with write_transaction() as session:
        return session.execute(
            update(report_jobs).where(report_jobs.c.instance_id.in_(oldest.scalar_subquery()))
            .values(claimed_until=now + lease).returning(report_jobs.c.instance_id)
        ).scalars().all()


def annotate_job(instance_id, annotator):
    """Read the SR instance's report, annotate it and store its document (replacing an earlier one), then end
    the job. False when the instance is gone (deleted since it was queued): nothing is stored."""
    document = report_document(instance_id, annotator)
    if document is None:
        return False
    try:
        import_documents([document])
    except IntegrityError:  # the instance was deleted while its report was read: so is its job
        return False
    with write_transaction() as session:
        session.execute(delete(report_jobs).where(report_jobs.c.instance_id == instance_id))
    return True


def record_failure(instance_id, error):
    """Count a failed attempt of the job and keep its reason; after the last attempt it is given up."""
    reason = f"{type(error).__name__}: {error}"[:_REASON_CHARACTERS]
    with write_transaction() as session:
        session.execute(
            update(report_jobs).where(report_jobs.c.instance_id == instance_id).values(
                attempts=report_jobs.c.attempts + 1,
                failed=report_jobs.c.attempts + 1 >= MAX_ATTEMPTS,
                last_error=reason,
                claimed_until=utcnow() + RETRY_PAUSE,
            )
        )


def queue_state():
    pending = db.session.execute(select(func.count()).select_from(report_jobs).where(~report_jobs.c.failed)).scalar_one()
    failed = db.session.execute(
        select(instances.c.sop_instance_uid, report_jobs.c.attempts, report_jobs.c.last_error)
        .join(instances, instances.c.id == report_jobs.c.instance_id)
        .where(report_jobs.c.failed)
        .order_by(report_jobs.c.enqueued_at)
    ).all()
    return QueueState(pending, [tuple(row) for row in failed])


_INSTANCE = (
    select(
        instances.c.id, instances.c.sop_instance_uid, instances.c.sop_class_uid, instances.c.storage_key,
        series.c.series_instance_uid, studies.c.id.label("study_pk"), studies.c.study_instance_uid,
        studies.c.study_date, patients.c.patient_id,
    )
    .join(series, series.c.id == instances.c.series_pk)
    .join(studies, studies.c.id == series.c.study_pk)
    .join(patients, patients.c.id == studies.c.patient_pk)
)


def report_document(instance_id, annotator):
    """The annotated Document of a stored SR instance, with the metadata the archive holds of it; None if the
    instance is gone."""
    row = db.session.execute(_INSTANCE.where(instances.c.id == instance_id)).first()
    if row is None:
        return None
    dataset = pydicom.dcmread(storage().path(row.storage_key))
    text = report_text(dataset)
    content_date = dataset.get("ContentDate")
    modalities = dataset.get("ModalitiesInStudy") or _modalities_in_study(row.study_pk)
    document = Document(
        sop_instance_uid=row.sop_instance_uid,
        annotations=annotator.annotate(text),
        report_text=text,
        series_instance_uid=row.series_instance_uid,
        study_instance_uid=row.study_instance_uid,
        patient_id=row.patient_id,
        sop_class_uid=row.sop_class_uid,
        content_date=dicom_date(content_date) if content_date else row.study_date,
        modalities_in_study="\\".join(modalities) if not isinstance(modalities, str) else modalities,
        source_instance_id=row.id,
    )
    db.session.rollback()  # no read transaction held while the document is written
    return document


def _modalities_in_study(study_pk):
    """The modalities of the study's stored series, from their SOP classes, in order."""
    classes = db.session.execute(select(series.c.sop_class_uid).where(series.c.study_pk == study_pk).distinct()).scalars()
    return sorted({MODALITY_OF_SOP_CLASS[uid] for uid in classes if uid in MODALITY_OF_SOP_CLASS})
