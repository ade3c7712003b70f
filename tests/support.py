"""Small helpers shared by the tests: free ports, bounded waits, DCMTK binaries."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PG_URL = os.environ.get("WLB_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
