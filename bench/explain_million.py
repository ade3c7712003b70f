"""The query plans of the million-item benchmark's queries, as find_worklist builds them.

    python bench/explain_million.py --url sqlite:///big.db

Not a test: prints EXPLAIN (SQLite: QUERY PLAN; PostgreSQL: ANALYZE, BUFFERS) and the time of
each query run in-process, for the queries bench/million.py sends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from bench.generate_items import accession, station  # noqa: E402
from broker.matching import _COLUMNS, WorklistQuery, _ordered, conditions  # noqa: E402
from broker.store import Store  # noqa: E402

TODAY = dt.date.today()
QUERIES = {
    "selective": WorklistQuery(accession_number=accession(TODAY, 1, 50)),
    "typical poll": WorklistQuery(modality="CT", scheduled_station_ae_title=station(1, "CT"),
                                  scheduled_start_date=f"{TODAY:%Y%m%d}"),
    "modality today": WorklistQuery(modality="CT", scheduled_start_date=f"{TODAY:%Y%m%d}"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    store = Store(args.url)
    try:
        for name, query in QUERIES.items():
            with store.reading() as session:
                dialect = session.get_bind().dialect
                statement = _ordered(select(*_COLUMNS), conditions(query, dialect.name)).limit(
                    query.limit + 1)
                compiled = statement.compile(dialect=dialect,
                                             compile_kwargs={"render_postcompile": True})
                sql = str(compiled)
                prefix = ("EXPLAIN QUERY PLAN " if dialect.name == "sqlite"
                          else "EXPLAIN (ANALYZE, BUFFERS) ")
                conn = session.connection()
                params: object = compiled.params
                if dialect.name == "sqlite":  # positional; the plan does not need the values
                    params = tuple(str(compiled.params[key]) for key in compiled.positiontup or ())
                plan = conn.exec_driver_sql(prefix + sql, params).all()  # type: ignore[arg-type]
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    rows = session.execute(statement).all()
                    times.append((time.perf_counter() - started) * 1000)
            print(f"## {name}: {len(rows)} rows, best of 5 {min(times):.2f} ms")
            for line in plan:
                print("   ", " ".join(str(v) for v in line))
    finally:
        store.dispose()


if __name__ == "__main__":
    main()
