"""Ingest benchmark: ORM^O01 orders over MLLP into a real broker process, ACK after commit.

Prints ACKed orders per second and ACK latency p50/p99 on one connection and on four at
once, against SQLite (WAL, synchronous=FULL) and PostgreSQL. Not a test: run it by hand,

    python bench/ingest.py [--orders 2000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from hl7_listener.mllp import MllpClient  # noqa: E402
from tests.e2e.broker_process import start_broker  # noqa: E402
from tests.messages import orm  # noqa: E402
from tests.support import PG_URL  # noqa: E402


def _message(prefix: str, n: int) -> bytes:
    return orm(control_id=f"{prefix}{n}", patient_id=f"P{n % 5000}", accession=f"{prefix}{n}"[-16:],
               placer=f"PL{prefix}{n}", filler=f"FI{prefix}{n}").encode()


errors: list[str] = []


def _send_all(port: int, messages: list[bytes], latencies: list[float],
              start: threading.Barrier) -> None:
    with MllpClient("127.0.0.1", port) as client:
        start.wait(timeout=60)
        for message in messages:
            started = time.perf_counter()
            ack = client.send(message)
            latencies.append(time.perf_counter() - started)
            if b"MSA|AA|" not in ack:
                errors.append(ack.decode(errors="replace"))
                return


def _run(port: int, connections: int, orders: int) -> tuple[float, float, float]:
    latencies: list[float] = []
    per = orders // connections
    tag = uuid.uuid4().hex[:4].upper()
    # Built before the clock starts: a RIS has its messages ready; this measures the broker.
    batches = [[_message(f"B{tag}{c}-", n) for n in range(per)] for c in range(connections)]
    start = threading.Barrier(connections + 1)
    threads = [threading.Thread(target=_send_all, args=(port, batch, latencies, start))
               for batch in batches]
    for t in threads:
        t.start()
    start.wait(timeout=60)
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"not accepted: {errors[0]!r}")
    q = statistics.quantiles(latencies, n=100)
    return per * connections / elapsed, q[49] * 1000, q[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url = None
            schema = None
            if backend == "postgresql":
                schema = f"bench_{uuid.uuid4().hex[:8]}"
                with create_engine(PG_URL).begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA "{schema}"'))
                url = f"{PG_URL}?options=-csearch_path%3D{schema}"
            broker = start_broker(Path(tmp), database_url=url)
            try:
                _run(broker.hl7_port, 1, 200)  # warm-up: imports, pools, schema caches
                for connections in (1, 4):
                    rate, p50, p99 = _run(broker.hl7_port, connections, args.orders)
                    rows.append((backend, connections, args.orders, rate, p50, p99))
            finally:
                broker.stop()
                if schema:
                    with create_engine(PG_URL).begin() as conn:
                        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    print(f"{'backend':<11} {'conns':>5} {'orders':>7} {'orders/s':>9} {'p50 ms':>7} "
          f"{'p99 ms':>7}")
    for backend, connections, orders, rate, p50, p99 in rows:
        print(f"{backend:<11} {connections:>5} {orders:>7} {rate:>9.0f} {p50:>7.2f} {p99:>7.2f}")


if __name__ == "__main__":
    main()
