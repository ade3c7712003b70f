"""The PostgreSQL the tests run against: the one named by ``WLB_TEST_PG_URL``, else the server
on 127.0.0.1:5432 (database ``test``, trust auth, as CI provides), else a throwaway cluster
this test run starts itself from the PostgreSQL binaries on the machine (initdb in a
temporary folder, a free port, stopped and removed at exit).

The PostgreSQL half of the suite is never skipped: when no server can be had, the run stops
at once with one message saying what is missing. ``WLB_TEST_PG=throwaway`` asks for a
throwaway cluster even when a server answers on 5432.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_TIMEOUT = 60


class NoPostgres(RuntimeError):
    """No PostgreSQL server can be had for the tests."""


def _usable(url: str) -> bool:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username,
                             password=u.password, dbname=u.database, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _binaries() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name.split(".")[0]))
    if not versions:
        raise NoPostgres(
            "no PostgreSQL for the tests: set WLB_TEST_PG_URL, run a server on "
            "127.0.0.1:5432 with database 'test', or install Debian's postgresql package "
            "(make test does: .ci/install-postgresql) so the tests can start their own")
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root: use the 'postgres' account (Debian's), or nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise NoPostgres("running as root and no 'postgres' or 'nobody' account to run "
                     "PostgreSQL as")


@dataclass
class ThrowawayPostgres:
    folder: Path
    bin: Path
    port: int
    user: str | None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test"

    def _run(self, *command: str) -> None:
        argv = [str(self.bin / command[0]), *command[1:]]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                                check=False)
        if result.returncode != 0:
            raise NoPostgres(f"{command[0]} failed: "
                             f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")

    def start(self) -> None:
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-instructions")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.folder} -c fsync=off "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l",
                  str(self.folder / "server.log"), "-w", "-t", str(_TIMEOUT), "start")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE test")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w",
                      "stop")
        except (NoPostgres, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def start_throwaway() -> ThrowawayPostgres:
    """A new PostgreSQL cluster in a temporary folder on a free port, database ``test``."""
    user = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="wlb-test-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    server = ThrowawayPostgres(folder, _binaries(), _free_port(), user)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


def postgres_for_tests() -> str:
    """The URL of the PostgreSQL database the tests use (see the module's docstring)."""
    url = os.environ.get("WLB_TEST_PG_URL")
    if url:
        return url
    if os.environ.get("WLB_TEST_PG") != "throwaway" and _usable(DEFAULT_URL):
        return DEFAULT_URL
    server = start_throwaway()
    atexit.register(server.stop)
    # Child processes (a broker started by an end-to-end test) see the same server.
    os.environ["WLB_TEST_PG_URL"] = server.url
    return server.url
