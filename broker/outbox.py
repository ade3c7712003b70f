"""The outbox: status messages for the RIS, written with the change they report."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.domain import StatusEvent
from broker.models import OutboxMessage, OutboxState, utcnow


def new_message_control_id() -> str:
    # 20 characters: the MSH-10 (ST) limit in HL7 v2.3 and v2.4.
    return "WLB" + uuid.uuid4().hex[:17].upper()


def enqueue(session: Session, event: StatusEvent) -> OutboxMessage:
    """Add a status message to the caller's transaction; it is sent only if that commits."""
    message = OutboxMessage(
        message_control_id=new_message_control_id(),
        accession_number=event.accession_number,
        event=event.order_status,
        payload_json=encode_event(event),
        state=OutboxState.PENDING,
        attempts=0,
    )
    session.add(message)
    return message


def encode_event(event: StatusEvent) -> str:
    data = dataclasses.asdict(event)
    if event.event_time is not None:
        data["event_time"] = event.event_time.isoformat()
    return json.dumps(data, sort_keys=True)


def decode_event(payload_json: str) -> StatusEvent:
    data = json.loads(payload_json)
    if data.get("event_time"):
        data["event_time"] = dt.datetime.fromisoformat(data["event_time"])
    return StatusEvent(**data)


def pending(session: Session, limit: int) -> list[OutboxMessage]:
    """The oldest unsent messages, in the order they were written (IP before CM per order)."""
    query = (select(OutboxMessage)
             .where(OutboxMessage.state == OutboxState.PENDING)
             .order_by(OutboxMessage.id)
             .limit(limit))
    return list(session.scalars(query))


def mark_sent(session: Session, message_id: int) -> None:
    message = session.get(OutboxMessage, message_id)
    if message is not None:
        message.state = OutboxState.SENT
        message.attempts += 1
        message.sent_at = utcnow()
        message.last_error = None


def record_failure(session: Session, message_id: int, error: str) -> None:
    """Count a failed attempt; the message stays pending and is retried on the next run."""
    message = session.get(OutboxMessage, message_id)
    if message is not None:
        message.attempts += 1
        message.last_error = error[:2000]
