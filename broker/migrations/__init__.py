"""Alembic migrations of the broker's schema (run by ``broker.schema``, not by hand)."""
