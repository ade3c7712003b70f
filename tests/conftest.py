"""Fixtures that build the real thing: a store on a temp SQLite file or on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from broker.store import Store
from tests.support import PG_URL

ROOT = Path(__file__).resolve().parent.parent


def _pg_store() -> Iterator[Store]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    store = Store(f"{PG_URL}{sep}options=-csearch_path%3D{schema}", pool_size=5)
    try:
        store.create_schema()
        yield store
    finally:
        store.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'worklist.db'}", pool_size=5)
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def pg_store() -> Iterator[Store]:
    yield from _pg_store()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same test against both backends the broker supports."""
    if request.param == "sqlite":
        store = Store(f"sqlite:///{tmp_path / 'worklist.db'}", pool_size=5)
        store.create_schema()
        yield store
        store.dispose()
    else:
        yield from _pg_store()
