"""Alembic's entry point: migrate on the connection ``broker.schema`` hands over."""

from __future__ import annotations

from alembic import context

from broker.models import Base

connection = context.config.attributes["connection"]
# Batch mode lets later revisions alter SQLite tables (copy-and-move) as they would on
# PostgreSQL.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
