"""What recording C-FIND exposure and identifiers costs a modality's poll.

Two real brokers on one database (SQLite file by default), one with ``dicom.record_cfind``
off, one with it on and flushing every second (five times more often than the default, the
worst case), are polled in turn with the typical poll of bench/worklist.py (one modality,
today, ~25 return keys, ~17 matches), one association per query. Taking turns keeps the
machine's other load the same for both. Also the in-process cost of one ``record()`` call
(what the C-FIND handler pays) and of one flush.

    python bench/cfind_record.py [--items 10000] [--queries 300] [--database-url URL]

Not a test. Prints p50/p95 per configuration and the difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sqlalchemy import func, select  # noqa: E402
from worklist import fill, query, typical_poll  # noqa: E402

from broker.dicom.query_recorder import QueryRecorder  # noqa: E402
from broker.models import CFindExposure  # noqa: E402
from broker.store import Store  # noqa: E402
from tests.e2e.broker_process import start_broker  # noqa: E402


def _quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=20, method="inclusive")
    return q[9], q[18]


def in_process(url: str, matches: int, calls: int = 20_000) -> tuple[float, float]:
    """Microseconds per record() call, and milliseconds per flush of one second's worth."""
    store = Store(url)
    recorder = QueryRecorder(store, flush_seconds=3600)
    identifier = typical_poll()
    accessions = [f"ACC{n:07d}" for n in range(matches)]
    started = time.perf_counter()
    for n in range(calls):
        recorder.record(f"MOD{n % 40}", identifier, accessions)
    per_call = (time.perf_counter() - started) / calls * 1e6
    started = time.perf_counter()
    recorder.flush()
    flush_ms = (time.perf_counter() - started) * 1000
    store.dispose()
    return per_call, flush_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--database-url", help="default: a SQLite file in a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'worklist.db'}"
        store = Store(url)
        store.create_schema()
        fill(store, args.items)
        store.dispose()
        off = start_broker(Path(tmp) / "off", database_url=url,
                           dicom={"record_cfind": False})
        on = start_broker(Path(tmp) / "on", database_url=url,
                          dicom={"record_cfind": True, "record_flush_seconds": 1})
        times: dict[str, list[float]] = {"off": [], "on": []}
        matches = 0
        try:
            for broker in (off, on):
                query(broker.dicom_port, typical_poll())  # warm-up
            for _ in range(args.queries):
                for name, broker in (("off", off), ("on", on)):
                    seconds, matches, failure = query(broker.dicom_port, typical_poll())
                    if failure is not None:
                        raise SystemExit(f"query failed with {failure:#x}")
                    times[name].append(seconds * 1000)
        finally:
            off.stop()
            on.stop()
        store = Store(url)
        with store.reading() as session:
            recorded = session.scalar(select(func.sum(CFindExposure.count))) or 0
        store.dispose()
        per_call, flush_ms = in_process(url, matches)
    off50, off95 = _quantiles(times["off"])
    on50, on95 = _quantiles(times["on"])
    print(f"{args.items} items, {args.queries} typical polls each, {matches} matches per poll "
          f"({'SQLite' if url.startswith('sqlite') else url.split(':')[0]})")
    print(f"{'record_cfind':<14}{'p50 ms':>8}{'p95 ms':>8}")
    print(f"{'off':<14}{off50:>8.2f}{off95:>8.2f}")
    print(f"{'on (1 s flush)':<14}{on50:>8.2f}{on95:>8.2f}")
    print(f"difference: p50 {on50 - off50:+.2f} ms ({(on50 / off50 - 1) * 100:+.1f}%), "
          f"p95 {on95 - off95:+.2f} ms")
    print(f"exposures recorded by the 'on' broker: {recorded} (expected "
          f"{(args.queries + 1) * matches})")
    print(f"in process: record() {per_call:.1f} us per C-FIND with {matches} matches; one "
          f"flush of 20000 queries from 40 AEs: {flush_ms:.1f} ms")


if __name__ == "__main__":
    main()
