"""Lossless worklist items: every attribute an item was given is kept (``item_dataset``, DICOM
JSON), and Scheduled Station AE Title keeps all its values (the column is widened).

Revision ID: 0006_item_dataset
Revises: 0005_orthanc
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_item_dataset"
down_revision = "0005_orthanc"
branch_labels = None
depends_on = None

_STATIONS_LENGTH = 64 * 17  # broker.models.STATIONS_LENGTH when this revision was written


def upgrade() -> None:
    bind = op.get_bind()
    columns = {column["name"]: column
               for column in sa.inspect(bind).get_columns("worklist_item")}
    if "item_dataset" not in columns:
        with op.batch_alter_table("worklist_item") as batch:
            batch.add_column(sa.Column("item_dataset", sa.Text(), nullable=True))
    # SQLite never enforces a VARCHAR length; PostgreSQL does, so only there is the column
    # widened (in place: the index on it stays).
    station = columns["scheduled_station_ae_title"]["type"]
    if bind.dialect.name != "sqlite" and (getattr(station, "length", None) or 0) < \
            _STATIONS_LENGTH:
        op.alter_column("worklist_item", "scheduled_station_ae_title",
                        type_=sa.String(_STATIONS_LENGTH), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("worklist_item") as batch:
        batch.drop_column("item_dataset")
