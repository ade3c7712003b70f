"""bench/generate_items.py writes rows in bulk, bypassing the ORM: they must be exactly the
rows the broker's own import makes of the same worklist files, or the million-item benchmark
measures a database no broker would have."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import text

from bench.generate_items import ITEM_COLUMNS, accession, generate, item_json, rows, station
from broker.dicom.wl_files import import_worklist
from broker.domain import WorklistRow
from broker.matching import WorklistQuery, find_worklist
from broker.store import Store

TODAY = dt.date(2026, 11, 29)
_NOT_COMPARED = {"id", "patient_fk", "created_at", "updated_at"}


def _item(store: Store, acc: str) -> dict[str, Any]:
    with store.reading() as session:
        row = session.execute(text("SELECT * FROM worklist_item WHERE accession_number = :a"),
                              {"a": acc}).mappings().one()
        patient = session.execute(text("SELECT * FROM patient WHERE id = :id"),
                                  {"id": row["patient_fk"]}).mappings().one()
    # Raw values, as stored (on SQLite, the text of dates and times).
    values = {k: _text(v) for k, v in row.items() if k not in _NOT_COMPARED}
    values.update({f"patient.{k}": _text(v) for k, v in patient.items()
                   if k not in _NOT_COMPARED})
    return values


def _text(value: Any) -> Any:
    """A value as SQLite stores it (SQLAlchemy's formats), to compare PostgreSQL's too."""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _imported(tmp_path: Path, data: dict[str, Any]) -> Store:
    """A fresh SQLite store holding what ``import-wl`` makes of the item as a .wl file."""
    ds = Dataset.from_json(json.dumps(data))
    folder = tmp_path / "wl"
    folder.mkdir(parents=True)
    ds.save_as(folder / "item.wl", implicit_vr=False, little_endian=True)
    store = Store(f"sqlite:///{tmp_path / 'imported.db'}", pool_size=2)
    store.create_schema()
    result = import_worklist(store, folder, uid_root="1.2.3", workers=0)
    assert (result.imported, result.refused) == (1, [])
    return store


def test_a_generated_item_is_the_row_import_wl_makes(store, tmp_path):
    generated = generate(store, 1200, sites=2, per_day=100, future_days=2, today=TODAY)
    # Today and the next two days first (3 x 200), then back in time.
    assert (generated.first_day, generated.last_day) == (TODAY - dt.timedelta(days=3),
                                                         TODAY + dt.timedelta(days=2))
    assert generated.scheduled == 600
    patients = max(1200 // 3, 100)
    for day, slot, status in ((TODAY, 2, "SCHEDULED"), (TODAY - dt.timedelta(days=2), 5,
                                                          "COMPLETED")):
        acc = accession(day, 1, slot)
        imported = _imported(tmp_path / acc, item_json(day, 1, slot, patients))
        try:
            expected = _item(imported, acc)
        finally:
            imported.dispose()
        got = _item(store, acc)
        assert got.pop("status") == status
        expected.pop("status")
        assert got == expected


def test_a_stations_poll_finds_the_same_items_at_any_size(store):
    """Today's items come first: a poll for today finds the same items in a small and a
    large database (what the million-item benchmark compares)."""
    generate(store, 450, sites=2, per_day=100, future_days=0, today=TODAY)
    query = WorklistQuery(modality="CT", scheduled_station_ae_title=station(1, "CT"),
                          scheduled_start_date=f"{TODAY:%Y%m%d}")
    with store.reading() as session:
        rows: list[WorklistRow] = find_worklist(session, query)
    assert len(rows) == 30  # CT's 30 % of site 1's 100 orders today

    assert {r.procedure.scheduled_start.date() for r in rows if r.procedure.scheduled_start} \
        == {TODAY}
    with store.reading() as session:
        assert session.execute(text("SELECT count(*) FROM worklist_item")).scalar_one() == 450


def test_the_day_cut_short_is_the_last_one_taken():
    """1,000 items of 400 a day: today and tomorrow whole, half of the day after."""
    starts = [item[ITEM_COLUMNS.index("scheduled_start")].date()
              for item, _ in rows(1000, sites=4, per_day=100, future_days=7, today=TODAY)]
    per_day = {day: starts.count(day) for day in set(starts)}
    assert per_day == {TODAY: 400, TODAY + dt.timedelta(days=1): 400,
                       TODAY + dt.timedelta(days=2): 200}
