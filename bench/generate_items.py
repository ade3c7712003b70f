"""Load a site's worth of history-shaped worklist items into a store, quickly.

A site's database grows by history: about ``per_day`` orders a day per site, for years,
almost all COMPLETED by now, a few CANCELLED or DISCONTINUED, and the next week's items
SCHEDULED. Each item is what ``import-wl`` makes of a worklist file (DICOM JSON in
``item_dataset``, the columns as :func:`broker.item_dataset.order_from_json` reads them,
the patient as ``apply_order`` upserts it): the rows are built with the broker's own
conversion, only written in bulk (executemany on SQLite, COPY on PostgreSQL) instead of one
ORM object at a time. tests/test_bench_generator.py checks one generated row against the
row ``import-wl`` makes of the same dataset.

Today's items come first whatever the size, so the same queries (one station's poll for
today, one accession of today) find the same items at 1,000 and at 1,000,000 items.

    python bench/generate_items.py --url sqlite:///big.db --items 1000000

Used by bench/million.py; reusable by the other benches (:func:`generate`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from broker.domain import ItemStatus, ProcedureData  # noqa: E402
from broker.item_dataset import order_from_json  # noqa: E402
from broker.store import Store  # noqa: E402

# Share of a site's daily orders by modality, in percent, as a general hospital's
# radiology department: radiography first, then CT, ultrasound, MR, mammography.
MODALITY_MIX = (("CR", 20), ("DX", 15), ("CT", 30), ("MR", 15), ("US", 15), ("MG", 5))
PROCEDURES = {
    "CR": ("RPID21", "XR CHEST 2 VIEWS"), "DX": ("RPID22", "XR KNEE"),
    "CT": ("RPID31", "CT ABDOMEN WITH CONTRAST"), "MR": ("RPID41", "MR BRAIN"),
    "US": ("RPID51", "US ABDOMEN"), "MG": ("RPID61", "MAMMOGRAPHY SCREENING"),
}
ALLERGIES = ("TANTAL", "BARIUMSULFAT", "IODINE CONTRAST", "LATEX", "PENICILLIN")
ALERTS = ("METASTASIS", "ABZESS", "PACEMAKER", "CLAUSTROPHOBIA")
UID_ROOT = "1.2.826.0.1.3680043.10.1491.8"
_SLOT_MODALITIES = [m for m, share in MODALITY_MIX for _ in range(share)]


def station(site: int, modality: str) -> str:
    """The AE title of a site's room for a modality (CT has a second room, S<n>CT2)."""
    return f"S{site}{modality}1"


def slot_modality(slot: int) -> str:
    # Interleaved, not in blocks: each modality's items spread over the day.
    return _SLOT_MODALITIES[(slot * 37) % len(_SLOT_MODALITIES)]


def accession(day: dt.date, site: int, slot: int) -> str:
    return f"{day:%Y%m%d}{site:02d}{slot:04d}"  # 14 characters, SH holds 16


def _pn(name: str) -> dict[str, Any]:
    return {"vr": "PN", "Value": [{"Alphabetic": name}]}


def _v(vr: str, *values: str) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def item_json(day: dt.date, site: int, slot: int, patients: int) -> dict[str, Any]:
    """One item's dataset as DICOM JSON, keys in tag order, as ``dataset_dict`` reads a
    worklist file (DS as strings, no Specific Character Set)."""
    key = (day.toordinal() * 64 + site) * 1000 + slot
    patient = (key * 2654435761) % patients
    modality = slot_modality(slot)
    rp_code, description = PROCEDURES[modality]
    acc = accession(day, site, slot)
    minutes = 7 * 60 + slot * 7
    female = patient % 2 == 0 or modality == "MG"
    data: dict[str, Any] = {
        "00080050": _v("SH", acc),
        "00080090": _pn(f"REFERRER{key % 40}^A"),
        "00100010": _pn(f"PATIENT{patient}^GIVEN{patient % 97}"),
        "00100020": _v("LO", f"PID{patient:08d}"),
        "00100021": _v("LO", "HOSP"),
        "00100030": _v("DA", f"{1930 + patient % 85}{1 + patient % 12:02d}"
                             f"{1 + patient % 28:02d}"),
        "00100040": _v("CS", "F" if female else "M"),
    }
    if key % 5 < 3:
        data["00101030"] = _v("DS", f"{50 + patient % 50}.{patient % 10}")
    if key % 31 == 0:
        data["00102000"] = _v("LO", ALERTS[key % len(ALERTS)])
    if key % 17 == 0:
        data["00102110"] = _v("LO", *ALLERGIES[key % 3:key % 3 + 1 + key % 2])
    if female and modality in ("CT", "CR", "DX"):
        data["001021C0"] = {"vr": "US", "Value": [4]}  # pregnancy status unknown
    data["0020000D"] = _v("UI", f"{UID_ROOT}.{acc}")
    data["00321032"] = _pn(f"REQUESTER{key % 25}^B")
    data["00321060"] = _v("LO", description)
    data["00321064"] = {"vr": "SQ", "Value": [{
        "00080100": _v("SH", rp_code), "00080102": _v("SH", "99HOSP"),
        "00080104": _v("LO", description)}]}
    step: dict[str, Any] = {"00080060": _v("CS", modality)}
    if modality in ("CT", "MR") and key % 5 < 2:
        step["00321070"] = _v("LO", "IOPROMID" if modality == "CT" else "GADOBUTROL")
    stations = [station(site, modality)]
    if modality == "CT" and key % 10 == 0:
        stations.append(f"S{site}CT2")  # either CT room may take it
    step.update({
        "00400001": _v("AE", *stations),
        "00400002": _v("DA", f"{day:%Y%m%d}"),
        "00400003": _v("TM", f"{minutes // 60:02d}{minutes % 60:02d}00"),
        "00400006": _pn(f"TECH{key % 12}^C"),
        "00400007": _v("LO", description),
        "00400009": _v("SH", f"S{acc}"),
        "00400010": _v("SH", f"S{site}{modality}ROOM"),
        "00400011": _v("SH", f"SITE{site} RADIOLOGY"),
    })
    data["00400100"] = {"vr": "SQ", "Value": [step]}
    data["00401001"] = _v("SH", f"RP{acc}")
    data["00401003"] = _v("CS", ("ROUTINE", "ROUTINE", "ROUTINE", "HIGH", "STAT")[key % 5])
    data["00402016"] = _v("LO", f"PL{acc}")
    data["00402017"] = _v("LO", f"FI{acc}")
    return data


def status_for(day: dt.date, today: dt.date, key: int) -> ItemStatus:
    if day >= today:
        return ItemStatus.SCHEDULED
    # The past: performed, a few cancelled or stopped half-way.
    if key % 50 == 0:
        return ItemStatus.CANCELLED
    if key % 97 == 0:
        return ItemStatus.DISCONTINUED
    return ItemStatus.COMPLETED


def days_for(size: int, daily: int, today: dt.date, future_days: int
             ) -> tuple[list[dt.date], dt.date]:
    """The days holding ``size`` items, oldest first so ids grow with time as in a real
    database, and the one cut short: today, the next ``future_days``, then back in time,
    until ``size`` is reached (the last day taken is the partial one)."""
    order = [today + dt.timedelta(days=d) for d in range(future_days + 1)]
    needed = max(-(-size // daily), 1)
    back = 1
    while len(order) < needed:
        order.append(today - dt.timedelta(days=back))
        back += 1
    return sorted(order[:needed]), order[needed - 1]


_ITEM_FIELDS = tuple(n for n in ProcedureData.__slots__ if n != "item_dataset")
ITEM_COLUMNS = ("id", "patient_fk", *_ITEM_FIELDS, "status", "item_dataset",
                "last_message_control_id", "created_at", "updated_at")
PATIENT_COLUMNS = ("id", "patient_id", "issuer_of_patient_id", "patient_name", "birth_date",
                   "sex", "updated_at")


@dataclass
class Generated:
    items: int
    patients: int
    scheduled: int
    first_day: dt.date
    last_day: dt.date
    seconds: float


def rows(size: int, *, sites: int = 4, per_day: int = 100, future_days: int = 7,
         today: dt.date | None = None) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...] | None]]:
    """(item row, patient row or None if the patient was seen before), in ITEM_COLUMNS and
    PATIENT_COLUMNS order, oldest first."""
    today = today or dt.date.today()
    patients = max(size // 3, 100)  # a patient comes back about three times
    seen: dict[str, int] = {}
    item_id = 0
    days, partial = days_for(size, sites * per_day, today, future_days)
    skip = len(days) * sites * per_day - size  # the last sites of the partial day
    for day in days:
        for site in range(1, sites + 1):
            for slot in range(per_day):
                if day == partial and (site - 1) * per_day + slot >= sites * per_day - skip:
                    continue
                item_id += 1
                data = item_json(day, site, slot, patients)
                order = order_from_json(data)
                procedure, person = order.procedure, order.patient
                key = (day.toordinal() * 64 + site) * 1000 + slot
                # When the RIS sent the order: a few days ahead; kept as the broker keeps
                # times (naive UTC).
                created = dt.datetime.combine(day, dt.time(7)) - dt.timedelta(days=1 + key % 5)
                patient_row = None
                patient_fk = seen.get(person.patient_id)
                if patient_fk is None:
                    patient_fk = seen[person.patient_id] = len(seen) + 1
                    patient_row = (patient_fk, person.patient_id, person.issuer_of_patient_id,
                                   person.patient_name, person.birth_date, person.sex, created)
                status = status_for(day, today, key)
                item = (item_id, patient_fk,
                        *(getattr(procedure, name) for name in _ITEM_FIELDS),
                        str(status),
                        json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                        order.message_control_id, created,
                        created if status is ItemStatus.SCHEDULED else
                        (procedure.scheduled_start or created) + dt.timedelta(minutes=20))
                yield item, patient_row


def _chunks(size: int, chunk: int, **kwargs: Any
            ) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    items: list[tuple[Any, ...]] = []
    patients: list[tuple[Any, ...]] = []
    for item, patient in rows(size, **kwargs):
        items.append(item)
        if patient is not None:
            patients.append(patient)
        if len(items) >= chunk:
            yield items, patients
            items, patients = [], []
    if items:
        yield items, patients


def _insert_sqlite(store: Store, size: int, **kwargs: Any) -> None:
    import sqlite3

    path = make_url(store.url).database
    assert path is not None
    # The load is a fresh database's own: nothing else reads it yet, so no fsync per batch.
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous=OFF")
    item_sql = (f"INSERT INTO worklist_item ({', '.join(ITEM_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(ITEM_COLUMNS))})")
    patient_sql = (f"INSERT INTO patient ({', '.join(PATIENT_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(PATIENT_COLUMNS))})")

    def sqlite_value(value: Any) -> Any:
        # As SQLAlchemy's SQLite dialect stores dates and datetimes: ISO text.
        if isinstance(value, dt.datetime):
            return value.strftime("%Y-%m-%d %H:%M:%S.%f")
        if isinstance(value, dt.date):
            return value.isoformat()
        return value

    try:
        for items, patients in _chunks(size, 20_000, **kwargs):
            connection.execute("BEGIN")
            connection.executemany(patient_sql, ([sqlite_value(v) for v in row]
                                                 for row in patients))
            connection.executemany(item_sql, ([sqlite_value(v) for v in row]
                                              for row in items))
            connection.execute("COMMIT")
    finally:
        connection.close()


def _copy_text(rows_: list[tuple[Any, ...]]) -> bytes:
    """PostgreSQL COPY text format: tab-separated, \\N for NULL, backslash escapes."""
    out = io.StringIO()
    for row in rows_:
        fields = []
        for value in row:
            if value is None:
                fields.append("\\N")
            else:
                fields.append(str(value).replace("\\", "\\\\").replace("\t", "\\t")
                              .replace("\n", "\\n").replace("\r", "\\r"))
        out.write("\t".join(fields))
        out.write("\n")
    return out.getvalue().encode()


def _insert_postgresql(store: Store, size: int, **kwargs: Any) -> None:
    raw = store.write_engine.raw_connection()
    try:
        cursor = raw.cursor()
        for items, patients in _chunks(size, 50_000, **kwargs):
            with cursor.copy(f"COPY patient ({', '.join(PATIENT_COLUMNS)}) FROM STDIN") as copy:
                copy.write(_copy_text(patients))
            with cursor.copy(f"COPY worklist_item ({', '.join(ITEM_COLUMNS)}) "
                             "FROM STDIN") as copy:
                copy.write(_copy_text(items))
            raw.commit()
        for table in ("patient", "worklist_item"):
            cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                           f"(SELECT max(id) FROM {table}))")
        raw.commit()
        # What autovacuum does to a table that grew this much before anyone queries it.
        raw.autocommit = True  # type: ignore[attr-defined]
        cursor.execute("ANALYZE patient")
        cursor.execute("ANALYZE worklist_item")
    finally:
        raw.close()


def generate(store: Store, size: int, *, sites: int = 4, per_day: int = 100,
             future_days: int = 7, today: dt.date | None = None) -> Generated:
    """Fill an empty store (schema created) with ``size`` items; see the module's doc."""
    started = time.perf_counter()
    today = today or dt.date.today()
    kwargs = {"sites": sites, "per_day": per_day, "future_days": future_days, "today": today}
    if store.backend == "sqlite":
        store.dispose()  # the load writes through its own connection
        _insert_sqlite(store, size, **kwargs)
    else:
        _insert_postgresql(store, size, **kwargs)
    with store.reading() as session:
        patients = session.execute(text("SELECT count(*) FROM patient")).scalar_one()
        scheduled = session.execute(text(
            "SELECT count(*) FROM worklist_item WHERE status = 'SCHEDULED'")).scalar_one()
    days, _ = days_for(size, sites * per_day, today, future_days)
    return Generated(size, patients, scheduled, days[0], days[-1],
                     time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="an empty database (schema created)")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--per-day", type=int, default=100)
    args = parser.parse_args()
    store = Store(args.url)
    store.create_schema()
    try:
        result = generate(store, args.items, sites=args.sites, per_day=args.per_day)
    finally:
        store.dispose()
    print(f"{result.items} items, {result.patients} patients, {result.scheduled} SCHEDULED, "
          f"{result.first_day} to {result.last_day}, loaded in {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
