"""record_study_arrival: what a stable study in the PACS does to the worklist, and the
position in the PACS's change feed, both in the caller's transaction.

A PACS that reports its stable studies (Orthanc's change feed) completes the orders of
modalities that never send MPPS, as Orthanc's Worklists plugin does with
``DeleteWorklistsOnStableStudy`` and dcm4chee-arc with its procedure status update.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import Session

from broker.domain import (
    DEFAULT_REPORTING,
    ItemStatus,
    StatusKind,
    StatusReporting,
    StudyAction,
    StudyArrival,
    StudyResult,
)
from broker.errors import BrokerError
from broker.models import FeedCursor, Patient, StudyRecord, WorklistItem
from broker.status_events import report_study

log = logging.getLogger(__name__)

# StudyRecord.action values.
COMPLETED, HIDDEN, NONE, UNCHANGED = "completed", "hidden", "none", "unchanged"
_OPEN = (ItemStatus.SCHEDULED, ItemStatus.IN_PROGRESS)


class FeedMoved(BrokerError):
    """Another broker advanced the change feed cursor first; this one's work is rolled back."""


def match_study(session: Session, study: StudyArrival,
                ) -> tuple[list[WorklistItem], str | None]:
    """The items a study is the performance of: by Study Instance UID (every step of the
    requested procedure), else by accession number with the same patient ID (a modality that
    made its own Study Instance UID)."""
    if study.study_instance_uid:
        items = list(session.scalars(select(WorklistItem).where(
            WorklistItem.study_instance_uid == study.study_instance_uid)
            .order_by(WorklistItem.id)))
        if items:
            return items, "study_uid"
    if study.accession_number and study.patient_id:
        items = list(session.scalars(
            select(WorklistItem).join(Patient)
            .where(WorklistItem.accession_number == study.accession_number,
                   Patient.patient_id == study.patient_id)))
        if items:
            return items, "accession"
    return [], None


def _fill(record: StudyRecord, study: StudyArrival) -> None:
    record.study_instance_uid = study.study_instance_uid
    record.accession_number = study.accession_number
    record.patient_id = study.patient_id
    record.patient_name = study.patient_name
    record.modalities = "\\".join(study.modalities)[:64] or None
    record.number_of_series = study.number_of_series
    record.number_of_instances = study.number_of_instances
    record.performed_at = study.performed_at
    record.study_description = study.study_description


def _apply(session: Session, item: WorklistItem, study: StudyArrival, on_study: StudyAction,
           policy: StatusReporting) -> str:
    if on_study is StudyAction.NONE:
        return NONE
    if item.status not in _OPEN:
        # Already finished (an MPPS COMPLETED told the RIS), cancelled or held: the study
        # changes nothing, and nothing is sent twice.
        return UNCHANGED
    item.status = ItemStatus.COMPLETED
    if on_study is StudyAction.HIDE:
        return HIDDEN
    report_study(session, policy, item, study, StatusKind.COMPLETED)
    return COMPLETED


def record_study_arrival(session: Session, study: StudyArrival, *,
                         on_study: StudyAction = StudyAction.COMPLETE,
                         policy: StatusReporting = DEFAULT_REPORTING) -> StudyResult:
    """A stable study: record it, and complete (or hide) the items it matches.

    Orthanc reports a study stable again when instances are added later: the record's
    counts follow, and nothing is done twice. A study that matched nothing is tried again
    then (the order may have come after the images).
    """
    known = list(session.scalars(select(StudyRecord).where(
        StudyRecord.source == study.source, StudyRecord.source_id == study.source_id)
        .order_by(StudyRecord.id)))
    for record in known:
        _fill(record, study)
    # matched_by, not item_fk: a purged item leaves its study record matched.
    linked = [record for record in known if record.matched_by is not None]
    if linked:
        session.flush()
        return StudyResult(tuple(r.item.accession_number for r in linked if r.item), (),
                           linked[0].matched_by, repeated=True)
    items, matched_by = match_study(session, study)
    if not items:
        if not known:
            record = StudyRecord(source=study.source, source_id=study.source_id)
            _fill(record, study)
            session.add(record)
            log.warning("study %s from %s matches no worklist item (accession=%s); listed by "
                        "'worklist-broker studies list --unmatched'", study.study_instance_uid,
                        study.source, study.accession_number or "-")
        session.flush()
        return StudyResult(repeated=bool(known))
    spare = known[0] if known else None
    changed = []
    for item in items:
        action = _apply(session, item, study, on_study, policy)
        if action in (COMPLETED, HIDDEN):
            changed.append(item.accession_number)
        record, spare = spare or StudyRecord(source=study.source, source_id=study.source_id), None
        _fill(record, study)
        record.item = item
        record.matched_by = matched_by
        record.action = action
        session.add(record)
        report_study(session, policy, item, study, StatusKind.STUDY_RECEIVED)
    session.flush()
    accessions = tuple(item.accession_number for item in items)
    log.info("study %s matched by %s accessions=%s %s", study.study_instance_uid, matched_by,
             ",".join(accessions),
             f"{HIDDEN if on_study is StudyAction.HIDE else COMPLETED}: {','.join(changed)}"
             if changed else "(no change)")
    return StudyResult(accessions, tuple(changed), matched_by, repeated=bool(known))


def completed_by_study(session: Session, item: WorklistItem) -> bool:
    """Whether a study's arrival completed ``item`` and told the RIS so (an MPPS COMPLETED
    arriving afterwards must not send the completion a second time)."""
    return bool(session.scalar(select(exists().where(
        StudyRecord.item_fk == item.id, StudyRecord.action == COMPLETED))))


def feed_position(session: Session, source: str) -> int | None:
    """How far the change feed of ``source`` has been handled; None if never followed."""
    return session.scalar(select(FeedCursor.position).where(FeedCursor.source == source))


def start_feed(session: Session, source: str, position: int) -> None:
    """Begin following ``source`` at ``position`` (the caller checked it had no cursor)."""
    session.add(FeedCursor(source=source, position=position))
    session.flush()


def advance_feed(session: Session, source: str, old: int, new: int) -> None:
    """Move the cursor from ``old`` to ``new``, in the transaction of what the changes caused.

    Compare-and-set: if another broker moved it meanwhile, raise FeedMoved so the caller's
    transaction (and the changes it recorded) rolls back instead of counting them twice.
    """
    moved = session.execute(update(FeedCursor).where(
        FeedCursor.source == source, FeedCursor.position == old).values(position=new)).rowcount
    if moved != 1:
        raise FeedMoved(f"the change feed cursor of {source} is no longer at {old}")


def list_studies(session: Session, *, unmatched: bool = False, limit: int = 100,
                 ) -> Sequence[StudyRecord]:
    """Recorded studies, newest first; ``unmatched`` only those that matched no item."""
    query = select(StudyRecord).order_by(StudyRecord.id.desc()).limit(limit)
    if unmatched:
        query = query.where(StudyRecord.matched_by.is_(None))
    return list(session.scalars(query))


def count_unmatched(session: Session) -> int:
    return session.scalar(select(func.count(StudyRecord.id)).where(
        StudyRecord.matched_by.is_(None))) or 0


def studies_for_accession(session: Session, accession_number: str) -> Sequence[StudyRecord]:
    """The studies recorded for an order, oldest first (the order timeline reads these): those
    matched to its item, and unmatched ones carrying its accession number."""
    item_ids = select(WorklistItem.id).where(WorklistItem.accession_number == accession_number)
    return list(session.scalars(select(StudyRecord).where(or_(
        StudyRecord.item_fk.in_(item_ids),
        StudyRecord.matched_by.is_(None) & (StudyRecord.accession_number == accession_number)))
        .order_by(StudyRecord.received_at, StudyRecord.id)))
