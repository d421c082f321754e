"""the report annotator: its queue, the documents it made, and concept synonyms

report_jobs (the archive's SR instances awaiting the annotator), report_documents (the document read from
each), and concept_synonyms (names the annotator matches besides the preferred one; a UMLS load fills it).

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "report_jobs",
        sa.Column("instance_id", sa.BigInteger(), sa.ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("enqueued_at", sa.TIMESTAMP(), nullable=False),
        sa.Column("claimed_until", sa.TIMESTAMP()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.Text()),
    )
    op.create_index("ix_report_jobs_queue", "report_jobs", ["failed", "enqueued_at"])
    op.create_table(
        "concept_synonyms",
        sa.Column("cui", sa.String(16), sa.ForeignKey("concepts.cui", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
    )
    op.create_table(
        "report_documents",
        sa.Column("instance_id", sa.BigInteger(), sa.ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("document_id", sa.BigInteger(), sa.ForeignKey("documents.id", ondelete="CASCADE"), nullable=False,
                  unique=True),
    )
