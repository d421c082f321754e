"""the schema before migrations

The tables, indexes and full-text index that `gateway init-db` made from schema.sql before the gateway had
migrations. A store that it made has all of them, or all but the newest (a store older than the credential
throttle lacks auth_failures): each table is created only where it is absent, with its indexes, so that
upgrading such a store adopts it.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only auto-numbers an INTEGER PRIMARY KEY (its rowid alias); PostgreSQL gets a BIGINT identity.
KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

SQLITE_FTS = (
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
)


def _id():
    return sa.Column("id", KEY, sa.Identity(), primary_key=True)


def _fk(name, target):
    return sa.Column(name, sa.BigInteger(), sa.ForeignKey(target, ondelete="CASCADE"), nullable=False)


def upgrade():
    present = set(sa.inspect(op.get_bind()).get_table_names())
    dialect = op.get_bind().dialect.name

    def create(name, *elements, indexes=()):
        """Create the table with its indexes (name, columns) unless the store has it; True if it did."""
        if name in present:
            return False
        op.create_table(name, *elements)
        for index_name, columns in indexes:
            op.create_index(index_name, name, columns)
        return True

    create(
        "users",
        _id(),
        sa.Column("username", sa.String(150), nullable=False, unique=True),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.TIMESTAMP(), nullable=False),
    )
    create(
        "user_permissions",
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("permission", sa.String(64), primary_key=True),
    )
    create(
        "projects",
        _id(),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.CheckConstraint("kind IN ('cad4tb', 'retina')"),
    )
    create(
        "project_members",
        sa.Column("project_id", sa.BigInteger(), sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("can_upload", sa.Boolean(), nullable=False),
        indexes=[("ix_project_members_user", ["user_id"])],
    )
    create(
        "archives",
        _id(),
        _fk("project_id", "projects.id"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.UniqueConstraint("project_id", "name"),
    )
    create(
        "patients",
        _id(),
        _fk("archive_id", "archives.id"),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("patient_sex", sa.String(16)),
        sa.Column("patient_birth_date", sa.Date()),
        sa.UniqueConstraint("archive_id", "patient_id"),
    )
    create(
        "studies",
        _id(),
        _fk("archive_id", "archives.id"),
        _fk("patient_pk", "patients.id"),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_date", sa.Date()),
        sa.Column("study_time", sa.String(16)),
        sa.Column("study_description", sa.String(324)),
        sa.Column("referring_physician_name", sa.String(324)),
        sa.Column("institution_name", sa.String(324)),
        sa.Column("accession_number", sa.String(64)),
        sa.UniqueConstraint("archive_id", "study_instance_uid"),
        indexes=[("ix_studies_patient", ["patient_pk"])],
    )
    create(
        "series",
        _id(),
        _fk("archive_id", "archives.id"),
        _fk("study_pk", "studies.id"),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64)),
        sa.Column("series_date", sa.Date()),
        sa.Column("series_time", sa.String(16)),
        sa.Column("series_description", sa.String(324)),
        sa.Column("manufacturer", sa.String(324)),
        sa.Column("manufacturer_model_name", sa.String(324)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_message", sa.Text()),
        sa.CheckConstraint("status IN ('uploaded', 'processing', 'processed', 'failed')"),
        sa.UniqueConstraint("archive_id", "series_instance_uid"),
        indexes=[("ix_series_study", ["study_pk"])],
    )
    create(
        "instances",
        _id(),
        _fk("archive_id", "archives.id"),
        _fk("series_pk", "series.id"),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64)),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("storage_key", sa.String(255), nullable=False, unique=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.TIMESTAMP(), nullable=False),
        sa.UniqueConstraint("archive_id", "sop_instance_uid"),
        indexes=[("ix_instances_series", ["series_pk"]), ("ix_instances_sop_instance_uid", ["sop_instance_uid"])],
    )
    create(
        "series_results",
        _id(),
        _fk("series_pk", "series.id"),
        sa.Column("result_type", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("algorithm", sa.String(200), nullable=False),
        sa.Column("value_kind", sa.String(8), nullable=False),
        sa.Column("int_value", sa.BigInteger()),
        sa.Column("float_value", sa.DOUBLE_PRECISION()),
        sa.Column("string_value", sa.Text()),
        sa.Column("storage_key", sa.String(255)),
        sa.Column("filename", sa.String(255)),
        sa.Column("size_bytes", sa.BigInteger()),
        sa.Column("created_at", sa.TIMESTAMP(), nullable=False),
        sa.CheckConstraint("result_type IN ('cad4tb', 'retina')"),
        sa.CheckConstraint("value_kind IN ('int', 'float', 'string', 'file')"),
        sa.UniqueConstraint("series_pk", "name"),
        sa.UniqueConstraint("storage_key"),
    )
    create(
        "forms",
        _id(),
        _fk("project_id", "projects.id"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.UniqueConstraint("project_id", "name"),
    )
    create(
        "form_submissions",
        _id(),
        _fk("form_id", "forms.id"),
        _fk("series_pk", "series.id"),
        _fk("user_id", "users.id"),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("created_at", sa.TIMESTAMP(), nullable=False),
        indexes=[("ix_form_submissions_series", ["series_pk"])],
    )
    create(
        "concepts",
        sa.Column("cui", sa.String(16), primary_key=True),
        sa.Column("pref", sa.Text(), nullable=False),
    )
    create(
        "concept_types",
        sa.Column("cui", sa.String(16), sa.ForeignKey("concepts.cui", ondelete="CASCADE"), primary_key=True),
        sa.Column("sty", sa.String(100), primary_key=True),
        sa.Column("tui", sa.String(8)),
        sa.Column("semantic_group", sa.String(8), nullable=False),
    )
    create(
        "concept_relations",
        sa.Column("parent_cui", sa.String(16), primary_key=True),
        sa.Column("child_cui", sa.String(16), primary_key=True),
    )
    create(
        "concept_snomed",
        sa.Column("snomed_id", sa.String(18), primary_key=True),
        sa.Column("cui", sa.String(16), primary_key=True),
    )
    create(
        "mappings",
        _id(),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
    )
    create(
        "mapping_entries",
        sa.Column("mapping_id", sa.BigInteger(), sa.ForeignKey("mappings.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("term", sa.String(200), primary_key=True),
        sa.Column("cui", sa.String(16), primary_key=True),
    )
    documents_created = create(
        "documents",
        _id(),
        sa.Column("sop_instance_uid", sa.String(255), nullable=False, unique=True),
        sa.Column("series_instance_uid", sa.String(255)),
        sa.Column("study_instance_uid", sa.String(255)),
        sa.Column("patient_id", sa.String(255)),
        sa.Column("sop_class_uid", sa.String(255)),
        sa.Column("content_date", sa.Date()),
        sa.Column("modalities_in_study", sa.String(255)),
        sa.Column("report_text", sa.Text()),
        sa.Column("phenotypes", sa.Text()),
        sa.Column("sentences", sa.Text()),
        sa.Column("imported_at", sa.TIMESTAMP(), nullable=False),
        indexes=[
            ("ix_documents_content_date", ["content_date"]),
            ("ix_documents_search", ["id", "sop_instance_uid", "content_date", "modalities_in_study"]),
            ("ix_documents_series", ["series_instance_uid"]),
            ("ix_documents_study", ["study_instance_uid"]),
        ],
    )
    if documents_created and dialect == "sqlite":
        for statement in SQLITE_FTS:
            op.execute(statement)
    elif documents_created:
        op.create_index(
            "ix_documents_fts", "documents", [sa.text("to_tsvector('english', coalesce(report_text, ''))")],
            postgresql_using="gin",
        )
    create(
        "annotations",
        sa.Column("document_id", sa.BigInteger(), sa.ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("cui", sa.String(16), nullable=False),
        sa.Column("pref", sa.Text()),
        sa.Column("str", sa.Text()),
        sa.Column("sty", sa.String(100)),
        sa.Column("start_offset", sa.Integer()),
        sa.Column("end_offset", sa.Integer()),
        sa.Column("negation", sa.String(16)),
        sa.Column("experiencer", sa.String(16)),
        sa.Column("temporality", sa.String(16)),
        sa.Column("ruled_out", sa.Boolean(), nullable=False),
        indexes=[
            ("ix_annotations_concept", ["cui", "ruled_out", "negation", "experiencer", "temporality", "document_id"]),
        ],
    )
    create(
        "annotation_prefs",
        sa.Column("pref_key", sa.Text(), primary_key=True),
        sa.Column("cui", sa.String(16), primary_key=True),
    )
    create(
        "search_transactions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.TIMESTAMP(), nullable=False),
        sa.Column("client_address", sa.String(64)),
        sa.Column("call", sa.String(64), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("num_results", sa.BigInteger()),
        indexes=[("ix_search_transactions_created", ["created_at"])],
    )
    create(
        "auth_failures",
        sa.Column("scope", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_started_at", sa.TIMESTAMP(), nullable=False),
        indexes=[("ix_auth_failures_window", ["window_started_at"])],
    )
