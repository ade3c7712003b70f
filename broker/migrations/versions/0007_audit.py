"""The audit trail: one row per audited event (association, C-FIND, MPPS, HL7 message,
console login) and one per accession number it concerns (broker.audit).

Idempotent like 0004: ``broker.schema`` runs ``create_all`` before the revisions, so the
tables may be there already; only what is missing is created.

Revision ID: 0007_audit
Revises: 0006_item_dataset
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_audit"
down_revision = "0006_item_dataset"
branch_labels = None
depends_on = None


def _tables() -> dict[str, tuple[list[sa.Column[object]], list[tuple[str, list[str], bool]]]]:
    # Spelled out rather than taken from broker.models: a revision is the shape at its time.
    return {
        "audit_event": (
            [sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("at", sa.DateTime, nullable=False),
             sa.Column("kind", sa.String(32), nullable=False),
             sa.Column("actor", sa.String(200), nullable=False),
             sa.Column("address", sa.String(100), nullable=True),
             sa.Column("tls_subject", sa.String(400), nullable=True),
             sa.Column("outcome", sa.String(32), nullable=False),
             sa.Column("accession_numbers", sa.Text, nullable=True),
             sa.Column("detail", sa.Text, nullable=True)],
            [("ix_audit_event_at", ["at"], False),
             ("ix_audit_event_actor_at", ["actor", "at"], False)],
        ),
        "audit_accession": (
            [sa.Column("event_fk", sa.Integer,
                       sa.ForeignKey("audit_event.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("accession_number", sa.String(16), primary_key=True)],
            [("ix_audit_accession_accession_number", ["accession_number"], False)],
        ),
    }


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    present = set(inspector.get_table_names())
    for name, (columns, indexes) in _tables().items():
        if name not in present:
            op.create_table(name, *columns)
            existing: set[str | None] = set()
        else:
            existing = {index["name"] for index in inspector.get_indexes(name)}
        for index_name, index_columns, unique in indexes:
            if index_name not in existing:
                op.create_index(index_name, name, index_columns, unique=unique)


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
