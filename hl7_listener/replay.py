"""Replay of a logged inbound message through the handler in use (after a mapping fix):
shared by ``worklist-broker messages replay`` and the console."""

from __future__ import annotations

from dataclasses import dataclass

from broker import inbound_log
from broker.errors import BrokerError
from broker.store import Store
from hl7_listener.handler import OrderMessageHandler
from hl7_listener.status_message import parse_ack


class NoSuchMessage(BrokerError):
    pass


@dataclass(frozen=True, slots=True)
class ReplayResult:
    message_id: int
    reply: bytes | None  # None: the message asks for no acknowledgement (MSH-15)
    ack_code: str | None
    ack_text: str | None

    @property
    def accepted(self) -> bool:
        return self.reply is None or self.ack_code in ("AA", "CA")


def replay(store: Store, handler: OrderMessageHandler, message_id: int) -> ReplayResult:
    """The stored bytes go through the handler's current mapping, as if just received; the
    outcome is logged as a new inbound message like any other."""
    with store.reading() as session:
        entry = inbound_log.get(session, message_id)
        if entry is None:
            raise NoSuchMessage(f"no inbound message {message_id}")
        raw = entry.raw
    reply = handler.handle(raw)
    if reply is None:
        return ReplayResult(message_id, None, None, None)
    ack = parse_ack(reply)
    return ReplayResult(message_id, reply, ack.code, ack.text)
