"""The Orthanc link: studies the PACS reported stable (matched to an item, or not) and the
position in each PACS's change feed.

Revision ID: 0005_orthanc
Revises: 0004_console
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_orthanc"
down_revision = "0004_console"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Idempotent: broker.schema creates missing tables from the models before upgrading.
    tables = set(sa.inspect(op.get_bind()).get_table_names())
    if "study_arrival" not in tables:
        op.create_table(
            "study_arrival",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("source", sa.String(300), nullable=False),
            sa.Column("source_id", sa.String(64), nullable=False),
            sa.Column("study_instance_uid", sa.String(64), index=True),
            sa.Column("accession_number", sa.String(64), index=True),
            sa.Column("patient_id", sa.String(64)),
            sa.Column("patient_name", sa.String(324)),
            sa.Column("modalities", sa.String(64)),
            sa.Column("number_of_series", sa.Integer),
            sa.Column("number_of_instances", sa.Integer),
            sa.Column("performed_at", sa.DateTime),
            sa.Column("study_description", sa.String(64)),
            sa.Column("item_fk", sa.Integer,
                      sa.ForeignKey("worklist_item.id", ondelete="SET NULL"), index=True),
            sa.Column("matched_by", sa.String(16)),
            sa.Column("action", sa.String(16)),
            sa.Column("received_at", sa.DateTime, nullable=False, index=True),
            sa.Column("updated_at", sa.DateTime, nullable=False),
        )
        op.create_index("ux_study_arrival_source_item", "study_arrival",
                        ["source", "source_id", "item_fk"], unique=True)
    if "feed_cursor" not in tables:
        op.create_table(
            "feed_cursor",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("source", sa.String(300), nullable=False, unique=True),
            sa.Column("position", sa.BigInteger, nullable=False),
            sa.Column("updated_at", sa.DateTime, nullable=False),
        )


def downgrade() -> None:
    op.drop_table("feed_cursor")
    op.drop_table("study_arrival")
