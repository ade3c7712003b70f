"""Console benchmark: does the web console slow the DICOM and HL7 paths, and is the
worklist page fast on a big database?

1. C-FIND p50 (one modality's poll for today, ~83 matches, one association per query,
   pynetdicom as the modality; quiet before and after, averaged) and ingest orders/s (one
   MLLP connection), without and with five browsers' worth of console polling: each
   "browser" loads the worklist page and /metrics every 2 s.
2. The worklist page (HTML) and its JSON twin for a day of 500 items with --size items in
   the database (default 100,000): p50 / p95 over --page-loads loads.

    python bench/console.py [--size 100000] [--queries 40] [--orders 1000]

Not a test; prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import ingest as ingest_bench  # noqa: E402
import worklist as worklist_bench  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

from broker.models import Patient, WorklistItem  # noqa: E402
from broker.store import Store  # noqa: E402
from tests.e2e.broker_process import start_broker  # noqa: E402

TODAY = dt.date.today()
PER_DAY = 500
MODALITIES = ("CT", "MR", "US", "CR", "DX", "MG")


def fill(store: Store, size: int) -> None:
    """``size`` items, 500 a day, ending today: today's worklist is 500 items."""
    with store.writing() as s:
        s.execute(insert(Patient), [{"patient_id": f"P{n}", "patient_name": f"NAME{n:05d}^A",
                                     "sex": "MF"[n % 2]} for n in range(5000)])
        ids = dict(s.execute(text("select patient_id, id from patient")).all())
    days = max(size // PER_DAY, 1)
    batch = []
    for n in range(size):
        day = TODAY - dt.timedelta(days=days - 1 - n // PER_DAY)
        minute = (n % PER_DAY) * 600 // PER_DAY
        batch.append({
            "patient_fk": ids[f"P{n % 5000}"], "accession_number": f"ACC{n:07d}",
            "study_instance_uid": f"1.2.826.0.1.3680043.10.1491.9.{n}",
            "modality": MODALITIES[n % len(MODALITIES)],
            "scheduled_station_ae_title": f"{MODALITIES[n % len(MODALITIES)]}_ROOM1",
            "scheduled_start": dt.datetime.combine(day, dt.time(7 + minute // 60, minute % 60)),
            "requested_procedure_id": f"RP{n}", "requested_procedure_description": "EXAM",
            "sps_id": f"SPS{n}", "sps_description": "EXAM", "status": "SCHEDULED",
            "referring_physician_name": "HOUSE^GREGORY"})
        if len(batch) == 20_000:
            with store.writing() as s:
                s.execute(insert(WorklistItem), batch)
            batch = []
    if batch:
        with store.writing() as s:
            s.execute(insert(WorklistItem), batch)


class Browsers:
    """``count`` pollers loading the worklist page and /metrics every ``every`` seconds."""

    def __init__(self, url: str, count: int = 5, every: float = 2.0,
                 paths: tuple[str, ...] = ("/worklist", "/metrics")) -> None:
        self.url, self.count, self.every, self.paths = url, count, every, paths
        self.stop = threading.Event()
        self.loads = 0
        self.errors = 0
        self.threads = [threading.Thread(target=self._poll, args=(i,), daemon=True)
                        for i in range(count)]

    def _poll(self, index: int) -> None:
        # Staggered, as five people do not press F5 together.
        if self.stop.wait(self.every * index / self.count):
            return
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                for path in self.paths:
                    response = http.get(path)
                    self.loads += 1
                    self.errors += response.status_code != 200
                self.stop.wait(self.every)

    def __enter__(self) -> Browsers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def cfind_p50(port: int, queries: int) -> float:
    p50, _, _, _ = worklist_bench.measure(port, worklist_bench.typical_poll, queries)
    return p50


def page_times(url: str, path: str, loads: int) -> tuple[float, float, int]:
    times = []
    with httpx.Client(base_url=url, timeout=30) as http:
        http.get(path)
        for _ in range(loads):
            started = time.perf_counter()
            response = http.get(path)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text[:200]
    q = statistics.quantiles(times, n=20, method="inclusive")
    return q[9], q[18], len(response.content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--page-loads", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating quiet / polled rounds (medians reported)")
    parser.add_argument("--paths", default="/worklist,/metrics",
                        help="what each browser loads every 2 s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/worklist.db"
        store = Store(url)
        store.create_schema()
        started = time.perf_counter()
        fill(store, args.size)
        store.dispose()
        print(f"filled {args.size} items ({PER_DAY} today) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        broker = start_broker(Path(tmp) / "b", database_url=url,
                              web={"refresh_seconds": 0})
        try:
            # Pages and C-FIND first: the ingest adds CT orders for today (tests.messages),
            # which would grow both today's worklist and the poll's answer.
            today = TODAY.isoformat()
            pages = [(f"/worklist?date={today}", "worklist page, 100 of 500 shown"),
                     (f"/worklist?date={today}&page_size=500", "worklist page, all 500"),
                     (f"/api/worklist?date={today}&page_size=500", "JSON twin, all 500"),
                     ("/metrics", "/metrics")]
            timings = [(label, *page_times(broker.url, path, args.page_loads))
                       for path, label in pages]
            # Alternating rounds, medians: other load on the machine drifts over minutes.
            paths = tuple(args.paths.split(","))
            quiet_c, busy_c, quiet_i, busy_i, loads = [], [], [], [], 0
            for _ in range(args.rounds):
                quiet_c.append(cfind_p50(broker.dicom_port, args.queries))
                with Browsers(broker.url, paths=paths) as browsers:
                    busy_c.append(cfind_p50(broker.dicom_port, args.queries))
                loads += browsers.loads
            print(f"C-FIND p50 quiet {quiet_c}, polled {busy_c}", flush=True)
            ingest_bench._run(broker.hl7_port, 1, 100)  # warm-up
            for _ in range(args.rounds):
                quiet_i.append(ingest_bench._run(broker.hl7_port, 1, args.orders)[0])
                with Browsers(broker.url, paths=paths) as browsers:
                    busy_i.append(ingest_bench._run(broker.hl7_port, 1, args.orders)[0])
                loads += browsers.loads
            print(f"ingest/s quiet {quiet_i}, polled {busy_i} ({loads} console loads)",
                  flush=True)
            rows = [("C-FIND p50 (ms)", statistics.median(quiet_c), statistics.median(busy_c)),
                    ("ingest (orders/s)", statistics.median(quiet_i),
                     statistics.median(busy_i))]
        finally:
            broker.stop()
    print()
    print(f"{'measure':<22} {'quiet':>9} {'polled':>9} {'change':>8}")
    for name, quiet, busy in rows:
        print(f"{name:<22} {quiet:>9.1f} {busy:>9.1f} {100 * (busy - quiet) / quiet:>+7.1f}%")
    print()
    print(f"{'page (' + str(args.size) + ' items in the DB)':<36} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'bytes':>8}")
    for label, p50, p95, size in timings:
        print(f"{label:<36} {p50:>8.1f} {p95:>8.1f} {size:>8}")


if __name__ == "__main__":
    main()
