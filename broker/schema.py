"""Bring a database's schema to what this version of the broker needs (Alembic).

- An empty database gets every table at once and is stamped with the latest revision.
- A database made before migrations existed (tables, no ``alembic_version``) is stamped as
  the baseline, then upgraded.
- Otherwise the pending revisions run. Tables added to the models since are created first
  (``create_all`` only ever adds missing tables); column changes are revisions.

Runs at every start (``serve``, and every command that opens the database): a no-op when
the schema is current.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Alembic narrates at INFO (its plugins on import, the dialect, each stamp); every command
# opens the database, and administrators read that output. Upgrades are logged here instead.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Engine, inspect, text  # noqa: E402

from broker.models import Base  # noqa: E402
from broker.store import SITE_LOCK_KEY  # noqa: E402

log = logging.getLogger(__name__)

BASELINE = "0001_baseline"
_SCRIPTS = Path(__file__).resolve().parent / "migrations"


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    return config


def head() -> str:
    head_revision = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head_revision is not None
    return head_revision


def migrate(engine: Engine) -> None:
    config = _alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Brokers starting together on one database take turns (released at commit);
            # SQLite's BEGIN IMMEDIATE already makes them queue.
            connection.execute(text(f"SELECT pg_advisory_xact_lock({SITE_LOCK_KEY})"),
                               {"name": "schema"})
        tables = set(inspect(connection).get_table_names())
        current = MigrationContext.configure(connection).get_current_revision()
        Base.metadata.create_all(connection)
        config.attributes["connection"] = connection
        if "worklist_item" not in tables:
            command.stamp(config, "head")
            return
        if current is None:
            command.stamp(config, BASELINE)
            current = BASELINE
        latest = head()
        if current != latest:
            log.info("upgrading the database schema from %s to %s", current, latest)
            command.upgrade(config, "head")
