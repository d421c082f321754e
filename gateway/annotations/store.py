"""The annotation store: documents with their NLP annotations, written in batches, read back per document."""
import dataclasses
import datetime
import json
import re
from contextlib import contextmanager

from sqlalchemy import ARRAY, bindparam, delete, func, select, true

from ..db import (
    DIALECT_INSERTS,
    bulk_insert,
    db,
    in_values,
    insert_ignoring_conflicts,
    utcnow,
    values_table,
    write_transaction,
)
from ..errors import InvalidValue, ObjectNotFound
from ..models import annotation_pref_words, annotation_prefs, annotations, documents, instances, report_documents
from ..validation import storable_text
from .words import words

CUI_PATTERN = re.compile(r"[Cc]\d{1,15}")

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
_ANNOTATION_TEXT_LIMITS = {  # TEXT columns: a bound all the same, against runaway NLP output
    field: annotations.c[field].type.length or 10_000
    for field in ("cui", "pref", "str", "sty", "negation", "experiencer", "temporality")
}


@dataclasses.dataclass
class Document:
    """One report: its DICOM metadata, text and the NLP result for it."""

    sop_instance_uid: str
    annotations: list  # the NLP annotation objects; checked and made rows when the Document is made
    phenotypes: list = dataclasses.field(default_factory=list)
    sentences: list = dataclasses.field(default_factory=list)
    report_text: str = None
    series_instance_uid: str = None
    study_instance_uid: str = None
    patient_id: str = None
    sop_class_uid: str = None
    content_date: datetime.date = None
    modalities_in_study: str = None
    source_instance_id: int = None  # the archive's SR instance it was read from (gateway.reports), if any

    def __post_init__(self):
        self.annotation_rows = annotation_rows(self.annotations)

    def __getstate__(self):
        # Sent to another process (the importer's reader), only the rows are needed: the NLP
        # objects are as large again and cost as much to unpickle as the rows cost to write.
        return {**self.__dict__, "annotations": None}


def dicom_date(value):
    """A DICOM DA value (YYYYMMDD, or the older YYYY.MM.DD) as a date; ValueError if it is none."""
    text = value.strip().replace(".", "").replace("-", "")
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else _not_a_date(value)
    except ValueError:
        _not_a_date(value)


def _not_a_date(value):
    raise ValueError(f"ContentDate {value!r} is not a DICOM date (YYYYMMDD)")


def _encodes(value):
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def annotation_rows(nlp_annotations):
    """The annotation rows of one document, (position, cui, …, ruled_out) in _ANNOTATION_COLUMNS order
    after document_id; ValueError names the first annotation that cannot be stored."""
    rows = []
    for position, annotation in enumerate(nlp_annotations):
        if type(annotation) is not dict:
            raise ValueError(f"annotation {position} is not an object")
        get = annotation.get
        texts = tuple(map(get, _ANNOTATION_TEXT_LIMITS))
        for value, (field, limit) in zip(texts, _ANNOTATION_TEXT_LIMITS.items()):
            # storable_text's common case, inline; ASCII text cannot hold a lone surrogate
            if value is not None and not (
                type(value) is str and len(value) <= limit and "\x00" not in value and (value.isascii() or _encodes(value))
            ):
                storable_text(value, f"annotation {position}: '{field}'", limit)  # raises, saying why
        cui, pref, text, sty, negation, experiencer, temporality = texts
        if not cui:
            raise ValueError(f"annotation {position} has no 'cui'")
        start, end = get("start"), get("end")
        for field, value in (("start", start), ("end", end)):
            if value is not None and type(value) is not int:
                raise ValueError(f"annotation {position}: '{field}' is not an integer")
        ruled_by = get("ruled_by") or []
        if type(ruled_by) is not list:
            raise ValueError(f"annotation {position}: 'ruled_by' is not a list")
        rows.append(
            (
                position, cui, pref, text, sty, start, end,
                _CANONICAL.get(negation.lower(), negation) if negation else negation,
                _CANONICAL.get(experiencer.lower(), experiencer) if experiencer else experiencer,
                _CANONICAL.get(temporality.lower(), temporality) if temporality else temporality,
                any(rule in RULED_OUT_BY for rule in ruled_by),
            )  # fmt: skip
        )
    return rows


_DOCUMENT_COLUMNS = (
    "id", "sop_instance_uid", "series_instance_uid", "study_instance_uid", "patient_id", "sop_class_uid",
    "content_date", "modalities_in_study", "report_text", "phenotypes", "sentences", "imported_at",
)  # fmt: skip
_ANNOTATION_COLUMNS = (
    "document_id", "position", "cui", "pref", "str", "sty", "start_offset", "end_offset",
    "negation", "experiencer", "temporality", "ruled_out",
)  # fmt: skip
# positions in an annotation row (_ANNOTATION_COLUMNS without document_id)
_CUI_COLUMN, _PREF_COLUMN = _ANNOTATION_COLUMNS.index("cui") - 1, _ANNOTATION_COLUMNS.index("pref") - 1


# An import that brings at least this many documents, and more than the store holds, is a bulk load.
BULK_LOAD_MINIMUM = 50_000
# What a bulk load builds at its end (all but the unique index that finds a document to replace)
_DEFERRED_INDEXES = [index for table in (documents, annotations) for index in table.indexes if not index.unique]


@contextmanager
def loading(document_count):
    """Around an import of `document_count` documents. A bulk load drops the secondary indexes of
    documents and annotations and builds them again at the end, each by one sort: grown instead by
    one insert per row at a random place, they cost a page write per row once they outgrow the cache
    (on SQLite, 200,000 documents in, the concept index alone halved the import's rate). Meanwhile
    searches scan.
    An import that finds an index missing (a bulk load that crashed) builds it first."""
    for index in _DEFERRED_INDEXES:
        index.create(db.engine, checkfirst=True)
    stored = db.session.execute(select(func.count()).select_from(documents)).scalar_one()
    db.session.rollback()
    bulk = document_count >= BULK_LOAD_MINIMUM and document_count > stored
    if bulk:
        for index in _DEFERRED_INDEXES:
            index.drop(db.engine)
    try:
        yield bulk
    finally:
        if bulk:
            with db.engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql("SET maintenance_work_mem = '512MB'")  # sort in memory
                for index in _DEFERRED_INDEXES:
                    index.create(connection)
                connection.commit()


def import_documents(batch, known_prefs=None):
    """Store a batch of Documents in one transaction, replacing stored ones with the same SOPInstanceUID.

    Returns (imported, replaced): how many were new and how many replaced an earlier import (a
    document twice in the batch counts as replaced once). known_prefs: a set that one import's
    batches share, of the (preferred name, CUI) pairs already recorded, so each is written once.
    """
    latest = {document.sop_instance_uid: document for document in batch}
    now = utcnow()
    with write_transaction() as session:
        earlier = len(
            session.execute(
                delete(documents).where(in_values(documents.c.sop_instance_uid, latest)).returning(documents.c.id)
            ).all()
        )
        document_ids = dict(zip(latest, _new_document_ids(session, len(latest))))
        bulk_insert(
            session,
            documents,
            _DOCUMENT_COLUMNS,
            ((document_ids[uid], *_document_values(document), now) for uid, document in latest.items()),
        )
        bulk_insert(
            session,
            annotations,
            _ANNOTATION_COLUMNS,
            ((document_ids[uid], *row) for uid, document in latest.items() for row in document.annotation_rows),
        )
        sources = [{"instance_id": document.source_instance_id, "document_id": document_ids[uid]}
                   for uid, document in latest.items() if document.source_instance_id is not None]
        if sources:  # an instance deleted meanwhile fails its foreign key: nothing is written
            session.execute(report_documents.insert(), sources)
        # every annotation's (preferred name, CUI), '' for no name: free text tells from them which CUIs
        # have only names that it matched
        new_prefs = {
            (row[_PREF_COLUMN] or "", row[_CUI_COLUMN])
            for document in latest.values()
            for row in document.annotation_rows
        } - (known_prefs or set())
        if new_prefs:
            unindexed = _unrecorded_keys(session, {pref for pref, _cui in new_prefs})
            recorded = insert_ignoring_conflicts(annotation_prefs).values(
                pref_key=func.lower(bindparam("pref")), cui=bindparam("cui")
            )
            session.execute(recorded, [{"pref": pref, "cui": cui} for pref, cui in new_prefs])
            _index_pref_words(session.connection(), unindexed)
    if known_prefs is not None:
        known_prefs |= new_prefs
    return len(latest) - earlier, earlier + len(batch) - len(latest)


def _unrecorded_keys(session, prefs):
    """The keys (lower-cased, as annotation_prefs has them) of `prefs` that annotation_prefs lacks yet, so
    that no word of theirs is indexed; each once."""
    listed = values_table(prefs)
    key = func.lower(listed.c.value)
    recorded = select(annotation_prefs.c.pref_key).where(annotation_prefs.c.pref_key == key)
    return session.execute(select(key).where(~recorded.exists()).distinct()).scalars().all()


def _index_pref_words(connection, keys):
    """Adds the words of the preferred names `keys` to annotation_pref_words, leaving those already
    there (an import running at the same time may have added them). One statement, its rows bound as
    arrays (PostgreSQL) or one JSON array (SQLite): an executemany costs several times as much a row
    (on PostgreSQL a round trip each)."""
    rows = [(stem, key, position) for key in keys for position, stem in words(key)]
    if not rows:
        return
    columns = ("stem", "pref_key", "position")
    if connection.dialect.name == "postgresql":
        arrays = [
            bindparam(None, list(values), type_=ARRAY(annotation_pref_words.c[name].type))
            for values, name in zip(zip(*rows), columns)
        ]
        listed = func.unnest(*arrays).table_valued(*columns).render_derived()
        rows_table = select(*listed.c)
    else:
        listed = func.json_each(bindparam(None, json.dumps(rows))).table_valued("value")
        # WHERE: SQLite parses an upsert's INSERT … SELECT only with one
        fields = [func.json_extract(listed.c.value, f"$[{index}]") for index in range(len(columns))]
        rows_table = select(*fields).where(true())
    insert = DIALECT_INSERTS[connection.dialect.name](annotation_pref_words)
    connection.execute(insert.from_select(columns, rows_table).on_conflict_do_nothing())


def rebuild_pref_words(connection):
    """Builds annotation_prefs and annotation_pref_words afresh from the stored annotations, as imports
    keep them: for a store whose annotations were imported before (a migration's step; it reads every
    annotation). `connection`: one in a write transaction."""
    connection.execute(delete(annotation_pref_words))
    connection.execute(delete(annotation_prefs))
    pairs = select(func.coalesce(func.lower(annotations.c.pref), ""), annotations.c.cui).distinct()
    connection.execute(annotation_prefs.insert().from_select(["pref_key", "cui"], pairs))
    keys = connection.execute(select(annotation_prefs.c.pref_key).distinct()).scalars().all()
    _index_pref_words(connection, keys)


def _new_document_ids(session, count):
    """Ids for `count` new documents, taken before they are written so that rows go in by COPY."""
    if session.get_bind().dialect.name == "postgresql":
        sequence = func.pg_get_serial_sequence("documents", "id")
        return session.execute(select(func.nextval(sequence)).select_from(func.generate_series(1, count))).scalars().all()
    # SQLite: the write transaction holds the database's lock, so nobody else takes these.
    highest = session.execute(select(func.coalesce(func.max(documents.c.id), 0))).scalar_one()
    return range(highest + 1, highest + 1 + count)


def _document_values(document):
    """The values of _DOCUMENT_COLUMNS between id and imported_at."""
    return (
        document.sop_instance_uid, document.series_instance_uid, document.study_instance_uid,
        document.patient_id, document.sop_class_uid, document.content_date, document.modalities_in_study,
        document.report_text, json.dumps(document.phenotypes), json.dumps(document.sentences),
    )  # fmt: skip


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
