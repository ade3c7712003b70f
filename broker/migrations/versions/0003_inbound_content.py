"""A message is a resend only when its content is the same: the inbound log keeps a digest of
each message, and the uniqueness of accepted messages covers it. Accepted messages may carry
warnings (shown in the message list).

Rows kept before this revision have no digest; the listener digests their raw message when a
message arrives under their MSH-10, so their resends are still recognised.

Revision ID: 0003_inbound_content
Revises: 0002_step_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_inbound_content"
down_revision = "0002_step_keys"
branch_labels = None
depends_on = None

_TABLE = "inbound_message"
_OLD_INDEX = "ux_inbound_accepted"
_NEW_INDEX = "ux_inbound_accepted_content"
_LOOKUP_INDEX = "ix_inbound_sender_control"


def upgrade() -> None:
    bind = op.get_bind()
    indexes = {index["name"] for index in sa.inspect(bind).get_indexes(_TABLE)}
    if _OLD_INDEX in indexes:
        op.drop_index(_OLD_INDEX, table_name=_TABLE)
    present = {column["name"] for column in sa.inspect(bind).get_columns(_TABLE)}
    with op.batch_alter_table(_TABLE) as batch:
        if "content_digest" not in present:
            batch.add_column(sa.Column("content_digest", sa.String(64), nullable=True))
        if "warnings" not in present:
            batch.add_column(sa.Column("warnings", sa.Text, nullable=True))
    if _NEW_INDEX not in indexes:
        op.create_index(_NEW_INDEX, _TABLE, ["sender", "control_id", "content_digest"],
                        unique=True, sqlite_where=sa.text("outcome = 'accepted'"),
                        postgresql_where=sa.text("outcome = 'accepted'"))
    if _LOOKUP_INDEX not in indexes:
        op.create_index(_LOOKUP_INDEX, _TABLE, ["sender", "control_id"])


def downgrade() -> None:
    op.drop_index(_LOOKUP_INDEX, table_name=_TABLE)
    op.drop_index(_NEW_INDEX, table_name=_TABLE)
    with op.batch_alter_table(_TABLE) as batch:
        batch.drop_column("warnings")
        batch.drop_column("content_digest")
