"""The inbound message log: what the RIS sent, raw, and what the broker answered."""

from __future__ import annotations

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from broker.models import InboundMessage, InboundOutcome, utcnow


def accepted_ack(session: Session, sender: str, control_id: str) -> bytes | None:
    """The ACK already sent for an accepted message with this MSH-10 from this sender."""
    if not control_id:
        return None
    return session.scalars(
        select(InboundMessage.ack)
        .where(InboundMessage.sender == sender, InboundMessage.control_id == control_id,
               InboundMessage.outcome == InboundOutcome.ACCEPTED)
        .order_by(InboundMessage.id.desc()).limit(1)).first()


def record(session: Session, *, sender: str, control_id: str, message_type: str,
           accession_number: str | None, outcome: str, ack_code: str, reason: str | None,
           raw: bytes, ack: bytes) -> InboundMessage:
    entry = InboundMessage(sender=sender[:200], control_id=control_id[:200],
                           message_type=message_type[:20],
                           accession_number=(accession_number or None) and accession_number[:16],
                           outcome=outcome, ack_code=ack_code, reason=reason, raw=raw, ack=ack)
    session.add(entry)
    return entry


# Built once, on the table rather than the entity: every accepted message runs it, and an
# ORM-enabled insert with inline values re-derives its cache key on each call.
_INSERT_ACCEPTED = insert(InboundMessage.__table__)


def record_accepted(session: Session, *, sender: str, control_id: str, message_type: str,
                    accession_number: str | None, raw: bytes, ack: bytes) -> None:
    """Log an accepted message, at once (a plain INSERT, not the ORM's unit of work): a resend
    of an accepted MSH-10 from the same sender fails here on the unique index."""
    session.execute(_INSERT_ACCEPTED, {
        "received_at": utcnow(), "sender": sender[:200], "control_id": control_id[:200],
        "message_type": message_type[:20],
        "accession_number": (accession_number or None) and accession_number[:16],
        "outcome": InboundOutcome.ACCEPTED, "ack_code": "AA", "reason": None, "raw": raw,
        "ack": ack})


def list_messages(session: Session, *, failed_only: bool = False, limit: int = 100,
                  ) -> list[InboundMessage]:
    query = select(InboundMessage).order_by(InboundMessage.id.desc()).limit(limit)
    if failed_only:
        query = query.where(InboundMessage.outcome != InboundOutcome.ACCEPTED)
    return list(session.scalars(query))


def get(session: Session, message_id: int) -> InboundMessage | None:
    return session.get(InboundMessage, message_id)
