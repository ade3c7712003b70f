"""The purge of a year of history at 1,000,000 items, under a site's load.

Issue 12 part 4: "the purge of one year of history runs under load without a C-FIND above
100 ms". The load is a site's, made heavier than a real one:

- ``--modalities`` (40) modalities, each polling its own station for today every
  ``--poll-seconds`` (10 s; real modalities poll every one to fifteen minutes), one
  association per query, ~25 return keys, from ``--client-processes`` (10) processes: a
  modality is its own machine, and modalities sharing one Python process would wait for each
  other's interpreter lock, not for the broker;
- a RIS sending ``--orders-per-second`` (5) new orders over one MLLP connection, ACK after
  commit (a large hospital sends a few a minute).

The purge deletes the oldest year (146,400 items at 1,000,000) and runs two ways, each on a
fresh copy of the same database:

- "purge command": ``worklist-broker purge`` in its own process, as cron or an administrator
  runs it;
- "purge job": the broker's own scheduled purge (``jobs.purge_cron``), inside the broker
  process, as a default installation runs it every night.

For each: the load alone (its first poll round left out: the broker's answer cache is cold
then, as on the first poll of a day), then the purge, then 5 s more; every C-FIND's and every
order's latency is kept with its start time and reported per window.

    python bench/purge_load.py [--backends sqlite,postgresql] [--items 1000000]

Not a test. Needs about 2 GB of disk for SQLite; PostgreSQL uses databases next to
tests.support's (created from a template, dropped at the end).
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bench.generate_items import days_for  # noqa: E402
from bench.million import (  # noqa: E402
    FUTURE_DAYS,
    PER_DAY,
    SITES,
    TODAY,
    _stations,
    load,
    station_poll,
)
from bench.worklist import query  # noqa: E402
from hl7_listener.mllp import MllpClient  # noqa: E402
from tests.e2e.broker_process import BrokerProcess, start_broker  # noqa: E402
from tests.messages import orm  # noqa: E402
from tests.support import PG_URL, wait_for  # noqa: E402

# (wall-clock start, milliseconds, failure or None); wall clock: the broker's log says when
# its purge job ran in the same clock.
Sample = tuple[float, float, str | None]
_JOB_LINE = re.compile(r"purge done items=(\d+) .* seconds=([\d.]+)")


# --- the load ------------------------------------------------------------------------------

def _modality_process(port: int, rooms: list[tuple[str, str]], poll_seconds: float,
                      stop: multiprocessing.synchronize.Event,
                      results: multiprocessing.Queue[list[Sample]]) -> None:
    samples: list[Sample] = []
    lock = threading.Lock()

    def modality(ae_title: str, kind: str) -> None:
        due = time.monotonic() + random.uniform(0, poll_seconds)
        for _ in range(100_000):
            if stop.wait(max(due - time.monotonic(), 0)):
                return
            at = time.time()
            seconds, _, failure = query(port, station_poll(ae_title, kind))
            with lock:
                samples.append((at, seconds * 1000,
                                None if failure is None else f"status {failure:#x}"))
            due += poll_seconds

    threads = [threading.Thread(target=modality, args=room) for room in rooms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(samples)


def _ris(port: int, per_second: float, stop: threading.Event, samples: list[Sample]) -> None:
    """New orders for next month (they must not change what today's polls answer)."""
    tag = uuid.uuid4().hex[:5].upper()
    start = (TODAY + dt.timedelta(days=30)).strftime("%Y%m%d") + "093000"
    with MllpClient("127.0.0.1", port) as client:
        due = time.monotonic()
        for n in range(10_000_000):
            if stop.wait(max(due - time.monotonic(), 0)):
                return
            message = orm(control_id=f"L{tag}{n}", patient_id=f"LP{n % 500}",
                          accession=f"L{tag}{n}"[-16:], placer=f"LPL{tag}{n}",
                          filler=f"LFI{tag}{n}", start=start).encode()
            at = time.time()
            began = time.perf_counter()
            ack = client.send(message)
            samples.append((at, (time.perf_counter() - began) * 1000,
                            None if b"MSA|AA|" in ack else "not accepted"))
            due += 1 / per_second


@dataclass
class Load:
    stop_processes: multiprocessing.synchronize.Event
    stop_ris: threading.Event
    processes: list[multiprocessing.process.BaseProcess]
    results: multiprocessing.Queue[list[Sample]]
    ris: threading.Thread
    orders: list[Sample]

    def finish(self) -> list[Sample]:
        self.stop_processes.set()
        self.stop_ris.set()
        finds: list[Sample] = []
        for _ in self.processes:
            finds += self.results.get(timeout=120)
        for process in self.processes:
            process.join(timeout=30)
        self.ris.join(timeout=30)
        return finds


def start_load(broker: BrokerProcess, args: argparse.Namespace) -> Load:
    context = multiprocessing.get_context("fork")
    rooms = _stations()
    modalities = [rooms[n % len(rooms)] for n in range(args.modalities)]
    stop = context.Event()
    results: multiprocessing.Queue[list[Sample]] = context.Queue()
    processes = [context.Process(target=_modality_process,
                                 args=(broker.dicom_port, modalities[n::args.client_processes],
                                       args.poll_seconds, stop, results))
                 for n in range(args.client_processes)]
    for process in processes:
        process.start()
    orders: list[Sample] = []
    stop_ris = threading.Event()
    ris = threading.Thread(target=_ris, args=(broker.hl7_port, args.orders_per_second, stop_ris,
                                              orders))
    ris.start()
    return Load(stop, stop_ris, processes, results, ris, orders)


# --- the databases -------------------------------------------------------------------------

@contextmanager
def databases(backend: str, tmp: Path, items: int) -> Iterator[Iterator[str]]:
    """One database of ``items`` items, generated once; yields fresh copies of it."""
    if backend == "sqlite":
        base = tmp / "base.db"
        load(f"sqlite:///{base}", items)

        def sqlite_copies() -> Iterator[str]:
            for n in range(100):
                copy = tmp / f"copy{n}.db"
                shutil.copyfile(base, copy)
                yield f"sqlite:///{copy}"
        yield sqlite_copies()
        return
    server = make_url(PG_URL)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    prefix = f"wlb_purge_{uuid.uuid4().hex[:6]}"
    made: list[str] = [f"{prefix}_base"]
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{prefix}_base"'))
        base_url = server.set(database=f"{prefix}_base")
        load(base_url.render_as_string(hide_password=False), items)
        # What a database years old has: statistics and a visibility map.
        base = create_engine(base_url, isolation_level="AUTOCOMMIT")
        with base.connect() as conn:
            conn.execute(text("VACUUM ANALYZE"))
        base.dispose()  # a template must have no session

        def pg_copies() -> Iterator[str]:
            for n in range(100):
                name = f"{prefix}_{n}"
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{prefix}_base"'))
                made.append(name)
                yield server.set(database=name).render_as_string(hide_password=False)
        yield pg_copies()
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- one run -------------------------------------------------------------------------------

def _ms(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if q >= 100 or len(values) < 2:
        return max(values)
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _window(name: str, samples: list[Sample], start: float, end: float) -> str:
    inside = [s for s in samples if start <= s[0] < end]
    values = [ms for _, ms, _ in inside]
    failures = sum(1 for _, _, failure in inside if failure)
    over = sum(1 for ms in values if ms > 100)
    return (f"{name:<22}{len(values):>8}{_ms(values, 50):>8.0f}{_ms(values, 99):>8.0f}"
            f"{_ms(values, 100):>8.0f}{over:>12}{failures:>10}")


def _next_minute(after_seconds: float) -> dt.datetime:
    at = dt.datetime.now() + dt.timedelta(seconds=after_seconds)
    return (at + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)


def run(kind: str, url: str, tmp: Path, retention: int, args: argparse.Namespace) -> list[str]:
    jobs: dict[str, object] = {"retention_days": retention, "outbound_interval_seconds": 1}
    fire = _next_minute(args.baseline + 20)
    if kind == "job":
        jobs["purge_cron"] = f"{fire.minute} {fire.hour} * * *"
    broker = start_broker(tmp / f"broker-{kind}", database_url=url, sections={"jobs": jobs})
    try:
        for _ in range(3):  # warm-up: the first association of each kind pays for imports
            query(broker.dicom_port, station_poll(*_stations()[0]))
        load = start_load(broker, args)
        loaded = time.time()
        if kind == "command":
            # The load alone for the baseline, then the purge command.
            load.stop_ris.wait(args.baseline)
            started = time.time()
            done = subprocess.run([sys.executable, "-m", "broker.cli", "purge", "--config",
                                   str(broker.config_path)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=3600)
            ended = time.time()
            outcome = (done.stdout.strip() or done.stderr.strip()).splitlines()[-1]
        else:
            found: list[re.Match[str]] = []

            def purged() -> bool:
                found[:] = [m for m in [_JOB_LINE.search(broker.log())] if m]
                return bool(found)

            wait_for(purged, timeout=(fire - dt.datetime.now()).total_seconds() + 3600,
                     interval=0.2, what="the purge job's log line")
            ended = time.time()
            started = ended - float(found[0].group(2))
            outcome = f"deleted {found[0].group(1)} worklist items (broker log)"
        load.stop_ris.wait(5)
        finds = load.finish()
        orders = load.orders
        after = time.time()
    finally:
        broker.stop()
    header = (f"{'window':<22}{'count':>8}{'p50':>8}{'p99':>8}{'max':>8}{'above 100':>12}"
              f"{'failures':>10}   (ms)")
    return [f"### purge {kind}: {ended - started:.1f} s, {outcome}",
            "C-FIND", header,
            _window("load alone", finds, loaded + args.poll_seconds, started),
            _window("during the purge", finds, started, ended),
            _window("5 s after", finds, ended, after),
            "orders (ACK after commit)", header,
            _window("load alone", orders, loaded + args.poll_seconds, started),
            _window("during the purge", orders, started, ended),
            _window("5 s after", orders, ended, after)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--modalities", type=int, default=40)
    parser.add_argument("--poll-seconds", type=float, default=10)
    parser.add_argument("--client-processes", type=int, default=10)
    parser.add_argument("--orders-per-second", type=float, default=5)
    parser.add_argument("--baseline", type=float, default=30)
    parser.add_argument("--kinds", default="command,job")
    args = parser.parse_args()
    oldest = days_for(args.items, SITES * PER_DAY, TODAY, FUTURE_DAYS)[0][0]
    retention = max((TODAY - oldest).days - 365, 8)
    report = [f"{args.modalities} modalities polling every {args.poll_seconds:.0f} s from "
              f"{args.client_processes} processes, {args.orders_per_second:.0f} orders/s; "
              f"retention {retention} days (the oldest year goes)"]
    for backend in args.backends.split(","):
        report.append(f"## {backend}, {args.items} items")
        with tempfile.TemporaryDirectory() as tmp_name, \
                databases(backend, Path(tmp_name), args.items) as copies:
            for kind in args.kinds.split(","):
                lines = run(kind, next(copies), Path(tmp_name), retention, args)
                print("\n".join(lines), flush=True)
                report += lines
    print("\n" + "\n".join(report))


if __name__ == "__main__":
    main()
