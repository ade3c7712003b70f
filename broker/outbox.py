"""The outbox: status messages for the RIS, written with the change they report.

Delivery rules kept here, whatever sends the messages:
- per order (accession number) strictly in the order written: a message is deliverable only
  when every earlier message of its order has been sent (or dropped by an administrator);
- after a failure a message waits (exponential backoff) before it is tried again;
- a rejection (AR/CR), or too many negative ACKs, moves it to the dead-letter state
  ``failed`` with the reason, where it stays until an administrator retries or drops it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import uuid

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

from broker import delivery
from broker.delivery import Outcome, RetryPolicy
from broker.domain import StatusEvent
from broker.models import OutboxMessage, OutboxState, utcnow

__all__ = ["Outcome", "RetryPolicy"]  # re-exported: the senders' vocabulary

log = logging.getLogger(__name__)


def new_message_control_id() -> str:
    # 20 characters: the MSH-10 (ST) limit in HL7 v2.3 and v2.4.
    return "WLB" + uuid.uuid4().hex[:17].upper()


def enqueue(session: Session, event: StatusEvent, *, order_key: str | None = None,
            ) -> OutboxMessage:
    """Add a status message to the caller's transaction; it is sent only if that commits.

    Messages with the same ``order_key`` (by default the accession number) are delivered in
    the order written.
    """
    message = OutboxMessage(
        message_control_id=new_message_control_id(),
        accession_number=order_key if order_key is not None else event.accession_number,
        event=event.order_status,
        payload_json=encode_event(event),
        state=OutboxState.PENDING,
        attempts=0,
        negative_acks=0,
    )
    session.add(message)
    return message


_DATETIME_FIELDS = ("event_time", "performed_start", "performed_end")
_EVENT_FIELDS = frozenset(f.name for f in dataclasses.fields(StatusEvent))


def encode_event(event: StatusEvent) -> str:
    data = {key: value for key, value in dataclasses.asdict(event).items() if value is not None}
    for name in _DATETIME_FIELDS:
        if name in data:
            data[name] = data[name].isoformat()
    return json.dumps(data, sort_keys=True)


def decode_event(payload_json: str) -> StatusEvent:
    # Keys this version does not know (written by a newer one) are left out, not fatal.
    data = {key: value for key, value in json.loads(payload_json).items()
            if key in _EVENT_FIELDS}
    for name in _DATETIME_FIELDS:
        if data.get(name):
            data[name] = dt.datetime.fromisoformat(data[name])
    return StatusEvent(**data)


def deliverable(session: Session, limit: int, now: dt.datetime | None = None,
                ) -> list[OutboxMessage]:
    """Messages due now, oldest first, leaving out any whose order has an older message that
    is not sent and not due (dead-lettered, or waiting out a backoff).

    An older message that is due comes earlier in the same list, so the caller sends them in
    order, and must hold back the rest of an order whose message just failed.
    """
    now = now or utcnow()
    earlier = aliased(OutboxMessage)
    blocked = exists().where(earlier.accession_number == OutboxMessage.accession_number,
                             earlier.id < OutboxMessage.id,
                             earlier.state != OutboxState.SENT,
                             ~delivery.due(earlier, now))
    query = (select(OutboxMessage)
             .where(delivery.due(OutboxMessage, now), ~blocked)
             .order_by(OutboxMessage.id)
             .limit(limit))
    return list(session.scalars(query))


def mark_sent(session: Session, message_id: int) -> None:
    delivery.mark_sent(session, OutboxMessage, message_id)


def record_failure(session: Session, message_id: int, error: str, *,
                   outcome: str = Outcome.UNREACHABLE, policy: RetryPolicy | None = None,
                   now: dt.datetime | None = None) -> str:
    """Count a failed attempt and decide what happens next; returns the message's new state."""
    state, message = delivery.record_failure(session, OutboxMessage, message_id, error,
                                             outcome=outcome, policy=policy or RetryPolicy(),
                                             now=now)
    if message is not None and state == OutboxState.FAILED:
        log.error("status message dead-lettered msh10=%s accession=%s after %d attempts: %s",
                  message.message_control_id, message.accession_number, message.attempts,
                  error)
    return state


def list_messages(session: Session, state: str | None = None, limit: int = 100,
                  ) -> list[OutboxMessage]:
    return delivery.list_rows(session, OutboxMessage, state, limit)


def retry(session: Session, message_id: int | None = None) -> int:
    """Put one dead-lettered message (or, with None, all of them) back to be sent now."""
    return delivery.retry(session, OutboxMessage, message_id)


def drop(session: Session, message_id: int) -> OutboxMessage | None:
    """Delete an unsent message for good, unblocking later messages of its order."""
    message = delivery.drop(session, OutboxMessage, message_id)
    if message is not None:
        log.warning("status message dropped by an administrator msh10=%s accession=%s "
                    "event=%s", message.message_control_id, message.accession_number,
                    message.event)
    return message
