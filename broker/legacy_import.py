"""import-db: bring over the database of the small pynetdicom worklist server that ran beside
Orthanc (SQLite; tables ``patients``, ``worklist_items``, ``mpps_tracking``).

Every row goes through the core's own operations (``apply_order`` for items and their
status, ``record_mpps_create`` / ``record_mpps_set`` for MPPS) with a reporting policy that
writes nothing to the outbox: imported history is not news for the RIS. All of it is one
transaction, each row in a savepoint: a bad row is skipped with its reason, the rest is kept;
``dry_run`` rolls the whole transaction back after counting.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.domain import (
    ItemStatus,
    MppsCreate,
    MppsSet,
    MppsStatus,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
    StatusReporting,
)
from broker.errors import BrokerError
from broker.models import MPPSTracking, Patient, WorklistItem
from broker.mpps import record_mpps_create, record_mpps_set
from broker.orders import apply_order
from broker.store import Store
from broker.uids import MAX_UID_LENGTH

log = logging.getLogger(__name__)

# The old server's schema, as its users describe it; other columns are ignored.
TABLES: dict[str, tuple[str, ...]] = {
    "patients": ("id", "patient_id", "patient_name", "birth_date", "sex"),
    "worklist_items": ("id", "patient_id", "accession_number", "appointment_date",
                       "appointment_time", "modality", "study_instance_uid", "status"),
    "mpps_tracking": ("id", "sop_instance_uid", "accession_number", "study_instance_uid",
                      "modality", "status", "start_time", "end_time"),
}
_SILENT = StatusReporting(kinds=frozenset(), unscheduled=False)
_CONTROL_ID = "import-db"
_ITEM_STATUS = {
    "SCHEDULED": ItemStatus.SCHEDULED,
    "IN PROGRESS": ItemStatus.IN_PROGRESS,
    "INPROGRESS": ItemStatus.IN_PROGRESS,
    "COMPLETED": ItemStatus.COMPLETED,
    "DISCONTINUED": ItemStatus.DISCONTINUED,
    "CANCELLED": ItemStatus.CANCELLED,
    "CANCELED": ItemStatus.CANCELLED,
}
# ItemStatus -> ORC-5 of the status-only order that sets it (broker.orders' vocabulary).
_ORC5 = {ItemStatus.IN_PROGRESS: "IP", ItemStatus.COMPLETED: "CM",
         ItemStatus.DISCONTINUED: "DC", ItemStatus.CANCELLED: "CA"}


class LegacyImportError(BrokerError):
    """The file is not a database of the old worklist server; nothing was imported."""


class _Skip(Exception):
    """A row that cannot be imported, with the reason."""


class _DryRun(Exception):
    """Raised to roll the dry run's transaction back."""


@dataclass
class LegacyImportResult:
    patients: int = 0  # patients new to the broker
    items: int = 0
    mpps: int = 0
    already_present: int = 0  # items and MPPS the broker holds already (a second run)
    patients_without_items: int = 0
    skipped: list[str] = field(default_factory=list)  # "worklist_items id 7 (ACC-7): reason"
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False


def parse_date(value: Any) -> dt.date | None:
    """DICOM ``YYYYMMDD`` or ISO ``YYYY-MM-DD`` (also the old ACR-NEMA ``YYYY.MM.DD``)."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    for pattern in ("%Y%m%d", "%Y-%m-%d", "%Y.%m.%d"):
        try:
            return dt.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
    raise ValueError(f"{text!r} is neither YYYYMMDD nor YYYY-MM-DD")


_DICOM_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_ISO_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?$")


def parse_time(value: Any) -> dt.time | None:
    """DICOM ``HHMMSS`` (``HHMM``, ``HH``, fractions) or ISO ``HH:MM`` / ``HH:MM:SS``."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    match = _DICOM_TIME.match(text) or _ISO_TIME.match(text)
    if match:
        hour, minute, second, fraction = match.groups()
        try:
            return dt.time(int(hour), int(minute or 0), int(second or 0),
                           int((fraction or "0").ljust(6, "0")))
        except ValueError:
            pass
    raise ValueError(f"{text!r} is neither HHMMSS nor HH:MM")


def parse_datetime(value: Any) -> dt.datetime | None:
    """An MPPS time as the old server stored it: an SQL/ISO timestamp, DICOM DT, or seconds
    since the epoch."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value)
    text = str(value).strip()
    try:
        moment = dt.datetime.fromisoformat(text)
        return moment.astimezone().replace(tzinfo=None) if moment.tzinfo else moment
    except ValueError:
        pass
    if re.fullmatch(r"\d{8,14}(\.\d{1,6})?", text):
        day = parse_date(text[:8])
        assert day is not None
        return dt.datetime.combine(day, parse_time(text[8:]) or dt.time())
    raise ValueError(f"{text!r} is not a date and time")


def _status(value: Any) -> ItemStatus:
    text = re.sub(r"[\s_-]+", " ", str(value or "").strip().upper())
    if not text:
        return ItemStatus.SCHEDULED
    status = _ITEM_STATUS.get(text)
    if status is None:
        raise _Skip(f"status {value!r} is not SCHEDULED, IN PROGRESS, COMPLETED or "
                    "DISCONTINUED")
    return status


def _text(value: Any) -> str | None:
    return str(value).strip() or None if value is not None else None


def read_legacy(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of the three tables, or LegacyImportError naming what is missing."""
    if not path.is_file():
        raise LegacyImportError(f"no file {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LegacyImportError(f"{path}: cannot open: {exc}") from None
    try:
        conn.row_factory = sqlite3.Row
        try:
            present = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise LegacyImportError(f"{path} is not an SQLite database ({exc})") from None
        missing_tables = [name for name in TABLES if name not in present]
        if missing_tables:
            raise LegacyImportError(f"{path} is not a worklist server database: no table "
                                    f"{', '.join(missing_tables)}")
        rows: dict[str, list[dict[str, Any]]] = {}
        for table, columns in TABLES.items():
            have = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
            lacking = [column for column in columns if column not in have]
            if lacking:
                raise LegacyImportError(f"{path} is not a worklist server database: table "
                                        f"{table} has no column {', '.join(lacking)}")
            query = f'SELECT {", ".join(columns)} FROM "{table}" ORDER BY id'
            rows[table] = [dict(row) for row in conn.execute(query)]
        return rows
    finally:
        conn.close()


def _legacy_uid(uid_root: str, *parts: Any) -> str:
    """A UID for an MPPS row that has none, the same at every run (running twice imports it
    once)."""
    digest = int(hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest(), 16)
    room = MAX_UID_LENGTH - len(uid_root) - 1
    return f"{uid_root}.{str(digest)[:room].lstrip('0') or '1'}"


class _Importer:
    def __init__(self, session: Session, rows: dict[str, list[dict[str, Any]]], uid_root: str,
                 result: LegacyImportResult) -> None:
        self.session = session
        self.uid_root = uid_root
        self.result = result
        self.rows = rows
        self.patients_by_pid = {str(p["patient_id"]).strip(): p for p in rows["patients"]
                                if _text(p["patient_id"])}
        self.patients_by_id = {str(p["id"]): p for p in rows["patients"]}
        self.final_status: dict[str, ItemStatus] = {}

    def _patient(self, row: dict[str, Any]) -> PatientData:
        reference = _text(row["patient_id"])
        if reference is None:
            raise _Skip("no patient ID")
        # patient_id is the patient's own ID; a server that stored patients.id there is read
        # as well.
        patient = self.patients_by_pid.get(reference) or self.patients_by_id.get(reference)
        if patient is None:
            return PatientData(patient_id=reference)
        patient_id = _text(patient["patient_id"]) or reference
        try:
            birth_date = parse_date(patient["birth_date"])
        except ValueError as exc:
            self.result.warnings.append(f"patients id {patient['id']} ({patient_id}): "
                                        f"birth_date {exc}; imported without it")
            birth_date = None
        sex = _text(patient["sex"])
        return PatientData(patient_id=patient_id, patient_name=_text(patient["patient_name"]),
                           birth_date=birth_date, sex=sex.upper()[:16] if sex else None)

    def item(self, row: dict[str, Any]) -> None:
        accession = _text(row["accession_number"])
        if accession is None:
            raise _Skip("no accession number")
        if self.session.scalar(select(WorklistItem.id).where(
                WorklistItem.accession_number == accession)) is not None:
            self.result.already_present += 1
            return
        status = _status(row["status"])
        try:
            day = parse_date(row["appointment_date"])
        except ValueError as exc:
            raise _Skip(f"appointment_date {exc}") from None
        try:
            time_of_day = parse_time(row["appointment_time"])
        except ValueError as exc:
            raise _Skip(f"appointment_time {exc}") from None
        if day is None and time_of_day is not None:
            raise _Skip("appointment_time without appointment_date")
        patient = self._patient(row)
        new_patient = self.session.scalar(select(Patient.id).where(
            Patient.patient_id == patient.patient_id)) is None
        start = dt.datetime.combine(day, time_of_day or dt.time()) if day else None
        procedure = ProcedureData(accession_number=accession,
                                  study_instance_uid=_text(row["study_instance_uid"]),
                                  modality=_text(row["modality"]), scheduled_start=start)
        apply_order(self.session, Order(OrderControl.NEW, patient, procedure,
                                        message_control_id=_CONTROL_ID),
                    uid_root=self.uid_root, reporting=_SILENT)
        self.final_status[accession] = status
        self.result.items += 1
        self.result.patients += new_patient

    def mpps(self, row: dict[str, Any]) -> None:
        accession = _text(row["accession_number"])
        study_uid = _text(row["study_instance_uid"])
        uid = _text(row["sop_instance_uid"]) or _legacy_uid(
            self.uid_root, "mpps", row["id"], accession, study_uid, row["start_time"])
        if self.session.scalar(select(MPPSTracking.id).where(
                MPPSTracking.sop_instance_uid == uid)) is not None:
            self.result.already_present += 1
            return
        status = _status(row["status"] or "IN PROGRESS")
        if status not in (ItemStatus.IN_PROGRESS, ItemStatus.COMPLETED,
                          ItemStatus.DISCONTINUED):
            raise _Skip(f"MPPS status {row['status']!r} is not IN PROGRESS, COMPLETED or "
                        "DISCONTINUED")
        try:
            start = parse_datetime(row["start_time"])
            end = parse_datetime(row["end_time"])
        except ValueError as exc:
            raise _Skip(f"start_time/end_time: {exc}") from None
        steps = (ScheduledStepRef(accession_number=accession, study_instance_uid=study_uid),)
        record_mpps_create(self.session, MppsCreate(
            sop_instance_uid=uid, status=MppsStatus.IN_PROGRESS, steps=steps, start=start,
            attributes_json=_mpps_json(MppsStatus.IN_PROGRESS, accession, study_uid,
                                       _text(row["modality"]), start, None)), _SILENT)
        if status is not ItemStatus.IN_PROGRESS:
            final = MppsStatus(status.value)
            # A final state needs its end (PS3.4 F.7.2.2); the old server did not always
            # keep one: the start stands in.
            end = end or start
            if end is None:
                raise _Skip(f"MPPS {status.value} without start_time or end_time")
            record_mpps_set(self.session, MppsSet(
                sop_instance_uid=uid, status=final, end=end,
                attributes_json=_mpps_json(final, None, None, None, None, end)), _SILENT)
        self.result.mpps += 1

    def statuses(self) -> None:
        """Each imported item gets the status the old server showed (after its MPPS, which
        may have moved it)."""
        for accession, status in self.final_status.items():
            item = self.session.scalars(select(WorklistItem).where(
                WorklistItem.accession_number == accession)).one()
            if item.status == status:
                continue
            if status is ItemStatus.SCHEDULED:
                item.status = ItemStatus.SCHEDULED  # no order control code goes back to SC
                continue
            apply_order(self.session, Order(
                OrderControl.STATUS, PatientData(item.patient.patient_id),
                ProcedureData(accession_number=accession), message_control_id=_CONTROL_ID,
                order_status=_ORC5[status]), uid_root=self.uid_root, reporting=_SILENT)


def _da_tm(moment: dt.datetime) -> tuple[str, str]:
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def _mpps_json(status: MppsStatus, accession: str | None, study_uid: str | None,
               modality: str | None, start: dt.datetime | None, end: dt.datetime | None,
               ) -> str:
    """The little an old MPPS row says, as the DICOM JSON the broker keeps for an MPPS."""
    def element(vr: str, value: str | None) -> dict[str, Any]:
        return {"vr": vr, "Value": [value]} if value else {"vr": vr}

    data: dict[str, Any] = {"00400252": element("CS", status.value)}
    if modality:
        data["00080060"] = element("CS", modality)
    if start:
        day, time_of_day = _da_tm(start)
        data["00400244"], data["00400245"] = element("DA", day), element("TM", time_of_day)
    if end:
        day, time_of_day = _da_tm(end)
        data["00400250"], data["00400251"] = element("DA", day), element("TM", time_of_day)
    if accession or study_uid:
        data["00400270"] = {"vr": "SQ", "Value": [{
            "00080050": element("SH", accession), "0020000D": element("UI", study_uid)}]}
    return json.dumps(data)


def _each(session: Session, table: str, rows: list[dict[str, Any]], handle: Any,
          result: LegacyImportResult) -> None:
    for row in rows:
        try:
            with session.begin_nested():
                handle(row)
        except (_Skip, BrokerError, ValueError) as exc:
            accession = _text(row.get("accession_number")) or "-"
            result.skipped.append(f"{table} id {row['id']} (accession {accession}): {exc}")


def import_legacy(store: Store, path: Path, *, uid_root: str, dry_run: bool = False,
                  ) -> LegacyImportResult:
    rows = read_legacy(path)
    result = LegacyImportResult(dry_run=dry_run)
    try:
        with store.writing() as session:
            importer = _Importer(session, rows, uid_root, result)
            _each(session, "worklist_items", rows["worklist_items"], importer.item, result)
            _each(session, "mpps_tracking", rows["mpps_tracking"], importer.mpps, result)
            importer.statuses()
            referenced = {_text(i["patient_id"]) for i in rows["worklist_items"]}
            result.patients_without_items = sum(
                1 for p in rows["patients"]
                if _text(p["patient_id"]) not in referenced and str(p["id"]) not in referenced)
            result.warnings = list(dict.fromkeys(result.warnings))
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    log.info("import-db %s%s: patients=%d items=%d mpps=%d already=%d skipped=%d", path,
             " (dry run)" if dry_run else "", result.patients, result.items, result.mpps,
             result.already_present, len(result.skipped))
    return result
