"""purge: delete what the retention rules say is no longer needed, in short batches."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import delete, func, select

from broker.models import MPPSTracking, OutboxMessage, OutboxState, Patient, WorklistItem, utcnow
from broker.store import Store

log = logging.getLogger(__name__)

# Small batches keep each write transaction short, so C-FIND readers and incoming orders
# never wait long behind a purge (SQLite has one writer at a time).
BATCH_SIZE = 500


@dataclass(frozen=True, slots=True)
class PurgeResult:
    worklist_items: int = 0
    mpps: int = 0
    patients: int = 0
    outbox: int = 0


def _expired_item_ids(store: Store, cutoff: dt.datetime) -> list[int]:
    with store.reading() as session:
        return list(session.scalars(
            select(WorklistItem.id).where(WorklistItem.scheduled_start < cutoff)
            .order_by(WorklistItem.id).limit(BATCH_SIZE)))


def purge(store: Store, *, retention_days: int, now: dt.datetime | None = None,
          dry_run: bool = False) -> PurgeResult:
    """Delete items scheduled before ``now - retention_days`` with their MPPS records, patients
    left without items, and outbox messages already sent before the cutoff."""
    cutoff = (now or utcnow()) - dt.timedelta(days=retention_days)
    if dry_run:
        return _count(store, cutoff)
    items = mpps = patients = sent = 0
    for _ in range(1_000_000):  # bounded: each pass removes up to BATCH_SIZE items
        ids = _expired_item_ids(store, cutoff)
        if not ids:
            break
        with store.writing() as session:
            mpps += session.execute(
                delete(MPPSTracking).where(MPPSTracking.worklist_item_fk.in_(ids))).rowcount
            items += session.execute(
                delete(WorklistItem).where(WorklistItem.id.in_(ids))).rowcount
    with store.writing() as session:
        orphans = select(Patient.id).where(~Patient.items.any())
        patients = session.execute(delete(Patient).where(Patient.id.in_(orphans))).rowcount
        sent = session.execute(delete(OutboxMessage).where(
            OutboxMessage.state == OutboxState.SENT, OutboxMessage.sent_at < cutoff)).rowcount
    result = PurgeResult(items, mpps, patients, sent)
    log.info("purge cutoff=%s items=%d mpps=%d patients=%d outbox=%d", cutoff.isoformat(),
             items, mpps, patients, sent)
    return result


def _count(store: Store, cutoff: dt.datetime) -> PurgeResult:
    with store.reading() as session:
        expired = select(WorklistItem.id).where(WorklistItem.scheduled_start < cutoff)
        items = session.scalar(select(func.count()).select_from(expired.subquery())) or 0
        mpps = session.scalar(select(func.count(MPPSTracking.id)).where(
            MPPSTracking.worklist_item_fk.in_(expired))) or 0
        sent = session.scalar(select(func.count(OutboxMessage.id)).where(
            OutboxMessage.state == OutboxState.SENT, OutboxMessage.sent_at < cutoff)) or 0
    return PurgeResult(items, mpps, 0, sent)
