"""Worklist matching (DICOM PS3.4 C.2.2.2 and K.2.2.1) turned into SQL filters.

One function per matching type, as in pynetdicom's qrscp database module: single value,
wildcard (``*`` and ``?`` become LIKE with the value's own ``%`` and ``_`` escaped), range on
dates and times, list of UIDs, and universal matching (no filter at all). Every filter runs in
the database on indexed columns; nothing loops over rows in Python.

Scheduled Procedure Step Start Date and Time: when a query carries both, they are matched as
one combined date-time range (PS3.4 C.2.2.2.5.1, "Range Matching of Attributes of VR of DA
and TM together"): ``date=20261129-20261130, time=0800-1200`` means from 2026-11-29 08:00 to
2026-11-30 12:00, not 08:00-12:00 on each day. A time without a date matches the time of
day on any date. DCMTK's wlmscpfs applies the same combined rule.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, String, and_, func, select
from sqlalchemy.orm import Session, contains_eager
from sqlalchemy.sql.elements import ColumnElement as Column

from broker.domain import (
    VISIBLE_STATUSES,
    ItemStatus,
    PatientData,
    ProcedureData,
    WorklistRow,
)
from broker.errors import BrokerError
from broker.models import Patient, WorklistItem


class InvalidQuery(BrokerError):
    """A matching key value that cannot be read (e.g. a malformed date range)."""


@dataclass(frozen=True, slots=True)
class WorklistQuery:
    """The matching keys of one C-FIND; None means universal matching (no condition)."""

    accession_number: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None
    study_instance_uid: str | None = None
    requested_procedure_id: str | None = None
    referring_physician_name: str | None = None
    modality: str | None = None
    scheduled_station_ae_title: str | None = None
    sps_id: str | None = None
    scheduled_start_date: str | None = None
    scheduled_start_time: str | None = None
    statuses: tuple[ItemStatus, ...] = VISIBLE_STATUSES
    case_insensitive_names: bool = True
    limit: int = 1000


def _is_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def match_single_or_wildcard(column: Column[str | None], value: str,
                             case_insensitive: bool = False) -> ColumnElement[bool] | None:
    """Single value matching, or wildcard matching when the value holds ``*`` or ``?``
    (PS3.4 C.2.2.2.1 and C.2.2.2.3); None when it matches everything."""
    if value.strip("*") == "":
        # "*" alone is universal: it matches every item, even one with no value (C.2.2.2.3).
        return None
    target: ColumnElement[str | None] = column
    if case_insensitive:
        target = func.lower(column)
        value = value.lower()
    if _is_wildcard(value):
        return target.like(_like_pattern(value), escape="\\")
    return target == value


def match_uid_list(column: Column[str | None], value: str) -> ColumnElement[bool]:
    """List of UID matching (C.2.2.2.2): backslash-separated UIDs, any of which may match."""
    uids = [uid.strip() for uid in value.split("\\") if uid.strip()]
    return column.in_(uids) if len(uids) > 1 else column == uids[0]


def _parse_date(text: str) -> dt.date:
    text = text.strip().replace(".", "")  # ACR-NEMA style YYYY.MM.DD still seen in the wild
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise InvalidQuery(f"{text!r} is not a DICOM date (YYYYMMDD)") from None


_TIME = re.compile(r"^(\d{2})(?::?(\d{2}))?(?::?(\d{2}))?(?:\.(\d{1,6}))?$")


def _parse_time(text: str, upper: bool) -> dt.time:
    match = _TIME.match(text.strip())
    if match is None:
        raise InvalidQuery(f"{text!r} is not a DICOM time (HHMMSS)")
    hour, minute, second, fraction = match.groups()
    try:
        if upper:
            # An upper bound of lower precision covers its whole unit: 12 means 12:59:59.999999.
            return dt.time(int(hour), int(minute) if minute else 59,
                           int(second) if second else 59,
                           int((fraction or "").ljust(6, "9")) if fraction or not second
                           else 999999)
        return dt.time(int(hour), int(minute or 0), int(second or 0),
                       int((fraction or "0").ljust(6, "0")))
    except ValueError:
        raise InvalidQuery(f"{text!r} is not a valid time") from None


def _split_range(value: str) -> tuple[str, str] | None:
    if "-" not in value:
        return None
    if value.count("-") > 1:
        raise InvalidQuery(f"{value!r} is not a range (A-B, -B or A-)")
    low, high = value.split("-")
    return low.strip(), high.strip()


def _bounds(date_value: str | None, time_value: str | None,
            ) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The combined date-time interval [low, high] a DA (+ TM) key asks for."""
    low_date = high_date = None
    if date_value:
        parts = _split_range(date_value)
        if parts is None:
            low_date = high_date = _parse_date(date_value)
        else:
            low_date = _parse_date(parts[0]) if parts[0] else None
            high_date = _parse_date(parts[1]) if parts[1] else None
    low_time, high_time = dt.time.min, dt.time.max
    if time_value:
        parts = _split_range(time_value)
        if parts is None:
            low_time, high_time = _parse_time(time_value, False), _parse_time(time_value, True)
        else:
            low_time = _parse_time(parts[0], False) if parts[0] else dt.time.min
            high_time = _parse_time(parts[1], True) if parts[1] else dt.time.max
    low = dt.datetime.combine(low_date, low_time) if low_date else None
    high = dt.datetime.combine(high_date, high_time) if high_date else None
    return low, high


def match_scheduled_start(column: Column[dt.datetime | None], date_value: str | None,
                          time_value: str | None) -> ColumnElement[bool] | None:
    """Single value and range matching on the SPS start, date and time combined."""
    if not date_value and not time_value:
        return None
    if date_value:
        low, high = _bounds(date_value, time_value)
        conditions = []
        if low is not None:
            conditions.append(column >= low)
        if high is not None:
            conditions.append(column <= high)
        if not conditions:
            raise InvalidQuery("a date range needs at least one bound")
        return and_(*conditions)
    # A time without a date: the time of day, on any date.
    low_dt, high_dt = _bounds("20000101", time_value)
    assert low_dt is not None and high_dt is not None
    # Both backends render a timestamp as 'YYYY-MM-DD HH:MM:SS...': characters 12-19.
    time_of_day = func.substr(func.cast(column, String()), 12, 8)
    return and_(time_of_day >= low_dt.strftime("%H:%M:%S"),
                time_of_day <= high_dt.strftime("%H:%M:%S"))


def _filters(query: WorklistQuery) -> list[ColumnElement[bool]]:
    ci = query.case_insensitive_names
    item, patient = WorklistItem, Patient
    text_keys: list[tuple[Column[str | None], str | None, bool]] = [
        (item.accession_number, query.accession_number, False),
        (patient.patient_id, query.patient_id, False),
        (patient.issuer_of_patient_id, query.issuer_of_patient_id, False),
        (patient.patient_name, query.patient_name, ci),
        (item.requested_procedure_id, query.requested_procedure_id, False),
        (item.referring_physician_name, query.referring_physician_name, ci),
        (item.modality, query.modality, False),
        (item.scheduled_station_ae_title, query.scheduled_station_ae_title, False),
        (item.sps_id, query.sps_id, False),
    ]
    filters: list[ColumnElement[bool]] = [item.status.in_([s.value for s in query.statuses])]
    for column, value, insensitive in text_keys:
        condition = match_single_or_wildcard(column, value, insensitive) if value else None
        if condition is not None:
            filters.append(condition)
    if query.study_instance_uid:
        filters.append(match_uid_list(item.study_instance_uid, query.study_instance_uid))
    start = match_scheduled_start(item.scheduled_start, query.scheduled_start_date,
                                  query.scheduled_start_time)
    if start is not None:
        filters.append(start)
    return filters


def build_select(query: WorklistQuery) -> Select[tuple[WorklistItem]]:
    return (select(WorklistItem)
            .join(WorklistItem.patient)
            .options(contains_eager(WorklistItem.patient))
            .where(*_filters(query))
            .order_by(WorklistItem.scheduled_start, WorklistItem.id)
            .limit(query.limit))


def _row(item: WorklistItem) -> WorklistRow:
    p = item.patient
    return WorklistRow(
        patient=PatientData(p.patient_id, p.issuer_of_patient_id, p.patient_name,
                            p.birth_date, p.sex),
        procedure=ProcedureData(
            accession_number=item.accession_number,
            study_instance_uid=item.study_instance_uid,
            requested_procedure_id=item.requested_procedure_id,
            requested_procedure_description=item.requested_procedure_description,
            requested_procedure_code_value=item.requested_procedure_code_value,
            requested_procedure_code_scheme=item.requested_procedure_code_scheme,
            requested_procedure_code_meaning=item.requested_procedure_code_meaning,
            sps_id=item.sps_id,
            sps_description=item.sps_description,
            modality=item.modality,
            scheduled_station_ae_title=item.scheduled_station_ae_title,
            scheduled_start=item.scheduled_start,
            referring_physician_name=item.referring_physician_name,
            requesting_physician=item.requesting_physician,
            placer_order_number=item.placer_order_number,
            filler_order_number=item.filler_order_number,
        ),
        status=ItemStatus(item.status),
    )


def find_worklist(session: Session, query: WorklistQuery) -> list[WorklistRow]:
    """The matching items, earliest first, as plain rows the caller may keep after the
    session is closed."""
    return [_row(item) for item in session.scalars(build_select(query))]
