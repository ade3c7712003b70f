"""Operator console read models: C-FIND exposure (which calling AE was given which item), the
last C-FIND identifiers of each calling AE, and the operator actions.

Idempotent like 0002: ``broker.schema`` runs ``create_all`` before the revisions, so on a
broker start the tables are usually there already; only what is missing is created.

Revision ID: 0004_console
Revises: 0002_step_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_console"
down_revision = "0002_step_keys"
branch_labels = None
depends_on = None


def _tables() -> dict[str, tuple[list[sa.Column[object]], list[tuple[str, list[str], bool]]]]:
    # Spelled out here rather than taken from broker.models: a revision is the shape at its
    # time, whatever the models become later.
    return {
        "cfind_exposure": (
            [sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("calling_ae", sa.String(16), nullable=False),
             sa.Column("accession_number", sa.String(16), nullable=False),
             sa.Column("first_at", sa.DateTime, nullable=False),
             sa.Column("last_at", sa.DateTime, nullable=False),
             sa.Column("count", sa.Integer, nullable=False)],
            [("ux_cfind_exposure_ae_accession", ["calling_ae", "accession_number"], True),
             ("ix_cfind_exposure_accession_number", ["accession_number"], False)],
        ),
        "cfind_query": (
            [sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("calling_ae", sa.String(16), nullable=False),
             sa.Column("digest", sa.String(64), nullable=False),
             sa.Column("identifier_json", sa.Text, nullable=False),
             sa.Column("first_at", sa.DateTime, nullable=False),
             sa.Column("last_at", sa.DateTime, nullable=False),
             sa.Column("count", sa.Integer, nullable=False),
             sa.Column("matches", sa.Integer, nullable=False)],
            [("ux_cfind_query_ae_digest", ["calling_ae", "digest"], True),
             ("ix_cfind_query_ae_last", ["calling_ae", "last_at"], False)],
        ),
        "operator_action": (
            [sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("at", sa.DateTime, nullable=False),
             sa.Column("user", sa.String(100), nullable=False),
             sa.Column("action", sa.String(32), nullable=False),
             sa.Column("accession_number", sa.String(16), nullable=True),
             sa.Column("target", sa.String(200), nullable=False),
             sa.Column("detail", sa.Text, nullable=False)],
            [("ix_operator_action_accession_id", ["accession_number", "id"], False),
             ("ix_operator_action_at", ["at"], False)],
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
