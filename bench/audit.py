"""What the audit trail costs the hot paths: C-FIND poll latency and MLLP ingest rate.

Two real brokers on one database (SQLite file by default), one with ``audit.enabled`` off,
one with it on, writing the database, a JSON lines file and RFC 5424 datagrams to a UDP
collector on 127.0.0.1, flushing every second (the default is 2 s). They are used in turn,
so the machine's other load is the same for both: the typical poll of bench/worklist.py
(one association per query, ~17 matches), and batches of ORM^O01 orders over one MLLP
connection (ACK after commit). Also the in-process cost of one ``record()`` call (what a
handler pays) and of one flush.

    python bench/audit.py [--items 10000] [--queries 300] [--orders 1000] [--database-url URL]

Not a test. Prints p50/p95 and orders/s per configuration.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from worklist import fill, query, typical_poll  # noqa: E402

from broker.audit import AuditEvent, Kind  # noqa: E402
from broker.audit_trail import AuditTrail  # noqa: E402
from broker.store import Store  # noqa: E402
from hl7_listener.mllp import MllpClient  # noqa: E402
from tests.e2e.broker_process import start_broker  # noqa: E402
from tests.messages import orm  # noqa: E402


def _quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=20, method="inclusive")
    return q[9], q[18]


def _ingest(port: int, count: int) -> float:
    """Orders per second over one connection, each ACKed after its commit."""
    tag = uuid.uuid4().hex[:5].upper()
    messages = [orm(control_id=f"AU{tag}{n}", patient_id=f"P{tag}{n % 500}",
                    accession=f"A{tag}{n}"[-16:], placer=f"PL{tag}{n}",
                    filler=f"FI{tag}{n}").encode() for n in range(count)]
    with MllpClient("127.0.0.1", port) as client:
        started = time.perf_counter()
        for message in messages:
            ack = client.send(message)
            if b"MSA|AA|" not in ack:
                raise SystemExit(f"order refused: {ack!r}")
        return count / (time.perf_counter() - started)


def in_process(url: str, matches: int, calls: int = 20_000) -> tuple[float, float]:
    """Microseconds per record() call, and milliseconds for the flush of all of them."""
    store = Store(url)
    with tempfile.TemporaryDirectory() as tmp:
        trail = AuditTrail(store, file=Path(tmp) / "audit.jsonl", flush_seconds=3600)
        accessions = tuple(f"ACC{n:07d}" for n in range(matches))
        started = time.perf_counter()
        for n in range(calls):
            trail.record(AuditEvent(Kind.CFIND, f"MOD{n % 40}", "success",
                                    address="127.0.0.1:40000", accessions=accessions,
                                    detail={"matches": matches, "sent": matches}))
        per_call = (time.perf_counter() - started) / calls * 1e6
        started = time.perf_counter()
        trail.flush()
        flush_ms = (time.perf_counter() - started) * 1000
    store.dispose()
    return per_call, flush_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--orders", type=int, default=1000, help="per configuration")
    parser.add_argument("--database-url", help="default: a SQLite file in a temp folder")
    args = parser.parse_args()
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'worklist.db'}"
        store = Store(url)
        store.create_schema()
        fill(store, args.items)
        store.dispose()
        off = start_broker(Path(tmp) / "off", database_url=url,
                           sections={"audit": {"enabled": False}})
        on = start_broker(Path(tmp) / "on", database_url=url, sections={"audit": {
            "enabled": True, "file": str(Path(tmp) / "audit.jsonl"), "flush_seconds": 1,
            "syslog_host": "127.0.0.1", "syslog_port": collector.getsockname()[1]}})
        times: dict[str, list[float]] = {"off": [], "on": []}
        rates: dict[str, list[float]] = {"off": [], "on": []}
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
            rounds = 4
            for _ in range(rounds):
                for name, broker in (("off", off), ("on", on)):
                    rates[name].append(_ingest(broker.hl7_port, args.orders // rounds))
        finally:
            off.stop()
            on.stop()
        lines = len((Path(tmp) / "audit.jsonl").read_text().splitlines())
        per_call, flush_ms = in_process(url, matches)
    collector.close()
    off50, off95 = _quantiles(times["off"])
    on50, on95 = _quantiles(times["on"])
    print(f"{args.items} items, {args.queries} typical polls each, {matches} matches per poll, "
          f"{args.orders} orders each ({'SQLite' if url.startswith('sqlite') else 'PostgreSQL'})")
    print(f"{'audit':<6}{'C-FIND p50 ms':>15}{'p95 ms':>8}{'orders/s':>10}")
    for name, p50, p95 in (("off", off50, off95), ("on", on50, on95)):
        print(f"{name:<6}{p50:>15.2f}{p95:>8.2f}{statistics.median(rates[name]):>10.0f}")
    print(f"difference: C-FIND p50 {on50 - off50:+.2f} ms ({(on50 / off50 - 1) * 100:+.1f}%), "
          f"p95 {on95 - off95:+.2f} ms; ingest "
          f"{(statistics.median(rates['on']) / statistics.median(rates['off']) - 1) * 100:+.1f}%")
    print(f"audit lines written by the 'on' broker: {lines}")
    print(f"in process: record() {per_call:.1f} us per C-FIND event with {matches} accessions; "
          f"one flush of 20000 events: {flush_ms:.0f} ms")


if __name__ == "__main__":
    main()
