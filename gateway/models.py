"""SQLAlchemy models of the tables in schema.sql (the canonical DDL; tests/test_schema.py keeps both in step)."""
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DOUBLE_PRECISION,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TIMESTAMP,
    UniqueConstraint,
)

from .db import db

# SQLite only auto-numbers an INTEGER PRIMARY KEY (its rowid alias); PostgreSQL gets BIGINT.
Key = BigInteger().with_variant(Integer(), "sqlite")


def _id_column():
    return Column("id", Key, primary_key=True, autoincrement=True)


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
