"""record_mpps_create / record_mpps_set: MPPS state, the item's status, the RIS outbox and the
forwards owed to downstream MPPS SCPs, all in the caller's transaction.

Statuses and their DICOM codes follow PS3.4 Annex F and PS3.7 C.4: 0x0106 invalid attribute
value, 0x0110 processing failure, 0x0111 duplicate SOP instance, 0x0112 no such SOP instance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker import mpps_forward
from broker.config import MppsDestination
from broker.db_text import field_with_nul
from broker.domain import (
    DEFAULT_REPORTING,
    ItemStatus,
    MppsCreate,
    MppsResult,
    MppsSet,
    MppsStatus,
    ScheduledStepRef,
    StatusReporting,
)
from broker.errors import MppsError
from broker.models import MppsForwardOperation, MPPSTracking, WorklistItem, utcnow
from broker.status_events import report_mpps
from broker.studies import completed_by_study

log = logging.getLogger(__name__)

INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
NO_LONGER_UPDATABLE = 0xA710  # Error ID, with PROCESSING_FAILURE

_ITEM_STATUS = {
    MppsStatus.IN_PROGRESS: ItemStatus.IN_PROGRESS,
    MppsStatus.COMPLETED: ItemStatus.COMPLETED,
    MppsStatus.DISCONTINUED: ItemStatus.DISCONTINUED,
}


def _linked_items(session: Session, steps: tuple[ScheduledStepRef, ...]) -> list[WorklistItem]:
    """The items an MPPS reports on (IHE RAD-6: the Scheduled Step Attributes Sequence).

    By accession number, else by Study Instance UID; the requested procedure ID and SPS ID,
    when the modality sends them, narrow a study down to its steps (but never to nothing: a
    modality that echoes a stale SPS ID still reports on its study).
    """
    found: dict[int, WorklistItem] = {}
    for step in steps:
        if step.accession_number:
            query = select(WorklistItem).where(
                WorklistItem.accession_number == step.accession_number)
        elif step.study_instance_uid:
            query = select(WorklistItem).where(
                WorklistItem.study_instance_uid == step.study_instance_uid)
        else:
            continue
        items = list(session.scalars(query))
        narrowed = [item for item in items
                    if (not step.sps_id or item.sps_id == step.sps_id)
                    and (not step.requested_procedure_id
                         or item.requested_procedure_id == step.requested_procedure_id)]
        for item in narrowed or items:
            found.setdefault(item.id, item)
    return list(found.values())


def _merged_json(created: str | None, modified: str) -> str:
    """The N-CREATE attributes with the N-SET modifications applied (both DICOM JSON)."""
    try:
        merged = json.loads(created) if created else {}
        merged.update(json.loads(modified))
    except (ValueError, AttributeError):
        return modified
    return json.dumps(merged)


def _other_steps_in_progress(item: WorklistItem, record: MPPSTracking) -> bool:
    return any(other.id != record.id and other.status == MppsStatus.IN_PROGRESS
               for other in item.mpps)


def _completed_by_its_study(session: Session, item: WorklistItem) -> bool:
    """The PACS's stable study already completed the item and told the RIS (orthanc.on_study
    complete): an MPPS arriving late changes its status no more and sends nothing twice."""
    return item.status == ItemStatus.COMPLETED and completed_by_study(session, item)


def _report(session: Session, policy: StatusReporting, record: MPPSTracking,
            status: MppsStatus, item: WorklistItem) -> None:
    item.status = _ITEM_STATUS[status]
    report_mpps(session, policy, record, status, item)


def stored_attributes(session: Session, sop_instance_uid: str) -> str:
    """The kept dataset of an MPPS as DICOM JSON: its N-CREATE attributes with every N-SET
    modification applied (what an N-GET of the MPPS Retrieve SOP Class reads)."""
    row = session.execute(select(MPPSTracking.attributes_json).where(
        MPPSTracking.sop_instance_uid == sop_instance_uid)).one_or_none()
    if row is None:
        raise MppsError(NO_SUCH_SOP_INSTANCE, f"no MPPS {sop_instance_uid}")
    if row.attributes_json is None:
        raise MppsError(PROCESSING_FAILURE, "the dataset of this MPPS could not be kept")
    return row.attributes_json


# The DICOM attributes the request's values came from, to name them in a refusal.
_KEYWORDS = {"sop_instance_uid": "AffectedSOPInstanceUID",
             "performed_station_ae_title": "PerformedStationAETitle",
             "calling_ae_title": "calling AE title", "accession_number": "AccessionNumber",
             "study_instance_uid": "StudyInstanceUID",
             "requested_procedure_id": "RequestedProcedureID",
             "sps_id": "ScheduledProcedureStepID", "status": "PerformedProcedureStepStatus"}


def _refuse_nul(request: MppsCreate | MppsSet) -> None:
    """A NUL in a value the broker stores in a column or looks an item up by (broker.db_text):
    0x0106 names it. The rest of the dataset is kept as JSON, where a NUL is an escape."""
    name = field_with_nul(request, *getattr(request, "steps", ()))
    if name is not None:
        raise MppsError(INVALID_ATTRIBUTE_VALUE,
                        f"{_KEYWORDS.get(name, name)} holds a NUL character (0x00)")


def record_mpps_create(session: Session, request: MppsCreate,
                       policy: StatusReporting = DEFAULT_REPORTING, *,
                       forward_to: Sequence[MppsDestination] = ()) -> MppsResult:
    """N-CREATE: a procedure step has started on a modality; ``forward_to`` get a copy."""
    _refuse_nul(request)
    if request.status != MppsStatus.IN_PROGRESS:
        raise MppsError(INVALID_ATTRIBUTE_VALUE,
                        f"PerformedProcedureStepStatus must be IN PROGRESS on N-CREATE, "
                        f"not {request.status!r}")
    exists = session.scalars(select(MPPSTracking.id).where(
        MPPSTracking.sop_instance_uid == request.sop_instance_uid)).first()
    if exists is not None:
        raise MppsError(DUPLICATE_SOP_INSTANCE,
                        f"MPPS {request.sop_instance_uid} already exists")
    items = _linked_items(session, request.steps)
    # One clock reading for both: the timeline shows an N-SET wherever the record was
    # updated after its creation, and two defaults taken in turn differed by microseconds.
    now = utcnow()
    record = MPPSTracking(
        created_at=now,
        updated_at=now,
        sop_instance_uid=request.sop_instance_uid,
        items=items,
        status=MppsStatus.IN_PROGRESS,
        start_datetime=request.start,
        performed_station_ae_title=request.performed_station_ae_title,
        calling_ae_title=request.calling_ae_title,
        attributes_json=request.attributes_json,
    )
    session.add(record)
    for item in items:
        if item.status == ItemStatus.IN_PROGRESS:
            continue  # append case: the RIS already knows the step is under way
        if _completed_by_its_study(session, item):
            continue
        _report(session, policy, record, MppsStatus.IN_PROGRESS, item)
    if not items:
        report_mpps(session, policy, record, MppsStatus.IN_PROGRESS, None)
    mpps_forward.enqueue(session, forward_to, request.sop_instance_uid,
                         MppsForwardOperation.CREATE, request.attributes_json)
    session.flush()
    accessions = tuple(item.accession_number for item in items)
    if not items:
        log.warning("MPPS %s matches no scheduled item (unscheduled procedure) calling_ae=%s",
                    request.sop_instance_uid, request.calling_ae_title)
    log.info("MPPS created uid=%s accessions=%s", request.sop_instance_uid, ",".join(accessions))
    return MppsResult(request.sop_instance_uid, MppsStatus.IN_PROGRESS, accessions)


def record_mpps_set(session: Session, request: MppsSet,
                    policy: StatusReporting = DEFAULT_REPORTING, *,
                    forward_to: Sequence[MppsDestination] = ()) -> MppsResult:
    """N-SET: attributes changed, and possibly the step completed or was discontinued;
    ``forward_to`` get a copy."""
    _refuse_nul(request)
    record = session.scalars(select(MPPSTracking).where(
        MPPSTracking.sop_instance_uid == request.sop_instance_uid)).one_or_none()
    if record is None:
        raise MppsError(NO_SUCH_SOP_INSTANCE, f"no MPPS {request.sop_instance_uid}")
    if record.status != MppsStatus.IN_PROGRESS:
        # PS3.4 F.7.2.2: once COMPLETED or DISCONTINUED the instance may no longer be updated;
        # the failure carries Error ID A710H with that text.
        raise MppsError(PROCESSING_FAILURE,
                        "Performed Procedure Step Object may no longer be updated",
                        error_id=NO_LONGER_UPDATABLE)
    new_status = MppsStatus.IN_PROGRESS
    if request.status is not None:
        try:
            new_status = MppsStatus(request.status)
        except ValueError:
            raise MppsError(INVALID_ATTRIBUTE_VALUE,
                            f"PerformedProcedureStepStatus {request.status!r} is not "
                            "IN PROGRESS, COMPLETED or DISCONTINUED") from None
    if request.attributes_json is not None:
        record.attributes_json = _merged_json(record.attributes_json, request.attributes_json)
    if request.end is not None:
        record.end_datetime = request.end
    if new_status is not MppsStatus.IN_PROGRESS and record.end_datetime is None:
        # PS3.4 F.7.2.2 table F.7.2-1, "Final State" column: a step may only be completed or
        # discontinued with its end date and time.
        raise MppsError(PROCESSING_FAILURE, "PerformedProcedureStepEndDate and EndTime are "
                        f"required to set {new_status}")
    accessions = tuple(item.accession_number for item in record.items)
    if new_status is not MppsStatus.IN_PROGRESS:
        record.status = new_status
        for item in record.items:
            if _other_steps_in_progress(item, record):
                # Append case: the step is done only when its last MPPS is.
                continue
            if _completed_by_its_study(session, item):
                continue
            _report(session, policy, record, new_status, item)
        if not record.items:
            report_mpps(session, policy, record, new_status, None)
    mpps_forward.enqueue(session, forward_to, record.sop_instance_uid,
                         MppsForwardOperation.SET, request.attributes_json)
    session.flush()
    log.info("MPPS set uid=%s status=%s accessions=%s", record.sop_instance_uid, new_status,
             ",".join(accessions))
    return MppsResult(record.sop_instance_uid, new_status, accessions)
