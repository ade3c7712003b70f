"""What happens to one inbound message: parse, map, apply in one transaction, acknowledge.

The ACK is built only after the transaction has committed; any failure before that leaves
nothing written and is answered AE or AR with the reason. Nothing raised here reaches the
listener: a message the broker cannot take never stops it from serving the next one.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from broker import inbound_log
from broker.errors import InvalidOrder, UnsupportedMessage
from broker.models import InboundOutcome
from broker.orders import apply_order
from broker.store import Store
from hl7_listener.ack import ErrorDetail, build_ack
from hl7_listener.mapping import Mapping
from hl7_listener.message import (
    UNSUPPORTED_MESSAGE_TYPE,
    MessageError,
    ParsedMessage,
    parse,
)

log = logging.getLogger(__name__)

APPLICATION_INTERNAL_ERROR = "207"
UNSUPPORTED_EVENT = "201"
_ACCEPTED = {("ORM", "O01")}


class OrderMessageHandler:
    """Turns order messages into ``apply_order`` calls; ``handle`` returns the ACK to send."""

    def __init__(self, store: Store, mapping: Mapping, *, uid_root: str,
                 sending_application: str, sending_facility: str) -> None:
        self.store = store
        # Replaced as a whole (never mutated) when the mapping is reloaded.
        self.mapping = mapping
        self.uid_root = uid_root
        self.sending_application = sending_application
        self.sending_facility = sending_facility

    def _ack(self, msg: ParsedMessage | None, code: str, text: str = "",
             error: ErrorDetail | None = None) -> bytes:
        return build_ack(msg, code, text=text, error=error,
                         sending_application=self.sending_application,
                         sending_facility=self.sending_facility)

    def reject(self, reason: str, code: str = "100", raw: bytes = b"") -> bytes:
        """AR for bytes that never became a message (e.g. a frame over the size limit)."""
        log.warning("message rejected before parsing: %s", reason)
        ack = self._ack(None, "AR", reason, ErrorDetail(code))
        self._keep_rejection(None, raw, "AR", reason, ack)
        return ack

    def handle(self, raw: bytes) -> bytes:
        try:
            msg = parse(raw)
        except MessageError as exc:
            return self.reject(exc.reason, exc.code, raw)
        try:
            return self._apply(msg, raw)
        except UnsupportedMessage as exc:
            return self._refuse(msg, raw, "AR", exc.reason, ErrorDetail(exc.code, exc.location))
        except InvalidOrder as exc:
            location = exc.location or (self.mapping.location_of(exc.attribute)
                                        if exc.attribute else None)
            reason = exc.reason
            if location and not reason.startswith(location):
                reason = f"{location} {reason}"
            return self._refuse(msg, raw, "AE", reason, ErrorDetail(exc.code, location))
        except SQLAlchemyError as exc:
            log.error("database error on msh10=%s: %s", msg.control_id,
                      str(getattr(exc, "orig", exc)).splitlines()[0])
            return self._refuse(msg, raw, "AE", "application internal error: database "
                                "unavailable, nothing was stored; please resend",
                                ErrorDetail(APPLICATION_INTERNAL_ERROR))
        except Exception:
            log.exception("unexpected error on msh10=%s", msg.control_id)
            return self._refuse(msg, raw, "AE", "application internal error, nothing was "
                                "stored", ErrorDetail(APPLICATION_INTERNAL_ERROR))

    @staticmethod
    def _sender(msg: ParsedMessage) -> str:
        return f"{msg.msh(3)}^{msg.msh(4)}"

    def _apply(self, msg: ParsedMessage, raw: bytes) -> bytes:
        sender = self._sender(msg)
        try:
            with self.store.writing() as session:
                previous = inbound_log.accepted_ack(session, sender, msg.control_id)
                if previous is not None:
                    self._log(msg, "AA", "resend of a message already accepted; answered with "
                              "the original ACK, nothing changed")
                    return previous
                self._check_type(msg)
                order = self.mapping.to_order(msg)
                result = apply_order(session, order, uid_root=self.uid_root)
                ack = self._ack(msg, "AA")
                inbound_log.record(session, sender=sender, control_id=msg.control_id,
                                   message_type=f"{msg.message_type}^{msg.trigger_event}",
                                   accession_number=result.accession_number,
                                   outcome=InboundOutcome.ACCEPTED, ack_code="AA", reason=None,
                                   raw=raw, ack=ack)
        except IntegrityError:
            # Two copies of one resend raced (PostgreSQL): the other one committed first.
            with self.store.reading() as session:
                previous = inbound_log.accepted_ack(session, sender, msg.control_id)
            if previous is None:
                raise
            return previous
        # Only now, after the commit, may the RIS be told the order is safe.
        self._log(msg, "AA", f"{order.control} accession={result.accession_number} "
                  f"status={result.status}")
        return ack

    @staticmethod
    def _check_type(msg: ParsedMessage) -> None:
        kind = (msg.message_type, msg.trigger_event)
        if kind not in _ACCEPTED:
            known_type = any(kind[0] == t for t, _ in _ACCEPTED)
            raise UnsupportedMessage(
                f"message type {msg.message_type}^{msg.trigger_event} is not supported "
                "(ORM^O01)", location="MSH-9",
                code=UNSUPPORTED_EVENT if known_type else UNSUPPORTED_MESSAGE_TYPE)

    def _refuse(self, msg: ParsedMessage, raw: bytes, code: str, reason: str,
                error: ErrorDetail) -> bytes:
        self._log(msg, code, reason)
        ack = self._ack(msg, code, reason, error)
        self._keep_rejection(msg, raw, code, reason, ack)
        return ack

    def _keep_rejection(self, msg: ParsedMessage | None, raw: bytes, code: str, reason: str,
                        ack: bytes) -> None:
        """Keep a refused message for ``worklist-broker messages``; best effort, since the
        database may be the very thing that failed."""
        try:
            with self.store.writing() as session:
                inbound_log.record(
                    session, sender=self._sender(msg) if msg else "",
                    control_id=msg.control_id if msg else "",
                    message_type=f"{msg.message_type}^{msg.trigger_event}" if msg else "",
                    accession_number=None, outcome=InboundOutcome.REJECTED, ack_code=code,
                    reason=reason, raw=raw, ack=ack)
        except SQLAlchemyError as exc:
            log.error("could not keep the refused message msh10=%s: %s",
                      msg.control_id if msg else "", str(getattr(exc, "orig", exc)
                                                         ).splitlines()[0])

    @staticmethod
    def _log(msg: ParsedMessage, code: str, detail: str) -> None:
        level = logging.INFO if code == "AA" else logging.WARNING
        log.log(level, "msh10=%s type=%s^%s from=%s %s: %s", msg.control_id,
                msg.message_type, msg.trigger_event, msg.msh(3), code, detail)
