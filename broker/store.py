"""The database behind the broker: engines, sessions and schema, and nothing else.

Every unit of work opens its own session through :class:`Store` (``with store.writing() as s``)
so that no session is ever shared between pynetdicom's association threads or the scheduler.
"""

from __future__ import annotations

import fcntl
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_WRITE_LOCK_SECONDS = 30.0
# A PostgreSQL advisory lock key for the lock named :name, scoped to database and schema:
# brokers of two sites on one server (or two test schemas) never exclude each other.
SITE_LOCK_KEY = "hashtext(current_database() || '.' || current_schema() || '.' || :name)"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself; pysqlite's implicit transactions
    # start too late (at the first write) for the IMMEDIATE locking below.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets C-FIND readers run while an order commits; synchronous=FULL makes a commit
    # durable before the HL7 ACK goes out; busy_timeout turns writer contention into a wait.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_engine(url: str, begin: str, pool_size: int) -> Engine:
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=30,
        connect_args={"check_same_thread": False, "timeout": 10},
    )
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    return engine


class Store:
    """One database, with a session per unit of work.

    On SQLite, writers start with ``BEGIN IMMEDIATE``: a deferred transaction that reads and
    then writes fails with SQLITE_BUSY (no wait) when another writer committed in between.
    Readers keep plain deferred transactions so C-FIND never queues behind an order.
    """

    def __init__(self, url: str, *, pool_size: int = 20) -> None:
        self.url = url
        parsed = make_url(url)
        self.backend = parsed.get_backend_name()
        if self.backend == "sqlite":
            if parsed.database in (None, "", ":memory:"):
                # Each thread would see its own empty database.
                raise ValueError("an in-memory SQLite database cannot be shared between "
                                 "threads; give a file path")
            self.write_engine = _sqlite_engine(url, "BEGIN IMMEDIATE", pool_size)
            self.read_engine = _sqlite_engine(url, "BEGIN", pool_size)
        else:
            self.write_engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                                              pool_pre_ping=True)
            self.read_engine = self.write_engine
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        # SQLite has one writer at a time. Queueing writers of this process on a lock keeps
        # them off SQLite's busy handler, which sleeps in growing steps (measured: p99 248 ms
        # with 4 HL7 connections, against a few ms queued here). busy_timeout still covers
        # writers in other processes (the purge command, a second broker).
        self._write_lock = threading.Lock() if self.backend == "sqlite" else None
        self._read = sessionmaker(self.read_engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create or upgrade the schema to this version's (``broker.schema``)."""
        from broker.schema import migrate

        migrate(self.write_engine)

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A transaction that commits when the block ends and rolls back if it raises."""
        if self._write_lock is None:
            with self._write.begin() as session:
                yield session
            return
        if not self._write_lock.acquire(timeout=_WRITE_LOCK_SECONDS):
            raise sqlalchemy.exc.TimeoutError(
                f"no database write slot within {_WRITE_LOCK_SECONDS:.0f} s")
        try:
            with self._write.begin() as session:
                yield session
        finally:
            self._write_lock.release()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only unit of work; whatever it changes is rolled back."""
        session = self._read()
        try:
            yield session
        finally:
            session.close()

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Yield whether this process holds the site-wide lock ``name`` for the block.

        Several brokers may share one database (PostgreSQL, or processes on one SQLite
        file); jobs that must not run twice at once (the outbound delivery, whose per-order
        ordering would break, and the purge) run only where this yields True. The lock is
        never waited for: whoever has it is doing the work. On PostgreSQL it is an advisory
        lock on a connection held for the block (released if that connection dies); on
        SQLite an flock on a file beside the database (released if the process dies).
        """
        if self.backend == "postgresql":
            with self.write_engine.connect() as conn:
                got = bool(conn.execute(text(f"SELECT pg_try_advisory_lock({SITE_LOCK_KEY})"),
                                        {"name": name}).scalar())
                conn.commit()
                try:
                    yield got
                finally:
                    if got:
                        conn.execute(text(f"SELECT pg_advisory_unlock({SITE_LOCK_KEY})"),
                                     {"name": name})
                        conn.commit()
            return
        database = make_url(self.url).database
        if self.backend != "sqlite" or not database:
            yield True
            return
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        with open(f"{database}.{safe_name}.lock", "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


def open_store(url: str, *, pool_size: int) -> Store:
    """The database at ``url``, its schema created or brought up to date (and a SQLite
    file's folder made) on first use: what ``serve`` and every administrator command open."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    store = Store(url, pool_size=pool_size)
    store.create_schema()
    return store
