"""What happens to one inbound message: parse, map, apply in one transaction, acknowledge.

The ACK is built only after the transaction has committed; any failure before that leaves
nothing written and is answered AE or AR with the reason. Nothing raised here reaches the
listener: a message the broker cannot take never stops it from serving the next one.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from broker.errors import InvalidOrder, UnsupportedMessage
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

    def reject(self, reason: str, code: str = "100") -> bytes:
        """AR for bytes that never became a message (e.g. a frame over the size limit)."""
        log.warning("message rejected before parsing: %s", reason)
        return self._ack(None, "AR", reason, ErrorDetail(code))

    def handle(self, raw: bytes) -> bytes:
        try:
            msg = parse(raw)
        except MessageError as exc:
            return self.reject(exc.reason, exc.code)
        try:
            return self._apply(msg)
        except UnsupportedMessage as exc:
            self._log(msg, "AR", exc.reason)
            return self._ack(msg, "AR", exc.reason, ErrorDetail(exc.code, exc.location))
        except InvalidOrder as exc:
            location = exc.location or (self.mapping.location_of(exc.attribute)
                                        if exc.attribute else None)
            reason = exc.reason
            if location and not reason.startswith(location):
                reason = f"{location} {reason}"
            self._log(msg, "AE", reason)
            return self._ack(msg, "AE", reason, ErrorDetail(exc.code, location))
        except SQLAlchemyError as exc:
            log.error("database error on msh10=%s: %s", msg.control_id,
                      str(getattr(exc, "orig", exc)).splitlines()[0])
            return self._ack(msg, "AE", "application internal error: database unavailable, "
                             "nothing was stored; please resend",
                             ErrorDetail(APPLICATION_INTERNAL_ERROR))
        except Exception:
            log.exception("unexpected error on msh10=%s", msg.control_id)
            return self._ack(msg, "AE", "application internal error, nothing was stored",
                             ErrorDetail(APPLICATION_INTERNAL_ERROR))

    def _apply(self, msg: ParsedMessage) -> bytes:
        kind = (msg.message_type, msg.trigger_event)
        if kind not in _ACCEPTED:
            known_type = any(kind[0] == t for t, _ in _ACCEPTED)
            raise UnsupportedMessage(
                f"message type {msg.message_type}^{msg.trigger_event} is not supported "
                "(ORM^O01)", location="MSH-9",
                code=UNSUPPORTED_EVENT if known_type else UNSUPPORTED_MESSAGE_TYPE)
        order = self.mapping.to_order(msg)
        with self.store.writing() as session:
            result = apply_order(session, order, uid_root=self.uid_root)
        # Only now, after the commit, may the RIS be told the order is safe.
        self._log(msg, "AA", f"{order.control} accession={result.accession_number} "
                  f"status={result.status}")
        return self._ack(msg, "AA")

    @staticmethod
    def _log(msg: ParsedMessage, code: str, detail: str) -> None:
        level = logging.INFO if code == "AA" else logging.WARNING
        log.log(level, "msh10=%s type=%s^%s from=%s %s: %s", msg.control_id,
                msg.message_type, msg.trigger_event, msg.msh(3), code, detail)
