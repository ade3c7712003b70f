"""What the RIS is told, and when: status events built from items and MPPS records.

The outbox stores the event (``broker.outbox``); how it looks on the wire (message type,
version, field templates) is decided by the HL7 edge when it is sent. Whether an event is
written at all is the site's :class:`StatusReporting` policy, applied here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import replace
from typing import Any

from sqlalchemy.orm import Session

from broker import outbox
from broker.domain import (
    ItemStatus,
    MppsStatus,
    StatusEvent,
    StatusKind,
    StatusReporting,
    StudyArrival,
)
from broker.models import MPPSTracking, WorklistItem

# HL7 table 0038 order status (ORC-5) for each item status.
ORDER_STATUS = {
    ItemStatus.SCHEDULED: "SC",
    ItemStatus.IN_PROGRESS: "IP",
    ItemStatus.COMPLETED: "CM",
    ItemStatus.DISCONTINUED: "DC",
    ItemStatus.CANCELLED: "CA",
    ItemStatus.HELD: "HD",
}
_MPPS_KIND = {
    MppsStatus.IN_PROGRESS: StatusKind.IN_PROGRESS,
    MppsStatus.COMPLETED: StatusKind.COMPLETED,
    MppsStatus.DISCONTINUED: StatusKind.DISCONTINUED,
}
# DICOM JSON tags read from the kept MPPS dataset (PS3.18 F.2).
_ACCESSION_NUMBER = "00080050"
_SCHEDULED_STEP_ATTRIBUTES = "00400270"
_PATIENT_NAME = "00100010"
_PATIENT_ID = "00100020"
_MODALITY = "00080060"
_PERFORMED_SERIES = "00400340"
_REFERENCED_IMAGES = "00081140"
_REFERENCED_NON_IMAGES = "00400220"
_DISCONTINUATION_REASON = "00400281"
_CODE_VALUE, _CODING_SCHEME, _CODE_MEANING = "00080100", "00080102", "00080104"


def _values(dataset: dict[str, Any], tag: str) -> list[Any]:
    element = dataset.get(tag)
    value = element.get("Value") if isinstance(element, dict) else None
    return value if isinstance(value, list) else []


def _text(dataset: dict[str, Any], tag: str) -> str | None:
    values = _values(dataset, tag)
    if not values:
        return None
    first = values[0]
    if isinstance(first, dict):  # PN: {"Alphabetic": ..., "Ideographic": ..., ...}
        first = first.get("Alphabetic")
    return str(first) if first not in (None, "") else None


def _items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return [item for item in _values(dataset, tag) if isinstance(item, dict)]


def _dataset(record: MPPSTracking) -> dict[str, Any]:
    try:
        data = json.loads(record.attributes_json) if record.attributes_json else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def number_of_images(dataset: dict[str, Any]) -> int | None:
    """Instances referenced by the Performed Series Sequence; None if the MPPS has none."""
    if _PERFORMED_SERIES not in dataset:
        return None
    return sum(len(_items(series, _REFERENCED_IMAGES))
               + len(_items(series, _REFERENCED_NON_IMAGES))
               for series in _items(dataset, _PERFORMED_SERIES))


def _mpps_event(record: MPPSTracking, data: dict[str, Any], status: MppsStatus,
                item: WorklistItem | None,
                ) -> StatusEvent:
    reasons = _items(data, _DISCONTINUATION_REASON)
    reason = reasons[0] if reasons and status is MppsStatus.DISCONTINUED else {}
    final = status is not MppsStatus.IN_PROGRESS
    common: dict[str, Any] = dict(
        # The MPPS states are item states of the same names.
        order_status=ORDER_STATUS[ItemStatus(status)],
        kind=_MPPS_KIND[status],
        mpps_sop_instance_uid=record.sop_instance_uid,
        event_time=record.end_datetime if final else record.start_datetime,
        performed_start=record.start_datetime,
        performed_end=record.end_datetime if final else None,
        number_of_images=number_of_images(data) if final else None,
        discontinuation_reason_code=_text(reason, _CODE_VALUE),
        discontinuation_reason_meaning=_text(reason, _CODE_MEANING),
        discontinuation_reason_scheme=_text(reason, _CODING_SCHEME),
    )
    if item is None:
        return StatusEvent(
            accession_number="", patient_id=_text(data, _PATIENT_ID),
            patient_name=_text(data, _PATIENT_NAME), modality=_text(data, _MODALITY),
            station_ae_title=record.performed_station_ae_title, **common)
    return StatusEvent(
        **_item_fields(item),
        modality=_text(data, _MODALITY) or item.modality,
        station_ae_title=record.performed_station_ae_title or item.scheduled_station_ae_title,
        **common)


def _item_fields(item: WorklistItem) -> dict[str, Any]:
    patient = item.patient
    return dict(
        accession_number=item.accession_number,
        placer_order_number=item.placer_order_number,
        filler_order_number=item.filler_order_number,
        patient_id=patient.patient_id,
        issuer_of_patient_id=patient.issuer_of_patient_id,
        patient_name=patient.patient_name,
        requested_procedure_code_value=item.requested_procedure_code_value,
        requested_procedure_code_scheme=item.requested_procedure_code_scheme,
        requested_procedure_code_meaning=item.requested_procedure_code_meaning,
        requested_procedure_id=item.requested_procedure_id,
        sps_id=item.sps_id,
        study_instance_uid=item.study_instance_uid,
    )


def _unscheduled_key(record: MPPSTracking, accession: str | None) -> str:
    """The outbox's per-order key for an MPPS with no order: its own accession number if it
    carries one, else one derived from the MPPS UID, so that unscheduled procedures never
    queue behind each other."""
    if accession:
        return accession[:16]
    return "~" + hashlib.sha1(record.sop_instance_uid.encode()).hexdigest()[:15]


def _sent_accession(dataset: dict[str, Any]) -> str | None:
    """The first accession number in the MPPS's Scheduled Step Attributes Sequence."""
    for step in _items(dataset, _SCHEDULED_STEP_ATTRIBUTES):
        accession = _text(step, _ACCESSION_NUMBER)
        if accession:
            return accession
    return None


def report_mpps(session: Session, policy: StatusReporting, record: MPPSTracking,
                status: MppsStatus, item: WorklistItem | None) -> None:
    """Queue the status message for one item an MPPS reports on (``item`` None: the MPPS
    matched no scheduled item)."""
    if _MPPS_KIND[status] not in policy.kinds:
        return
    if item is None:
        if not policy.unscheduled:
            return
        data = _dataset(record)
        accession = _sent_accession(data)
        event = replace(_mpps_event(record, data, status, None),
                        accession_number=accession or "")
        outbox.enqueue(session, event, order_key=_unscheduled_key(record, accession))
        return
    outbox.enqueue(session, _mpps_event(record, _dataset(record), status, item))


def report_order_status(session: Session, policy: StatusReporting, item: WorklistItem,
                        when: dt.datetime | None = None) -> None:
    """Queue an order status message for an item whose status an order message changed."""
    if StatusKind.ORDER_STATUS not in policy.kinds:
        return
    outbox.enqueue(session, StatusEvent(
        order_status=ORDER_STATUS[ItemStatus(item.status)], kind=StatusKind.ORDER_STATUS,
        # Local time, as the RIS's own timestamps and the modalities' DICOM dates are.
        event_time=when or dt.datetime.now(), modality=item.modality,
        station_ae_title=item.scheduled_station_ae_title, **_item_fields(item)))


def report_study(session: Session, policy: StatusReporting, item: WorklistItem,
                 study: StudyArrival, kind: StatusKind) -> None:
    """Queue the message for a stable study that matched ``item``: ``COMPLETED`` is the very
    message an MPPS COMPLETED sends (ORC-5 CM, the same ``completed`` settings), with the
    study's performed data in place of the MPPS's; ``STUDY_RECEIVED`` tells the RIS the images
    are there, with the item's status as it now is."""
    if kind not in policy.kinds:
        return
    status = ItemStatus.COMPLETED if kind is StatusKind.COMPLETED else ItemStatus(item.status)
    performed = study.performed_at
    outbox.enqueue(session, StatusEvent(
        order_status=ORDER_STATUS[status], kind=kind,
        # As the MPPS message: the time the step ended, here the study's (local) date.
        event_time=performed or dt.datetime.now(),
        performed_start=performed, performed_end=None,
        number_of_images=study.number_of_instances,
        # One value (IPC-5 is one code): the ordered modality if the study holds it (a CT
        # study often carries SR or PR series too), else the study's first.
        modality=(item.modality if not study.modalities or item.modality in study.modalities
                  else study.modalities[0]),
        station_ae_title=item.scheduled_station_ae_title,
        **_item_fields(item)))
