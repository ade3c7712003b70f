"""Worklist keys the first schema did not keep: Scheduled Performing Physician's Name (a
required matching key of PS3.4 table K.6-1), Scheduled Station Name, Requested Procedure
Priority.

Revision ID: 0002_step_keys
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_step_keys"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("scheduled_performing_physician_name", 324),
    ("scheduled_station_name", 16),
    ("requested_procedure_priority", 16),
)


def upgrade() -> None:
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("worklist_item")}
    with op.batch_alter_table("worklist_item") as batch:
        for name, length in _COLUMNS:
            if name not in present:
                batch.add_column(sa.Column(name, sa.String(length), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worklist_item") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
