"""The MPPS forward queue: copies of accepted N-CREATE / N-SET owed to downstream MPPS SCPs.

Rules kept here, whatever sends the rows (``broker.dicom.mpps_forwarder``):
- ``record_mpps_create`` / ``record_mpps_set`` enqueue one row per configured destination in
  the transaction of the MPPS change: a crash loses none, a refused change forwards nothing;
- per destination and MPPS instance strictly in the order written: a row is deliverable only
  when every earlier row of its instance to that destination has been sent (or dropped), so
  an N-SET never overtakes its N-CREATE, and waits while that N-CREATE keeps failing;
- after a failure a row waits (exponential backoff, ``outbox.RetryPolicy``); failure statuses
  count towards ``max_attempts``, then the row is dead-lettered (``failed``) with the reason;
  an unreachable peer only delays; a permanent refusal dead-letters at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

from broker import delivery
from broker.config import MppsDestination
from broker.delivery import RetryPolicy
from broker.models import MppsForward, OutboxState, utcnow
from broker.store import Store

log = logging.getLogger(__name__)


def enqueue(session: Session, destinations: Sequence[MppsDestination], sop_instance_uid: str,
            operation: str, dataset_json: str | None) -> None:
    """Add the forwards of one MPPS change to the caller's transaction."""
    for destination in destinations:
        session.add(MppsForward(destination=destination.key, sop_instance_uid=sop_instance_uid,
                                operation=operation, dataset_json=dataset_json,
                                state=OutboxState.PENDING, attempts=0, refusals=0))


def deliverable(session: Session, destination: str, limit: int,
                now: dt.datetime | None = None) -> list[MppsForward]:
    """Rows for one destination due now, oldest first, leaving out any whose instance has an
    older row to that destination that is neither sent nor due (dead-lettered, or waiting out
    a backoff).

    An older row that is due comes earlier in the same list: the caller sends in list order
    and holds back the rest of an instance whose row just failed.
    """
    now = now or utcnow()
    earlier = aliased(MppsForward)
    blocked = exists().where(earlier.destination == MppsForward.destination,
                             earlier.sop_instance_uid == MppsForward.sop_instance_uid,
                             earlier.id < MppsForward.id,
                             earlier.state != OutboxState.SENT,
                             ~delivery.due(earlier, now))
    query = (select(MppsForward)
             .where(MppsForward.destination == destination, delivery.due(MppsForward, now),
                    ~blocked)
             .order_by(MppsForward.id)
             .limit(limit))
    return list(session.scalars(query))


def mark_sent(session: Session, forward_id: int) -> None:
    delivery.mark_sent(session, MppsForward, forward_id)


def record_failure(session: Session, forward_id: int, error: str, *, outcome: str,
                   policy: RetryPolicy, now: dt.datetime | None = None) -> str:
    """Count a failed attempt and decide what happens next; returns the row's new state."""
    state, row = delivery.record_failure(session, MppsForward, forward_id, error,
                                         outcome=outcome, policy=policy, now=now)
    if row is not None and state == OutboxState.FAILED:
        log.error("MPPS forward dead-lettered id=%d uid=%s %s to %s after %d attempts: %s",
                  row.id, row.sop_instance_uid, row.operation, row.destination, row.attempts,
                  error)
    return state


def list_forwards(session: Session, state: str | None = None, limit: int = 100,
                  ) -> list[MppsForward]:
    return delivery.list_rows(session, MppsForward, state, limit)


def retry(session: Session, forward_id: int | None = None) -> int:
    """Put one dead-lettered row (or, with None, all of them) back to be sent now."""
    return delivery.retry(session, MppsForward, forward_id)


def drop(session: Session, forward_id: int) -> MppsForward | None:
    """Delete an unsent row for good, unblocking the later rows of its instance."""
    row = delivery.drop(session, MppsForward, forward_id)
    if row is not None:
        log.warning("MPPS forward dropped by an administrator id=%d uid=%s %s to %s", row.id,
                    row.sop_instance_uid, row.operation, row.destination)
    return row


@contextmanager
def destination_lock(store: Store, destination: str) -> Iterator[bool]:
    """Whether this process may deliver to ``destination`` now: several brokers may share
    the queue, and one sender per destination keeps each instance's rows in order."""
    with store.exclusive(f"mpps-forward-{destination}") as mine:
        yield mine
