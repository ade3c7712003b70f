"""Fixtures that build the real thing: a store on a temp SQLite file or on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store import Store
from tests.support import fresh_pg_store

ROOT = Path(__file__).resolve().parent.parent


def _pg_store() -> Iterator[Store]:
    with fresh_pg_store() as store:
        yield store


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
