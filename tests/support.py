"""Small helpers shared by the tests: free ports, bounded waits, DCMTK binaries."""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, text

from broker.store import Store
from tests.pg_server import postgres_for_tests

T = TypeVar("T")

# WLB_TEST_PG_URL, CI's server on 5432, or a throwaway cluster started for this run.
PG_URL = postgres_for_tests()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def fresh_pg_store() -> Iterator[Store]:
    """A store on the PostgreSQL test database, in a schema of its own dropped afterwards."""
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


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dcmtk(tool: str) -> str:
    """Path of a DCMTK command-line tool.

    pynetdicom installs console scripts of its own called findscu/echoscu that shadow DCMTK's
    on PATH in a virtualenv or pyenv; the tests must talk to DCMTK's real binaries.
    """
    for candidate in (Path("/usr/bin") / tool, Path("/usr/local/bin") / tool):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(tool)
    raise AssertionError(f"DCMTK's {tool} is not installed (found {found!r} on PATH); "
                         "run: apt-get install -y dcmtk")
