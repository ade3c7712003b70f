"""The inbound message log: what the RIS sent, raw, and what the broker answered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from broker.db_text import storable
from broker.models import InboundMessage, InboundOutcome, utcnow


@dataclass(frozen=True, slots=True)
class Earlier:
    """What the log holds under a sender's MSH-10, accepted messages only."""

    ack: bytes | None  # the ACK of the same message, when this is a resend
    reused: bool  # a different message was accepted under this MSH-10 before


# Built once: every accepted message runs it. No ``outcome`` term, so that the planner takes
# ix_inbound_sender_control (SQLite would otherwise walk every accepted row by outcome).
_UNDER_CONTROL_ID = select(InboundMessage.id, InboundMessage.outcome,
                           InboundMessage.content_digest).where(
    InboundMessage.sender == bindparam("sender"),
    InboundMessage.control_id == bindparam("control_id"))


def earlier(session: Session, sender: str, control_id: str, digest: str,
            digest_of: Callable[[bytes], str]) -> Earlier:
    """Whether this message (by ``digest``) or another one was accepted under its MSH-10.

    Rows kept before digests existed are digested from their raw message (``digest_of``).
    """
    if not control_id:
        return Earlier(None, False)
    rows = session.execute(_UNDER_CONTROL_ID, {"sender": sender[:200],
                                               "control_id": control_id[:200]}).all()
    reused = False
    for row_id, outcome, stored in rows:
        if outcome != InboundOutcome.ACCEPTED:
            continue
        if stored is None:
            stored = digest_of(session.get_one(InboundMessage, row_id).raw)
        if stored == digest:
            return Earlier(session.get_one(InboundMessage, row_id).ack, False)
        reused = True
    return Earlier(None, reused)


def record(session: Session, *, sender: str, control_id: str, message_type: str,
           accession_number: str | None, outcome: str, ack_code: str, reason: str | None,
           raw: bytes, ack: bytes, digest: str | None = None) -> InboundMessage:
    entry = InboundMessage(sender=storable(sender)[:200], control_id=storable(control_id)[:200],
                           message_type=storable(message_type)[:20],
                           accession_number=(accession_number or None) and accession_number[:16],
                           outcome=outcome, ack_code=ack_code, reason=reason, raw=raw, ack=ack,
                           content_digest=digest)
    session.add(entry)
    return entry


# Built once, on the table rather than the entity: every accepted message runs it, and an
# ORM-enabled insert with inline values re-derives its cache key on each call.
_INSERT_ACCEPTED = insert(InboundMessage.__table__)


def record_accepted(session: Session, *, sender: str, control_id: str, message_type: str,
                    accession_number: str | None, raw: bytes, ack: bytes, digest: str,
                    warnings: list[str]) -> None:
    """Log an accepted message, at once (a plain INSERT, not the ORM's unit of work): a copy
    of it accepted meanwhile (a resend racing on PostgreSQL) fails here on the unique index."""
    session.execute(_INSERT_ACCEPTED, {
        "received_at": utcnow(), "sender": sender[:200], "control_id": control_id[:200],
        "message_type": message_type[:20],
        "accession_number": (accession_number or None) and accession_number[:16],
        "outcome": InboundOutcome.ACCEPTED, "ack_code": "AA", "reason": None, "raw": raw,
        "ack": ack, "content_digest": digest, "warnings": "\n".join(warnings) or None})


def list_messages(session: Session, *, failed_only: bool = False, limit: int = 100,
                  ) -> list[InboundMessage]:
    query = select(InboundMessage).order_by(InboundMessage.id.desc()).limit(limit)
    if failed_only:
        query = query.where(InboundMessage.outcome != InboundOutcome.ACCEPTED)
    return list(session.scalars(query))


def get(session: Session, message_id: int) -> InboundMessage | None:
    return session.get(InboundMessage, message_id)
