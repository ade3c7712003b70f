"""Baseline: the schema as ``create_all`` made it before migrations existed.

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nothing to do: databases from before migrations are stamped here (broker.schema).
    pass


def downgrade() -> None:
    pass
