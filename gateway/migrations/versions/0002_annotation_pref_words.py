"""the word index of preferred names

annotation_pref_words, which free text is looked up by, and annotation_prefs' index by CUI; both tables are
then built from the annotations that the store holds, as imports now keep them.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

from gateway.annotations.store import rebuild_pref_words

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "annotation_pref_words",
        sa.Column("stem", sa.Text(), primary_key=True),
        sa.Column("pref_key", sa.Text(), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
    )
    op.create_index("ix_annotation_prefs_cui", "annotation_prefs", ["cui", "pref_key"])
    rebuild_pref_words(op.get_bind())
