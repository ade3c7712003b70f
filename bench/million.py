"""A million items: does the broker stay as fast with years of history as with a day's?

Two brokers run side by side, one on 1,000 items and one on 1,000,000 (bench/generate_items.py:
4 sites, 100 orders a day each, back ~7 years), and the same C-FIND queries go to both,
interleaved, one association per query, pynetdicom as the modality:

- selective: one accession of today;
- typical poll: one CT room's station AE and modality, today, ~25 return keys (30 matches).

Ingest (ORM^O01 orders over MLLP, ACK after commit, bench/ingest.py's approach) on both.
Then, against the million-item broker only, 40 modalities polling their own station at once
(refused associations, failure statuses). The purge of a year under load is
bench/purge_load.py.

    python bench/million.py [--backends sqlite,postgresql] [--big 1000000] [--queries 30]

Not a test. Prints one table per backend; the targets are issue 12's part 4.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from bench import ingest  # noqa: E402
from bench.generate_items import MODALITY_MIX, accession, generate, station  # noqa: E402
from bench.worklist import cpu_seconds, query, typical_poll  # noqa: E402
from broker.store import Store  # noqa: E402
from tests.e2e.broker_process import BrokerProcess, start_broker  # noqa: E402
from tests.support import PG_URL  # noqa: E402

TODAY = dt.date.today()
SITES, PER_DAY, FUTURE_DAYS = 4, 100, 7


def station_poll(ae_title: str, modality: str) -> Dataset:
    """What a modality sends: its own station AE and modality, today, ~25 return keys."""
    ds = typical_poll()
    step = ds.ScheduledProcedureStepSequence[0]
    step.ScheduledStationAETitle = ae_title
    step.Modality = modality
    step.ScheduledProcedureStepStartDate = f"{TODAY:%Y%m%d}"
    return ds


def selective() -> Dataset:
    ds = Dataset()
    ds.AccessionNumber = accession(TODAY, 1, 50)
    ds.PatientName = ""
    ds.PatientID = ""
    ds.ScheduledProcedureStepSequence = [Dataset()]
    return ds


KINDS: dict[str, Callable[[], Dataset]] = {
    "selective": selective,
    "typical poll": lambda: station_poll(station(1, "CT"), "CT"),
}


def _ms(values: list[float], q: int) -> float:
    if len(values) < 2:
        return float("nan")
    if q >= 100:
        return max(values)
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _one(port: int, identifier: Dataset) -> tuple[float, int]:
    seconds, matches, failure = query(port, identifier)
    if failure is not None:
        raise SystemExit(f"query failed with {failure:#x} on port {port}")
    return seconds * 1000, matches


@contextmanager
def database(backend: str, tmp: Path, name: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp / name}.db"
        return
    schema = f"bench_{name}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def load(url: str, size: int) -> str:
    store = Store(url)
    store.create_schema()
    try:
        result = generate(store, size, sites=SITES, per_day=PER_DAY, future_days=FUTURE_DAYS,
                          today=TODAY)
    finally:
        store.dispose()
    line = (f"{result.items} items ({result.patients} patients, {result.scheduled} SCHEDULED, "
            f"{result.first_day} to {result.last_day}) loaded in {result.seconds:.0f} s")
    print("  " + line, flush=True)
    return line


def compare(small: BrokerProcess, big: BrokerProcess, count: int
            ) -> list[tuple[str, int, int, float, float, float, float, float, float]]:
    """Each kind of query to both brokers in turn, ``count`` times: the machine's load
    (shared) weighs on both alike. Also each broker's CPU per query, which that load does
    not inflate."""
    rows = []
    for name, make in KINDS.items():
        _one(small.dicom_port, make())  # warm-up: imports, pools, caches
        _one(big.dicom_port, make())
        times: dict[int, list[float]] = {small.dicom_port: [], big.dicom_port: []}
        matches = {small.dicom_port: 0, big.dicom_port: 0}
        cpu = {b.dicom_port: -cpu_seconds(b.process.pid) for b in (small, big)}
        for n in range(count):
            # Alternating who goes first: a broker's work after its answer (the query
            # recorder's write) must not always land on the other's query.
            order = (small.dicom_port, big.dicom_port)
            for port in order if n % 2 == 0 else order[::-1]:
                ms, matches[port] = _one(port, make())
                times[port].append(ms)
        for b in (small, big):
            cpu[b.dicom_port] = (cpu[b.dicom_port] + cpu_seconds(b.process.pid)) * 1000 / count
        s, b_ = small.dicom_port, big.dicom_port
        rows.append((name, matches[s], matches[b_], _ms(times[s], 50), _ms(times[s], 95),
                     _ms(times[b_], 50), _ms(times[b_], 95), cpu[s], cpu[b_]))
        print(f"  {name}: p50 {rows[-1][3]:.1f} ms at small, {rows[-1][5]:.1f} ms at big",
              flush=True)
    return rows


def _stations() -> list[tuple[str, str]]:
    """Every room of every site: 40 modalities cycle through them."""
    rooms = [(station(site, modality), modality) for site in range(1, SITES + 1)
             for modality, _ in MODALITY_MIX]
    rooms += [(f"S{site}CT2", "CT") for site in range(1, SITES + 1)]
    return rooms


def burst(port: int, seconds: float, modalities: int = 40
          ) -> tuple[int, int, int, float, float, float]:
    stop = time.monotonic() + seconds
    counts = {"ok": 0, "refused": 0, "failed": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    rooms = _stations()

    def modality(n: int) -> None:
        ae_title, kind = rooms[n % len(rooms)]
        for _ in range(100_000):
            if time.monotonic() > stop:
                return
            took, _, failure = query(port, station_poll(ae_title, kind))
            with lock:
                key = "ok" if failure is None else ("refused" if failure == -1 else "failed")
                counts[key] += 1
                latencies.append(took * 1000)

    threads = [threading.Thread(target=modality, args=(n,)) for n in range(modalities)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return (counts["ok"], counts["refused"], counts["failed"], counts["ok"] / elapsed,
            _ms(latencies, 50), _ms(latencies, 95))


def run_backend(backend: str, small_size: int, big_size: int, args: argparse.Namespace
                ) -> list[str]:
    out = [f"## {backend}: {small_size} vs {big_size} items"]
    jobs = {"jobs": {"outbound_interval_seconds": 0.2, "mapping_check_seconds": 0.5}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with database(backend, tmp, "small") as small_url, \
                database(backend, tmp, "big") as big_url:
            out.append(load(small_url, small_size))
            out.append(load(big_url, big_size))
            small = start_broker(tmp / "small", database_url=small_url, sections=jobs)
            big = start_broker(tmp / "big", database_url=big_url, sections=jobs)
            try:
                out.append(f"load before the queries: {_uptime()}")
                rows = compare(small, big, args.queries)
                out.append(f"{'query':<14}{'matches':>9}{'p50 small':>11}{'p95':>8}"
                           f"{'p50 big':>10}{'p95':>8}{'big/small':>11}{'CPU small':>11}"
                           f"{'CPU big':>9}   (ms; CPU: the broker's per query)")
                for name, m_small, m_big, s50, s95, b50, b95, c_small, c_big in rows:
                    out.append(f"{name:<14}{f'{m_small}/{m_big}':>9}{s50:>11.1f}{s95:>8.1f}"
                               f"{b50:>10.1f}{b95:>8.1f}{b50 / s50:>10.2f}x{c_small:>11.1f}"
                               f"{c_big:>9.1f}"
                               f"{'' if b50 / s50 <= 1.5 else '  MISSED (target 1.5x)'}")
                if not args.skip_ingest:
                    out.append(f"load before ingest: {_uptime()}")
                    out += ingest_rows(small, small_size, args.orders)
                    out += ingest_rows(big, big_size, args.orders)
                small.stop()
                out.append(f"load before the burst: {_uptime()}")
                ok, refused, failed, rate, p50, p95 = burst(big.dicom_port, args.burst_seconds)
                out.append(f"40 modalities polling for {args.burst_seconds:.0f} s at {big_size}: "
                           f"{ok} answered, {refused} refused, {failed} failure statuses, "
                           f"{rate:.0f} queries/s, p50 {p50:.0f} ms, p95 {p95:.0f} ms")
            finally:
                small.stop()
                big.stop()
    for line in out:
        print(line, flush=True)
    return out


def ingest_rows(broker: BrokerProcess, size: int, orders: int) -> list[str]:
    ingest._run(broker.hl7_port, 1, 200)  # warm-up
    out = []
    for connections in (1, 4):
        rate, p50, p99 = ingest._run(broker.hl7_port, connections, orders)
        out.append(f"ingest at {size} items, {connections} connection(s), {orders} orders: "
                   f"{rate:.0f} orders/s, ACK p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--burst-seconds", type=float, default=20)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    report = []
    for backend in args.backends.split(","):
        report += run_backend(backend, args.small, args.big, args)
    print("\n" + "\n".join(report))


if __name__ == "__main__":
    main()
