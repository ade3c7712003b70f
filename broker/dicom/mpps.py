"""MPPS N-CREATE / N-SET (PS3.4 Annex F): datasets -> the core's MppsCreate / MppsSet.

Refusals come back as the status the standard names, with an Error Comment: 0x0120 missing
attribute, 0x0106 invalid attribute value, 0x0111 duplicate SOP instance, 0x0112 no such SOP
instance, 0x0110 processing failure (which is also what a database failure returns: the
modality may retry, and nothing was half-written).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy.exc import SQLAlchemyError

from broker.domain import MppsCreate, MppsSet, ScheduledStepRef
from broker.errors import MppsError
from broker.mpps import record_mpps_create, record_mpps_set
from broker.store import Store

log = logging.getLogger(__name__)

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
MISSING_ATTRIBUTE = 0x0120

# PS3.4 F.7.2.2: an N-SET after COMPLETED / DISCONTINUED fails with this Error ID.
_ERROR_IDS = {PROCESSING_FAILURE: 0xA710}


def status_dataset(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # Error Comment is LO: 64 characters at most.
    ds.ErrorComment = comment[:64]
    if status in _ERROR_IDS and "may no longer be updated" in comment:
        ds.ErrorID = _ERROR_IDS[status]
    return ds


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value not in (None, "") else None


def _datetime(ds: Dataset, date_keyword: str, time_keyword: str) -> dt.datetime | None:
    date = _text(ds, date_keyword)
    if not date:
        return None
    time = (_text(ds, time_keyword) or "").replace(":", "")
    try:
        day = dt.datetime.strptime(date[:8], "%Y%m%d")
        digits = time.split(".")[0].ljust(6, "0")[:6]
        return day.replace(hour=int(digits[:2]), minute=int(digits[2:4]),
                           second=int(digits[4:6]))
    except ValueError:
        raise MppsError(INVALID_ATTRIBUTE_VALUE,
                        f"{date_keyword}/{time_keyword} {date} {time} is not a date and time"
                        ) from None


def _steps(ds: Dataset) -> tuple[ScheduledStepRef, ...]:
    sequence = ds.get("ScheduledStepAttributesSequence") or []
    return tuple(ScheduledStepRef(
        accession_number=_text(item, "AccessionNumber"),
        study_instance_uid=_text(item, "StudyInstanceUID"),
        requested_procedure_id=_text(item, "RequestedProcedureID"),
        sps_id=_text(item, "ScheduledProcedureStepID"),
    ) for item in sequence)


def _json(ds: Dataset) -> str | None:
    try:
        return ds.to_json()
    except Exception:  # an unencodable private element must not lose the MPPS itself
        log.warning("MPPS dataset could not be kept as JSON", exc_info=True)
        return None


def _run(store: Store, operation: Any, request: Any) -> tuple[int | Dataset, Dataset | None]:
    try:
        with store.writing() as session:
            operation(session, request)
    except MppsError as exc:
        log.warning("MPPS %s refused: 0x%04X %s", request.sop_instance_uid, exc.status,
                    exc.comment)
        return status_dataset(exc.status, exc.comment), None
    except SQLAlchemyError as exc:
        log.error("MPPS %s: database error: %s", request.sop_instance_uid,
                  str(getattr(exc, "orig", exc)).splitlines()[0])
        return status_dataset(PROCESSING_FAILURE, "database unavailable; please retry"), None
    return SUCCESS, None


def handle_n_create(evt: Any, store: Store) -> tuple[int | Dataset, Dataset | None]:
    try:
        ds: Dataset = evt.attribute_list
        status = _text(ds, "PerformedProcedureStepStatus")
        if status is None:
            return status_dataset(MISSING_ATTRIBUTE, "PerformedProcedureStepStatus missing"), None
        uid = evt.request.AffectedSOPInstanceUID or generate_uid()
        request = MppsCreate(
            sop_instance_uid=str(uid),
            status=status,
            steps=_steps(ds),
            start=_datetime(ds, "PerformedProcedureStepStartDate",
                            "PerformedProcedureStepStartTime"),
            performed_station_ae_title=_text(ds, "PerformedStationAETitle"),
            calling_ae_title=evt.assoc.requestor.ae_title,
            attributes_json=_json(ds),
        )
    except MppsError as exc:
        return status_dataset(exc.status, exc.comment), None
    except Exception as exc:
        log.warning("unreadable MPPS N-CREATE: %s", exc)
        return status_dataset(INVALID_ATTRIBUTE_VALUE, f"unreadable dataset: {exc}"), None
    status_or_ds, _ = _run(store, record_mpps_create, request)
    if status_or_ds != SUCCESS:
        return status_or_ds, None
    if not evt.request.AffectedSOPInstanceUID:
        ds.AffectedSOPInstanceUID = request.sop_instance_uid  # PS3.7 10.1.5.1.4
    return SUCCESS, ds


def handle_n_set(evt: Any, store: Store) -> tuple[int | Dataset, Dataset | None]:
    try:
        ds: Dataset = evt.modification_list
        request = MppsSet(
            sop_instance_uid=str(evt.request.RequestedSOPInstanceUID),
            status=_text(ds, "PerformedProcedureStepStatus"),
            end=_datetime(ds, "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime"),
            attributes_json=_json(ds),
        )
    except MppsError as exc:
        return status_dataset(exc.status, exc.comment), None
    except Exception as exc:
        log.warning("unreadable MPPS N-SET: %s", exc)
        return status_dataset(INVALID_ATTRIBUTE_VALUE, f"unreadable dataset: {exc}"), None
    status_or_ds, _ = _run(store, record_mpps_set, request)
    if status_or_ds != SUCCESS:
        return status_or_ds, None
    return SUCCESS, ds
