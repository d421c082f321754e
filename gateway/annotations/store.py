"""The annotation store: documents with their NLP annotations, written in batches, read back per document."""
import dataclasses
import datetime
import json

from sqlalchemy import bindparam, delete, func, insert, select

from ..db import db, in_values, insert_ignoring_conflicts, utcnow, write_transaction
from ..errors import InvalidValue, ObjectNotFound
from ..models import annotation_prefs, annotations, documents, instances

# Qualifier values as SemEHR writes them; matching ignores case, so imports store this spelling.
NEGATIONS = ("Affirmed", "Negated")
EXPERIENCERS = ("Patient", "Other")
TEMPORALITIES = ("Recent", "historical", "hypothetical")
_CANONICAL = {value.lower(): value for value in NEGATIONS + EXPERIENCERS + TEMPORALITIES}

# Post-processing filters whose verdict removes an annotation from searches and from doc_detail.
RULED_OUT_BY = ("not_mention_filters.json", "skip terms")

# DICOM keyword of each document column, in the order doc_detail shows them.
METADATA_COLUMNS = {
    "SOPInstanceUID": documents.c.sop_instance_uid,
    "SeriesInstanceUID": documents.c.series_instance_uid,
    "StudyInstanceUID": documents.c.study_instance_uid,
    "PatientID": documents.c.patient_id,
    "SOPClassUID": documents.c.sop_class_uid,
    "ContentDate": documents.c.content_date,
    "ModalitiesInStudy": documents.c.modalities_in_study,
}
_ANNOTATION_TEXT_FIELDS = ("cui", "pref", "str", "sty", "negation", "experiencer", "temporality")


@dataclasses.dataclass
class Document:
    """One report: its DICOM metadata, text and the NLP result for it."""

    sop_instance_uid: str
    annotations: list
    phenotypes: list = dataclasses.field(default_factory=list)
    sentences: list = dataclasses.field(default_factory=list)
    report_text: str = None
    series_instance_uid: str = None
    study_instance_uid: str = None
    patient_id: str = None
    sop_class_uid: str = None
    content_date: datetime.date = None
    modalities_in_study: str = None


def canonical_qualifier(value):
    """A qualifier in the spelling the store keeps (unknown values are kept as written)."""
    if value is None:
        return None
    return _CANONICAL.get(value.lower(), value)


def dicom_date(value):
    """A DICOM DA value (YYYYMMDD, or the older YYYY.MM.DD) as a date; ValueError if it is none."""
    text = value.strip().replace(".", "").replace("-", "")
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else _not_a_date(value)
    except ValueError:
        _not_a_date(value)


def _not_a_date(value):
    raise ValueError(f"ContentDate {value!r} is not a DICOM date (YYYYMMDD)")


def annotation_row(position, annotation):
    """The row of one NLP annotation; ValueError names what is wrong with it."""
    if not isinstance(annotation, dict):
        raise ValueError(f"annotation {position} is not an object")
    row = {"position": position}
    for field in _ANNOTATION_TEXT_FIELDS:
        value = annotation.get(field)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"annotation {position}: '{field}' is not a string")
        row[field] = value
    if not row["cui"]:
        raise ValueError(f"annotation {position} has no 'cui'")
    if len(row["cui"]) > 16:
        raise ValueError(f"annotation {position}: cui {row['cui'][:20]!r}… is longer than 16 characters")
    for field, column in (("start", "start_offset"), ("end", "end_offset")):
        value = annotation.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"annotation {position}: '{field}' is not an integer")
        row[column] = value
    for field in ("negation", "experiencer", "temporality"):
        row[field] = canonical_qualifier(row[field])
    ruled_by = annotation.get("ruled_by") or []
    if not isinstance(ruled_by, list):
        raise ValueError(f"annotation {position}: 'ruled_by' is not a list")
    row["ruled_out"] = any(rule in RULED_OUT_BY for rule in ruled_by)
    return row


def import_documents(batch):
    """Store a batch of Documents in one transaction, replacing stored ones with the same SOPInstanceUID.

    Returns (imported, replaced): how many were new and how many replaced an earlier import (a
    document twice in the batch counts as replaced once).
    """
    latest = {document.sop_instance_uid: document for document in batch}
    annotation_rows = {uid: [annotation_row(i, a) for i, a in enumerate(doc.annotations)] for uid, doc in latest.items()}
    now = utcnow()
    with write_transaction() as session:
        earlier = len(
            session.execute(
                delete(documents).where(in_values(documents.c.sop_instance_uid, latest)).returning(documents.c.id)
            ).all()
        )
        document_ids = dict(
            session.execute(
                insert(documents).returning(documents.c.sop_instance_uid, documents.c.id, sort_by_parameter_order=True),
                [_document_row(document, now) for document in latest.values()],
            ).all()
        )
        rows = [
            {**row, "document_id": document_ids[uid]} for uid, uid_rows in annotation_rows.items() for row in uid_rows
        ]
        if rows:
            session.execute(insert(annotations), rows)
            _remember_prefs(session, rows)
    return len(latest) - earlier, earlier + len(batch) - len(latest)


def _document_row(document, imported_at):
    row = dataclasses.asdict(document)
    del row["annotations"]
    row["phenotypes"] = json.dumps(document.phenotypes)
    row["sentences"] = json.dumps(document.sentences)
    row["imported_at"] = imported_at
    return row


def _remember_prefs(session, rows):
    pairs = {(row["pref"], row["cui"]) for row in rows if row["pref"]}
    statement = insert_ignoring_conflicts(annotation_prefs).values(
        pref_key=func.lower(bindparam("pref")), cui=bindparam("cui")
    )
    session.execute(statement, [{"pref": pref, "cui": cui} for pref, cui in pairs])


def delete_document(sop_instance_uid):
    with write_transaction() as session:
        deleted = session.execute(
            delete(documents).where(documents.c.sop_instance_uid == sop_instance_uid).returning(documents.c.id)
        ).first()
    if deleted is None:
        raise ObjectNotFound("document_not_found", f"no document {sop_instance_uid!r}")


def _document_by_uid(sop_instance_uid):
    row = db.session.execute(select(documents).where(documents.c.sop_instance_uid == sop_instance_uid)).first()
    if row is None:
        raise ObjectNotFound("document_not_found", f"no document {sop_instance_uid!r}")
    return row


def metadata_json(row):
    """A document's DICOM metadata by keyword; ContentDate in DICOM format (YYYYMMDD)."""
    values = {keyword: getattr(row, column.name) for keyword, column in METADATA_COLUMNS.items()}
    if values["ContentDate"] is not None:
        values["ContentDate"] = values["ContentDate"].strftime("%Y%m%d")
    return values


def _annotation_json(row):
    return {
        "start": row.start_offset,
        "end": row.end_offset,
        "str": row.str,
        "cui": row.cui,
        "pref": row.pref,
        "sty": row.sty,
        "negation": row.negation,
        "experiencer": row.experiencer,
        "temporality": row.temporality,
    }


def doc_detail(sop_instance_uid, only_cuis=None):
    """{"anns": {metadata, annotations, phenotypes, sentences}, "content": text} of one document.

    Ruled-out annotations are left out. only_cuis: {cui: term}, to keep just the annotations of
    those CUIs, each marked with "mapped": its term.
    """
    document = _document_by_uid(sop_instance_uid)
    statement = (
        select(annotations)
        .where(annotations.c.document_id == document.id, annotations.c.ruled_out.is_(False))
        .order_by(annotations.c.position)
    )
    if only_cuis is not None:
        statement = statement.where(in_values(annotations.c.cui, only_cuis))
    annotation_list = []
    for row in db.session.execute(statement):
        annotation = _annotation_json(row)
        if only_cuis is not None:
            annotation["mapped"] = only_cuis[row.cui]
        annotation_list.append(annotation)
    anns = {
        **metadata_json(document),
        "annotations": annotation_list,
        "phenotypes": json.loads(document.phenotypes or "[]"),
        "sentences": json.loads(document.sentences or "[]"),
    }
    return {"anns": anns, "content": document.report_text}


def document_uids(offset=0, limit=100):
    """SOPInstanceUIDs of stored documents, in UID order, one page."""
    if offset < 0 or not 1 <= limit <= 10_000:
        raise InvalidValue("invalid_paging", "offset must be at least 0 and limit between 1 and 10000")
    statement = (
        select(documents.c.sop_instance_uid).order_by(documents.c.sop_instance_uid).offset(offset).limit(limit)
    )
    return db.session.execute(statement).scalars().all()


def linked_instances(sop_instance_uid):
    """The archive instances that are this document (same SOPInstanceUID): (archive id, instance id)."""
    statement = (
        select(instances.c.archive_id, instances.c.id)
        .where(instances.c.sop_instance_uid == sop_instance_uid)
        .order_by(instances.c.archive_id)
    )
    return db.session.execute(statement).all()
