"""Purge benchmark: delete 100,000 expired worklist items while modalities query and the RIS
sends orders, and report how long the purge took and what it cost the others.

    python bench/purge.py [--items 100000] [--backends sqlite,postgresql]

Not a test. Prints one table: purge time and, during the purge, the latency of worklist
queries (find_worklist, what every C-FIND runs) and of order writes (apply_order).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, insert, text  # noqa: E402

from broker.domain import Order, OrderControl, PatientData, ProcedureData  # noqa: E402
from broker.matching import WorklistQuery, find_worklist  # noqa: E402
from broker.models import Patient, WorklistItem  # noqa: E402
from broker.orders import apply_order  # noqa: E402
from broker.purge import Retention, purge  # noqa: E402
from broker.store import Store  # noqa: E402
from tests.support import PG_URL  # noqa: E402

NOW = dt.datetime(2026, 11, 29, 12, 0)


def _fill(store: Store, expired: int) -> None:
    with store.writing() as s:
        s.execute(insert(Patient), [{"patient_id": f"P{n}", "patient_name": f"DOE^{n}"}
                                    for n in range(1000)])
        ids = dict(s.execute(text("select patient_id, id from patient")).all())
    rows = []
    for n in range(expired + 1000):
        old = n < expired
        rows.append({
            "patient_fk": ids[f"P{n % 1000}"], "accession_number": f"A{n}",
            "study_instance_uid": f"1.2.3.{n}", "modality": ("CT", "MR", "US", "CR")[n % 4],
            "scheduled_start": NOW - dt.timedelta(days=400 - n * 365 // expired if old else 0,
                                                  minutes=n % 600),
            "status": "COMPLETED" if old else "SCHEDULED",
        })
    for start in range(0, len(rows), 10_000):
        with store.writing() as s:
            s.execute(insert(WorklistItem), rows[start:start + 10_000])


def _load(store: Store, stop: threading.Event, queries: list[float], writes: list[float]) -> None:
    query = WorklistQuery(modality="CT", scheduled_start_date=NOW.strftime("%Y%m%d"))
    n = 0
    while not stop.is_set() and n < 1_000_000:
        started = time.perf_counter()
        with store.reading() as s:
            find_worklist(s, query)
        queries.append(time.perf_counter() - started)
        if n % 5 == 0:
            started = time.perf_counter()
            with store.writing() as s:
                apply_order(s, Order(OrderControl.NEW, PatientData(f"N{n}"), ProcedureData(
                    f"N{n}-{uuid.uuid4().hex[:6]}", modality="CT", scheduled_start=NOW)),
                    uid_root="1.2.3")
            writes.append(time.perf_counter() - started)
        n += 1


def _ms(values: list[float], q: float) -> float:
    if len(values) < 2:
        return float("nan")
    if q >= 100:
        return max(values) * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            schema = None
            if backend == "sqlite":
                url = f"sqlite:///{tmp}/bench.db"
            else:
                schema = f"bench_{uuid.uuid4().hex[:8]}"
                with create_engine(PG_URL).begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA "{schema}"'))
                url = f"{PG_URL}?options=-csearch_path%3D{schema}"
            store = Store(url)
            store.create_schema()
            try:
                _fill(store, args.items)
                baseline_q: list[float] = []
                baseline_w: list[float] = []
                stop = threading.Event()
                worker = threading.Thread(target=_load, args=(store, stop, baseline_q,
                                                               baseline_w))
                worker.start()
                time.sleep(3)  # a fixed window of load without purge, for comparison
                stop.set()
                worker.join()
                queries: list[float] = []
                writes: list[float] = []
                stop = threading.Event()
                worker = threading.Thread(target=_load, args=(store, stop, queries, writes))
                worker.start()
                started = time.perf_counter()
                result = purge(store, retention=Retention(30, 30, 30, 30, 30, 30), now=NOW)
                took = time.perf_counter() - started
                stop.set()
                worker.join()
                rows.append((backend, result.worklist_items, took,
                             _ms(baseline_q, 50), _ms(queries, 50), _ms(queries, 99),
                             _ms(queries, 100), _ms(baseline_w, 50), _ms(writes, 99),
                             _ms(writes, 100)))
            finally:
                store.dispose()
                if schema:
                    with create_engine(PG_URL).begin() as conn:
                        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    print(f"{'backend':<11}{'purged':>8}{'purge s':>9}{'query p50 before':>18}"
          f"{'query p50':>11}{'p99':>8}{'max':>8}{'write p50 before':>18}{'write p99':>11}"
          f"{'max':>8}   (ms)")
    for r in rows:
        print(f"{r[0]:<11}{r[1]:>8}{r[2]:>9.1f}{r[3]:>18.2f}{r[4]:>11.2f}{r[5]:>8.2f}"
              f"{r[6]:>8.1f}{r[7]:>18.2f}{r[8]:>11.2f}{r[9]:>8.1f}")


if __name__ == "__main__":
    main()
