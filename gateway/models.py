"""The schema, in one place: SQLAlchemy models of every table, index and store-specific DDL.

Migrations (gateway/migrations/) take a store from one version of these to the next, and schema.sql is
generated from them (`gateway db schema`); tests/test_schema.py checks both against the models.
"""
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DOUBLE_PRECISION,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Table,
    Text,
    TIMESTAMP,
    UniqueConstraint,
    event,
)
from sqlalchemy.schema import DDL

from .db import db

# SQLite only auto-numbers an INTEGER PRIMARY KEY (its rowid alias, which ignores Identity);
# PostgreSQL gets a BIGINT identity column.
Key = BigInteger().with_variant(Integer(), "sqlite")


def _id_column():
    return Column("id", Key, Identity(), primary_key=True)


def _fk(name, target):
    return Column(name, BigInteger, ForeignKey(target, ondelete="CASCADE"), nullable=False)


SERIES_STATUSES = ("uploaded", "processing", "processed", "failed")
PROJECT_KINDS = ("cad4tb", "retina")

users = Table(
    "users",
    db.metadata,
    _id_column(),
    Column("username", String(150), nullable=False, unique=True),
    Column("email", String(254), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", TIMESTAMP, nullable=False),
)

user_permissions = Table(
    "user_permissions",
    db.metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("permission", String(64), primary_key=True),
)

projects = Table(
    "projects",
    db.metadata,
    _id_column(),
    Column("name", String(200), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    CheckConstraint("kind IN ('cad4tb', 'retina')"),
)

project_members = Table(
    "project_members",
    db.metadata,
    Column("project_id", BigInteger, ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("can_upload", Boolean, nullable=False),
    Index("ix_project_members_user", "user_id"),
)

archives = Table(
    "archives",
    db.metadata,
    _id_column(),
    _fk("project_id", "projects.id"),
    Column("name", String(200), nullable=False),
    UniqueConstraint("project_id", "name"),
)

patients = Table(
    "patients",
    db.metadata,
    _id_column(),
    _fk("archive_id", "archives.id"),
    Column("patient_id", String(64), nullable=False),
    Column("patient_name", String(324)),
    Column("patient_sex", String(16)),
    Column("patient_birth_date", Date),
    UniqueConstraint("archive_id", "patient_id"),
)

studies = Table(
    "studies",
    db.metadata,
    _id_column(),
    _fk("archive_id", "archives.id"),
    _fk("patient_pk", "patients.id"),
    Column("study_instance_uid", String(64), nullable=False),
    Column("study_date", Date),
    Column("study_time", String(16)),
    Column("study_description", String(324)),
    Column("referring_physician_name", String(324)),
    Column("institution_name", String(324)),
    Column("accession_number", String(64)),
    UniqueConstraint("archive_id", "study_instance_uid"),
    Index("ix_studies_patient", "patient_pk"),
)

series = Table(
    "series",
    db.metadata,
    _id_column(),
    _fk("archive_id", "archives.id"),
    _fk("study_pk", "studies.id"),
    Column("series_instance_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64)),
    Column("series_date", Date),
    Column("series_time", String(16)),
    Column("series_description", String(324)),
    Column("manufacturer", String(324)),
    Column("manufacturer_model_name", String(324)),
    Column("status", String(16), nullable=False),
    Column("status_message", Text),
    CheckConstraint("status IN ('uploaded', 'processing', 'processed', 'failed')"),
    UniqueConstraint("archive_id", "series_instance_uid"),
    Index("ix_series_study", "study_pk"),
)

instances = Table(
    "instances",
    db.metadata,
    _id_column(),
    _fk("archive_id", "archives.id"),
    _fk("series_pk", "series.id"),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64)),
    Column("filename", String(255), nullable=False),
    Column("storage_key", String(255), nullable=False, unique=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", TIMESTAMP, nullable=False),
    UniqueConstraint("archive_id", "sop_instance_uid"),
    Index("ix_instances_series", "series_pk"),
    Index("ix_instances_sop_instance_uid", "sop_instance_uid"),
)

series_results = Table(
    "series_results",
    db.metadata,
    _id_column(),
    _fk("series_pk", "series.id"),
    Column("result_type", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("algorithm", String(200), nullable=False),
    Column("value_kind", String(8), nullable=False),
    Column("int_value", BigInteger),
    Column("float_value", DOUBLE_PRECISION),
    Column("string_value", Text),
    Column("storage_key", String(255)),
    Column("filename", String(255)),
    Column("size_bytes", BigInteger),
    Column("created_at", TIMESTAMP, nullable=False),
    CheckConstraint("result_type IN ('cad4tb', 'retina')"),
    CheckConstraint("value_kind IN ('int', 'float', 'string', 'file')"),
    UniqueConstraint("series_pk", "name"),
    UniqueConstraint("storage_key"),
)

forms = Table(
    "forms",
    db.metadata,
    _id_column(),
    _fk("project_id", "projects.id"),
    Column("name", String(200), nullable=False),
    Column("definition", Text, nullable=False),
    UniqueConstraint("project_id", "name"),
)

form_submissions = Table(
    "form_submissions",
    db.metadata,
    _id_column(),
    _fk("form_id", "forms.id"),
    _fk("series_pk", "series.id"),
    _fk("user_id", "users.id"),
    Column("entry", Text, nullable=False),
    Column("created_at", TIMESTAMP, nullable=False),
    Index("ix_form_submissions_series", "series_pk"),
)

# The annotation store. A document is linked to the archive instances that have its SOPInstanceUID
# by that UID (indexed on both sides), so the link holds whichever of the two arrives first.

concepts = Table(
    "concepts",
    db.metadata,
    Column("cui", String(16), primary_key=True),
    Column("pref", Text, nullable=False),
)

concept_types = Table(
    "concept_types",
    db.metadata,
    Column("cui", String(16), ForeignKey("concepts.cui", ondelete="CASCADE"), primary_key=True),
    Column("sty", String(100), primary_key=True),
    Column("tui", String(8)),
    Column("semantic_group", String(8), nullable=False),
)

# A concept's other English names (UMLS atoms), which the report annotator matches besides the preferred one.
concept_synonyms = Table(
    "concept_synonyms",
    db.metadata,
    Column("cui", String(16), ForeignKey("concepts.cui", ondelete="CASCADE"), primary_key=True),
    Column("name", String(255), primary_key=True),
)

# Narrower concepts: child_cui is narrower than parent_cui. No foreign keys, as a source may relate
# concepts that the loaded subset leaves out.
concept_relations = Table(
    "concept_relations",
    db.metadata,
    Column("parent_cui", String(16), primary_key=True),
    Column("child_cui", String(16), primary_key=True),
)

concept_snomed = Table(
    "concept_snomed",
    db.metadata,
    Column("snomed_id", String(18), primary_key=True),
    Column("cui", String(16), primary_key=True),
)

mappings = Table(
    "mappings",
    db.metadata,
    _id_column(),
    Column("name", String(200), nullable=False, unique=True),
)

mapping_entries = Table(
    "mapping_entries",
    db.metadata,
    Column("mapping_id", BigInteger, ForeignKey("mappings.id", ondelete="CASCADE"), primary_key=True),
    Column("term", String(200), primary_key=True),
    Column("cui", String(16), primary_key=True),
)

documents = Table(
    "documents",
    db.metadata,
    _id_column(),
    Column("sop_instance_uid", String(255), nullable=False, unique=True),
    Column("series_instance_uid", String(255)),
    Column("study_instance_uid", String(255)),
    Column("patient_id", String(255)),
    Column("sop_class_uid", String(255)),
    Column("content_date", Date),
    Column("modalities_in_study", String(255)),
    Column("report_text", Text),
    Column("phenotypes", Text),
    Column("sentences", Text),
    Column("imported_at", TIMESTAMP, nullable=False),
    Index("ix_documents_content_date", "content_date"),
    # What a search reads of each document it matched (the default result and the date and modality
    # filters), found by id without reading the document's row and its report text.
    Index("ix_documents_search", "id", "sop_instance_uid", "content_date", "modalities_in_study"),
    Index("ix_documents_series", "series_instance_uid"),
    Index("ix_documents_study", "study_instance_uid"),
)

# The documents that the report annotator read from the archive's SR instances (gateway.reports): deleting the
# instance deletes its document (gateway.archive's deletes), and a document is never written for an instance
# deleted meanwhile.
report_documents = Table(
    "report_documents",
    db.metadata,
    Column("instance_id", BigInteger, ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("document_id", BigInteger, ForeignKey("documents.id", ondelete="CASCADE"), nullable=False, unique=True),
)

# The archive's SR instances whose report text awaits the annotator (gateway.reports). A worker takes a job
# by a lease (claimed_until), so that several share the queue and a job of one that died is taken again.
report_jobs = Table(
    "report_jobs",
    db.metadata,
    Column("instance_id", BigInteger, ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("enqueued_at", TIMESTAMP, nullable=False),
    Column("claimed_until", TIMESTAMP),
    Column("attempts", Integer, nullable=False),
    Column("failed", Boolean, nullable=False),  # given up after the last attempt, with its reason
    Column("last_error", Text),
    Index("ix_report_jobs_queue", "failed", "enqueued_at"),
)

# The full-text index of the report texts; each store has its own kind, made by DDL of its own: an FTS5
# table that triggers keep in step on SQLite, a GIN index on PostgreSQL.
SQLITE_FTS_TABLE = "documents_fts"
POSTGRESQL_FTS_INDEX = "ix_documents_fts"
FULL_TEXT_DDL = {
    "sqlite": (
        """CREATE VIRTUAL TABLE documents_fts USING fts5(
    report_text, content='documents', content_rowid='id', tokenize='porter unicode61'
)""",
        """CREATE TRIGGER documents_fts_insert AFTER INSERT ON documents BEGIN
    INSERT INTO documents_fts (rowid, report_text) VALUES (new.id, new.report_text);
END""",
        """CREATE TRIGGER documents_fts_delete AFTER DELETE ON documents BEGIN
    INSERT INTO documents_fts (documents_fts, rowid, report_text) VALUES ('delete', old.id, old.report_text);
END""",
        """CREATE TRIGGER documents_fts_update AFTER UPDATE OF report_text ON documents BEGIN
    INSERT INTO documents_fts (documents_fts, rowid, report_text) VALUES ('delete', old.id, old.report_text);
    INSERT INTO documents_fts (rowid, report_text) VALUES (new.id, new.report_text);
END""",
    ),
    "postgresql": (
        "CREATE INDEX ix_documents_fts ON documents USING GIN (to_tsvector('english', coalesce(report_text, '')))",
    ),
}
for _dialect, _statements in FULL_TEXT_DDL.items():
    for _statement in _statements:
        event.listen(documents, "after_create", DDL(_statement).execute_if(dialect=_dialect))

# One row per annotation of a document, in the order of the NLP file. The concept index holds every
# column a cohort query tests, so "documents with one of these CUIs and these qualifiers" is answered
# from the index alone.
annotations = Table(
    "annotations",
    db.metadata,
    Column("document_id", BigInteger, ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("cui", String(16), nullable=False),
    Column("pref", Text),
    Column("str", Text),
    Column("sty", String(100)),
    Column("start_offset", Integer),
    Column("end_offset", Integer),
    Column("negation", String(16)),
    Column("experiencer", String(16)),
    Column("temporality", String(16)),
    Column("ruled_out", Boolean, nullable=False),
    Index("ix_annotations_concept", "cui", "ruled_out", "negation", "experiencer", "temporality", "document_id"),
)

# Which CUIs were annotated under which preferred name (lower-cased; '' for an annotation without one):
# free text finds its CUIs here, then the concept index, instead of a second index over every annotation.
# A CUI whose every name matched is looked up by the concept index alone; the others' annotations have
# their name checked. Rows may outlive their annotations: a stale row only costs a check.
annotation_prefs = Table(
    "annotation_prefs",
    db.metadata,
    Column("pref_key", Text, primary_key=True),
    Column("cui", String(16), primary_key=True),
    Index("ix_annotation_prefs_cui", "cui", "pref_key"),
)

# The words of each preferred name in annotation_prefs (gateway.annotations.words: English stems, at
# their positions in the name), which free text is looked up by: stem first, so a word's names are one
# range of the key.
annotation_pref_words = Table(
    "annotation_pref_words",
    db.metadata,
    Column("stem", Text, primary_key=True),
    Column("pref_key", Text, primary_key=True),
    Column("position", Integer, primary_key=True),
)

# Every search of the annotation API, for audit.
search_transactions = Table(
    "search_transactions",
    db.metadata,
    Column("id", String(36), primary_key=True),
    Column("created_at", TIMESTAMP, nullable=False),
    Column("client_address", String(64)),
    Column("call", String(64), nullable=False),
    Column("query", Text, nullable=False),
    Column("num_results", BigInteger),
    Index("ix_search_transactions_created", "created_at"),
)

# Failed sign-ins (v1 credentials by client address and by account, the annotation passphrase by client
# address), counted where every worker sees them: a key with too many failures in its window is answered
# 429 until the window ends.
auth_failures = Table(
    "auth_failures",
    db.metadata,
    Column("scope", String(16), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_started_at", TIMESTAMP, nullable=False),
    Index("ix_auth_failures_window", "window_started_at"),
)
