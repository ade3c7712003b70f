"""purge: delete what the retention rules say is no longer needed, in short batches.

Items age by their scheduled start (their creation time when the RIS sent none). Each item's
MPPS records and C-FIND exposure go with it, and a "purge" operator action is written in its
place for the order's timeline; MPPS records that match no order, sent status messages, sent MPPS
forwards (with the status messages' retention) and patients left without items age on their
own. Pending and dead-lettered status messages and forwards are never purged: they are work
still owed to the RIS or a downstream MPPS SCP.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Integer,
    Select,
    and_,
    any_,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.orm import Session

from broker import audit, cfind_log, metrics
from broker.domain import ItemStatus
from broker.models import (
    AuditEvent,
    CFindExposure,
    InboundMessage,
    MppsForward,
    MPPSItemLink,
    MPPSTracking,
    OutboxMessage,
    OutboxState,
    Patient,
    StudyRecord,
    WorklistItem,
    utcnow,
)
from broker.operator_actions import record_purged
from broker.store import Store

log = logging.getLogger(__name__)

# Small batches keep each write transaction short, so C-FIND readers and incoming orders
# never wait long behind a purge (SQLite has one writer at a time).
BATCH_SIZE = 500
ROUND_SIZE = 50_000  # ids read at once, then deleted batch by batch
_MAX_ROUNDS = 1_000  # bounds every loop: 50 million rows per run at most
_MAX_BATCHES = 100_000  # the same bound where rows are deleted batch by batch directly


@dataclass(frozen=True, slots=True)
class Retention:
    completed_days: int = 30
    cancelled_days: int = 30
    unperformed_days: int = 30
    mpps_days: int = 30
    outbox_days: int = 30
    inbound_log_days: int = 30
    audit_days: int = 365


@dataclass(frozen=True, slots=True)
class PurgeResult:
    worklist_items: int = 0
    mpps: int = 0
    patients: int = 0
    outbox: int = 0
    inbound_messages: int = 0
    mpps_forwards: int = 0
    studies: int = 0  # study records (broker.studies) without an item, as unlinked MPPS
    audit_events: int = 0  # audit trail events (broker.audit), by their own retention
    skipped: bool = False  # another process holds the purge lock
    stopped: bool = False  # asked to stop (the broker is stopping): the rest is left for later

    def summary(self) -> str:
        """What went, in one line (the purge command's output, the purge job's log)."""
        return (f"{self.worklist_items} worklist items, {self.mpps} MPPS records, "
                f"{self.patients} patients, {self.outbox} sent status messages, "
                f"{self.inbound_messages} logged HL7 messages, {self.mpps_forwards} forwarded "
                f"MPPS copies, {self.studies} recorded studies, {self.audit_events} audit events")


_FINISHED = (ItemStatus.COMPLETED, ItemStatus.DISCONTINUED)
_UNPERFORMED = (ItemStatus.SCHEDULED, ItemStatus.IN_PROGRESS)


def _expired_items(retention: Retention, now: dt.datetime) -> ColumnElement[bool]:
    age = func.coalesce(WorklistItem.scheduled_start, WorklistItem.created_at)

    def older(days: int) -> ColumnElement[bool]:
        return age < now - dt.timedelta(days=days)

    return or_(
        and_(WorklistItem.status.in_(_FINISHED), older(retention.completed_days)),
        and_(WorklistItem.status == ItemStatus.CANCELLED, older(retention.cancelled_days)),
        and_(WorklistItem.status.in_(_UNPERFORMED), older(retention.unperformed_days)),
    )


def _unlinked_mpps(retention: Retention, now: dt.datetime) -> ColumnElement[bool]:
    return (~MPPSTracking.items.any()
            & (MPPSTracking.created_at < now - dt.timedelta(days=retention.mpps_days)))


def _among(session: Session, column: ColumnElement[int], ids: list[int]) -> ColumnElement[bool]:
    """``column IN (ids)``; on PostgreSQL ``column = ANY(:ids)``, one array parameter.

    psycopg parses a statement with 500 parameters anew on every execution (about 2.5 ms of
    the purge's CPU each, six statements a batch), time the C-FINDs wait for on a small
    machine.
    """
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(ids, ARRAY(Integer)))
    return column.in_(ids)


def _mpps_only_of(among: Callable[[ColumnElement[int]], ColumnElement[bool]]
                  ) -> ColumnElement[bool]:
    """MPPS records linked to the items ``among`` picks out, and to no other item.

    Driven from the link table's item index: a test on every MPPS record (``items.any``)
    read the whole MPPS table once per batch, and a site keeps about one record per item.
    """
    linked = select(MPPSItemLink.mpps_fk).where(among(MPPSItemLink.item_fk))
    elsewhere = exists().where(MPPSItemLink.mpps_fk == MPPSTracking.id,
                               ~among(MPPSItemLink.item_fk))
    return MPPSTracking.id.in_(linked) & ~elsewhere


def _orphan_studies(retention: Retention, now: dt.datetime) -> ColumnElement[bool]:
    # Matched ones lose their item to the purge above (SET NULL); unmatched ones never had one.
    return (StudyRecord.item_fk.is_(None)
            & (StudyRecord.received_at < now - dt.timedelta(days=retention.mpps_days)))


def _sent_outbox(retention: Retention, now: dt.datetime) -> ColumnElement[bool]:
    return ((OutboxMessage.state == OutboxState.SENT)
            & (OutboxMessage.sent_at < now - dt.timedelta(days=retention.outbox_days)))


def _sent_forwards(retention: Retention, now: dt.datetime) -> ColumnElement[bool]:
    return ((MppsForward.state == OutboxState.SENT)
            & (MppsForward.sent_at < now - dt.timedelta(days=retention.outbox_days)))


def _orphan_exposure(retention: Retention, now: dt.datetime) -> ColumnElement[bool]:
    return (~exists().where(WorklistItem.accession_number == CFindExposure.accession_number)
            & (CFindExposure.last_at < now - dt.timedelta(days=retention.inbound_log_days)))


DeleteBatch = Callable[[Session, list[int]], int]


def _delete_by_id(model: type[MPPSTracking | Patient | OutboxMessage | InboundMessage
                              | MppsForward | CFindExposure | StudyRecord]) -> DeleteBatch:
    def delete_rows(session: Session, ids: list[int]) -> int:
        return session.execute(delete(model).where(_among(session, model.id, ids))).rowcount
    return delete_rows


def _old_inbound(retention: Retention, now: dt.datetime) -> ColumnElement[bool]:
    return InboundMessage.received_at < now - dt.timedelta(days=retention.inbound_log_days)


def _batched_delete(store: Store, ids: Select[tuple[int]], delete_batch: DeleteBatch,
                    stop: threading.Event) -> int:
    """Delete what ``ids`` selects, BATCH_SIZE rows per short write transaction.

    The ids are read ROUND_SIZE at a time, each round one read of the table: selecting each
    batch anew re-read, on every batch, the rows deleted so far (PostgreSQL keeps them until
    VACUUM), or every row of the statuses concerned (SQLite's plan), and the purge of a year
    at 1,000,000 items took 31-45 s. Each batch is checked again inside its transaction: an
    item the RIS rescheduled meanwhile stays. Stops between two batches once ``stop`` is set.
    """
    key = ids.selected_columns[0]
    total, took = 0, 0.0
    for _ in range(_MAX_ROUNDS):
        if stop.is_set():
            break
        with store.reading() as session:
            found = list(session.scalars(ids.limit(ROUND_SIZE)))
        for start in range(0, len(found), BATCH_SIZE):
            if start and _pause_after(took, stop):
                return total
            began = time.monotonic()
            with store.writing() as session:
                batch = list(session.scalars(
                    ids.where(_among(session, key, found[start:start + BATCH_SIZE]))))
                if batch:
                    total += delete_batch(session, batch)
            took = time.monotonic() - began
        if len(found) < ROUND_SIZE or _pause_after(took, stop):
            break
    return total


def _pause_after(took: float, stop: threading.Event) -> bool:
    """Between two batches, leave the database and the CPU to the broker's work for as long
    as the batch took (50 ms at least, 1 s at most): the purge is background work.

    SQLite has one writer at a time and no queue: a writer that finds the file locked sleeps
    and tries again (within 25 ms in its first 100 ms), and a purge that started its next
    batch at once kept incoming orders waiting up to 9 s (bench/purge_load.py). On
    PostgreSQL the purge and new orders lock different rows, but a purge running flat out
    took a core of two from the C-FINDs. True when ``stop`` was set meanwhile.
    """
    return stop.wait(min(max(took, 0.05), 1.0))


def purge(store: Store, *, retention: Retention, now: dt.datetime | None = None,
          dry_run: bool = False, stop: threading.Event | None = None) -> PurgeResult:
    """Apply the retention rules once; with ``dry_run`` only count what would be deleted.

    ``stop``: set it to end the purge between two batches (a year's backlog takes a minute;
    a broker that is stopping does not wait for it). What is left goes on the next run.
    """
    now = now or utcnow()
    stop = stop or threading.Event()
    items = _expired_items(retention, now)
    if dry_run:
        return _count(store, items, _unlinked_mpps(retention, now), _sent_outbox(retention, now),
                      _old_inbound(retention, now), _sent_forwards(retention, now), retention,
                      now)
    with store.exclusive("purge") as mine:
        if not mine:
            log.info("purge skipped: another broker (or purge command) is purging")
            return PurgeResult(skipped=True)
        started = time.monotonic()
        result = _purge(store, retention, now, items, stop)
    # When the night's purge ran and how long it held the database: a year's backlog takes
    # minutes.
    log.info("purge %s items=%d mpps=%d patients=%d outbox=%d inbound=%d mpps_forwards=%d "
             "studies=%d audit_events=%d seconds=%.1f",
             "stopped early" if result.stopped else "done", result.worklist_items, result.mpps,
             result.patients, result.outbox, result.inbound_messages, result.mpps_forwards,
             result.studies, result.audit_events, time.monotonic() - started)
    metrics.PURGE_RUNS.inc()
    for kind in ("worklist_items", "mpps", "patients", "outbox", "inbound_messages",
                 "mpps_forwards", "audit_events"):
        metrics.PURGE_ROWS.labels(kind).inc(getattr(result, kind))
    return result


def _purge(store: Store, retention: Retention, now: dt.datetime,
           items: ColumnElement[bool], stop: threading.Event) -> PurgeResult:
    mpps_of_items = 0

    def delete_items(session: Session, ids: list[int]) -> int:
        nonlocal mpps_of_items

        def among(column: ColumnElement[int]) -> ColumnElement[bool]:
            return _among(session, column, ids)

        doomed = list(session.scalars(select(MPPSTracking.id).where(_mpps_only_of(among))))
        if doomed:
            mpps_of_items += session.execute(
                delete(MPPSTracking).where(_among(session, MPPSTracking.id, doomed))).rowcount
        session.execute(delete(MPPSItemLink).where(among(MPPSItemLink.item_fk)))
        gone = select(WorklistItem.accession_number).where(among(WorklistItem.id))
        # Who was given the item goes with it; the purge itself shows in the order's
        # timeline, next to the HL7 messages the inbound log may still hold.
        cfind_log.delete_exposures(session, gone)
        record_purged(session, gone, now)
        return session.execute(delete(WorklistItem).where(among(WorklistItem.id))).rowcount

    item_count = _batched_delete(store, select(WorklistItem.id).where(items), delete_items, stop)
    unlinked = select(MPPSTracking.id).where(_unlinked_mpps(retention, now))
    mpps = mpps_of_items + _batched_delete(store, unlinked, _delete_by_id(MPPSTracking), stop)
    patients = _batched_delete(store, select(Patient.id).where(~Patient.items.any()),
                               _delete_by_id(Patient), stop)
    sent = _batched_delete(store, select(OutboxMessage.id).where(_sent_outbox(retention, now)),
                           _delete_by_id(OutboxMessage), stop)
    inbound = _batched_delete(store, select(InboundMessage.id).where(
        _old_inbound(retention, now)), _delete_by_id(InboundMessage), stop)
    forwards = _batched_delete(store, select(MppsForward.id).where(
        _sent_forwards(retention, now)), _delete_by_id(MppsForward), stop)
    # Exposure of items deleted otherwise (a console delete) or recorded just after their
    # purge: kept as long as the inbound log, then swept.
    _batched_delete(store, select(CFindExposure.id).where(_orphan_exposure(retention, now)),
                    _delete_by_id(CFindExposure), stop)
    studies = _batched_delete(store, select(StudyRecord.id).where(
        _orphan_studies(retention, now)), _delete_by_id(StudyRecord), stop)
    audit_events = _purge_audit(store, now - dt.timedelta(days=retention.audit_days), stop)
    return PurgeResult(item_count, mpps, patients, sent, inbound, forwards, studies,
                       audit_events=audit_events, stopped=stop.is_set())


def _purge_audit(store: Store, before: dt.datetime, stop: threading.Event) -> int:
    total = 0
    for _ in range(_MAX_BATCHES):
        if stop.is_set():
            break
        began = time.monotonic()
        with store.writing() as session:
            deleted = audit.delete_older(session, before, limit=BATCH_SIZE)
        total += deleted
        if deleted < BATCH_SIZE:
            break
        if _pause_after(time.monotonic() - began, stop):
            break
    return total


def _count(store: Store, items: ColumnElement[bool], unlinked_mpps: ColumnElement[bool],
           sent: ColumnElement[bool], inbound: ColumnElement[bool],
           sent_forwards: ColumnElement[bool], retention: Retention, now: dt.datetime,
           ) -> PurgeResult:
    expired_ids = select(WorklistItem.id).where(items)
    with store.reading() as session:
        item_count = session.scalar(select(func.count(WorklistItem.id)).where(items)) or 0
        mpps = session.scalar(select(func.count(MPPSTracking.id)).where(
            _mpps_only_of(lambda column: column.in_(expired_ids)) | unlinked_mpps)) or 0
        patients = session.scalar(select(func.count(Patient.id)).where(
            ~Patient.items.any(~WorklistItem.id.in_(expired_ids)))) or 0
        outbox = session.scalar(select(func.count(OutboxMessage.id)).where(sent)) or 0
        old = session.scalar(select(func.count(InboundMessage.id)).where(inbound)) or 0
        forwards = session.scalar(select(func.count(MppsForward.id)).where(sent_forwards)) or 0
        studies = session.scalar(select(func.count(StudyRecord.id)).where(
            (StudyRecord.item_fk.in_(expired_ids) | StudyRecord.item_fk.is_(None))
            & (StudyRecord.received_at < now - dt.timedelta(days=retention.mpps_days)))) or 0
        audit_events = session.scalar(select(func.count(AuditEvent.id)).where(
            AuditEvent.at < now - dt.timedelta(days=retention.audit_days))) or 0
    return PurgeResult(item_count, mpps, patients, outbox, old, forwards, studies,
                       audit_events=audit_events)
