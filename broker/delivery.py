"""The state machine shared by the broker's durable delivery queues (the RIS outbox, the MPPS
forwards): pending -> sent, or failed (dead letter) with the reason.

- After a failure a row waits (exponential backoff) before it is tried again.
- Only refusals (a negative answer) count towards ``max_attempts``; an unreachable peer
  merely delays, however long it is down. A rejection dead-letters at once.
- A dead letter stays until an administrator retries or drops it.

Each queue keeps its own ordering rule and names its refusal counter (``REFUSALS``).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import ColumnElement, and_, delete, or_, select, update
from sqlalchemy.orm import Session

from broker.models import MppsForward, OutboxMessage, OutboxState, utcnow

log = logging.getLogger(__name__)

Row = TypeVar("Row", OutboxMessage, MppsForward)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_seconds: float = 5
    max_seconds: float = 600
    max_attempts: int = 10

    def delay(self, failures: int) -> dt.timedelta:
        exponent = min(max(failures - 1, 0), 30)
        return dt.timedelta(seconds=min(self.initial_seconds * 2**exponent, self.max_seconds))


class Outcome:
    """How one delivery attempt ended, as the sender saw it."""

    UNREACHABLE = "unreachable"  # no connection or no reply: retry, never dead-letter
    NEGATIVE = "negative"  # a negative answer: retry, up to max_attempts
    REJECTED = "rejected"  # a permanent refusal: dead-letter at once


def due(model: type[Row], now: dt.datetime) -> ColumnElement[bool]:
    return and_(model.state == OutboxState.PENDING,
                or_(model.next_attempt_at.is_(None), model.next_attempt_at <= now))


def mark_sent(session: Session, model: type[Row], row_id: int) -> None:
    row = session.get(model, row_id)
    if row is not None:
        row.state = OutboxState.SENT
        row.attempts += 1
        row.sent_at = utcnow()
        row.next_attempt_at = None
        row.last_error = None


def record_failure(session: Session, model: type[Row], row_id: int, error: str, *,
                   outcome: str, policy: RetryPolicy, now: dt.datetime | None = None,
                   ) -> tuple[str, Row | None]:
    """Count a failed attempt and decide what happens next: the row's new state, and the
    row (None if it no longer exists), for the caller's log line."""
    row = session.get(model, row_id)
    if row is None:
        return OutboxState.FAILED, None
    row.attempts += 1
    row.last_error = error[:2000]
    refusals = getattr(row, model.REFUSALS)
    if outcome != Outcome.UNREACHABLE:
        refusals += 1
        setattr(row, model.REFUSALS, refusals)
    if outcome == Outcome.REJECTED or refusals >= policy.max_attempts:
        row.state = OutboxState.FAILED
        row.next_attempt_at = None
    else:
        row.next_attempt_at = (now or utcnow()) + policy.delay(row.attempts)
    return row.state, row


def list_rows(session: Session, model: type[Row], state: str | None, limit: int,
              ) -> list[Row]:
    query = select(model).order_by(model.id.desc()).limit(limit)
    if state is not None:
        query = query.where(model.state == state)
    return list(session.scalars(query))


def retry(session: Session, model: type[Row], row_id: int | None) -> int:
    """Put one dead letter (or, with None, all of them) back to be sent now."""
    query = (update(model).where(model.state == OutboxState.FAILED)
             .values({"state": OutboxState.PENDING, model.REFUSALS: 0,
                      "next_attempt_at": None}))
    if row_id is not None:
        query = query.where(model.id == row_id)
    return session.execute(query).rowcount


def drop(session: Session, model: type[Row], row_id: int) -> Row | None:
    """Delete an unsent row for good (unblocking the rows queued behind it); a sent row is
    history and is not dropped."""
    row = session.get(model, row_id)
    if row is None or row.state == OutboxState.SENT:
        return None
    session.execute(delete(model).where(model.id == row_id))
    return row
