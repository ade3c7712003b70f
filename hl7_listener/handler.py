"""What happens to one inbound message: parse, map, apply in one transaction, acknowledge.

The ACK is built only after the transaction has committed; any failure before that leaves
nothing written and is answered AE or AR with the reason. Nothing raised here reaches the
listener: a message the broker cannot take never stops it from serving the next one.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from broker import inbound_log, metrics
from broker.audit import AuditEvent, Kind
from broker.audit_trail import AuditTrail
from broker.config import BrokerConfig
from broker.domain import DEFAULT_REPORTING, PatientMerge, StatusReporting
from broker.errors import InvalidOrder, UnsupportedMessage
from broker.models import InboundOutcome
from broker.orders import apply_orders
from broker.patients import merge_patient, update_patient
from broker.store import Store
from hl7_listener.ack import ErrorDetail, build_ack
from hl7_listener.mapping import MERGE_PATIENT_ID_PATH, Mapping, load_mapping
from hl7_listener.message import (
    UNSUPPORTED_MESSAGE_TYPE,
    MessageError,
    ParsedMessage,
    content_digest,
    parse,
    salvage_header,
)
from hl7_listener.server import Peer
from hl7_listener.status_message import parse_ack

log = logging.getLogger(__name__)

# Who sent the message being handled (set by handle / reject for the call, in its thread):
# the audit trail's address and certificate subject, without threading it through every step.
_PEER: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("hl7_peer", default=None)

APPLICATION_INTERNAL_ERROR = "207"
UNSUPPORTED_EVENT = "201"
_ORDERS = {("ORM", "O01"), ("OMI", "O23")}
_PATIENT_UPDATES = {"A08", "A31"}
# A40 merge patient, A34 merge patient ID only, A36 merge patient and account: all fold the
# MRG-1 patient into the PID-3 patient. A47 changes the patient identifier.
_PATIENT_MERGES = {"A40", "A34", "A36"}
_IDENTIFIER_CHANGES = {"A47"}


# Enhanced acknowledgement mode (HL7 v2 2.9.3): the accept ACK, sent once the message is
# safely stored (for the broker: committed), carries CA / CE / CR.
_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}


def _enhanced(msg: ParsedMessage) -> bool:
    return bool(msg.msh(15).strip())


def _wanted(msg: ParsedMessage, ack: bytes) -> bytes | None:
    """Apply MSH-15 (accept acknowledgement type, table 0155: AL, NE, ER, SU)."""
    if not _enhanced(msg):
        return ack
    condition = msg.msh(15).strip().upper()
    success = parse_ack(ack).code == "CA"
    if condition == "NE" or (condition == "ER" and success) or (
            condition == "SU" and not success):
        return None
    return ack


@dataclass(frozen=True, slots=True)
class _Plan:
    """A message's effect, computed before the transaction: run ``apply`` inside it."""

    apply: Callable[[Session], str]
    accession: str | None = None
    warnings: list[str] = field(default_factory=list)


class OrderMessageHandler:
    """Turns order messages into ``apply_order`` calls; ``handle`` returns the ACK to send."""

    def __init__(self, store: Store, mapping: Mapping, *, uid_root: str,
                 sending_application: str, sending_facility: str,
                 existing_order: str = "update", charset_fallback: str | None = None,
                 reporting: StatusReporting = DEFAULT_REPORTING,
                 audit: AuditTrail | None = None) -> None:
        self.store = store
        # Every message received and its ACK code; set by the composition root.
        self.audit = audit
        # Replaced as a whole (never mutated) when the mapping is reloaded.
        self.mapping = mapping
        self.uid_root = uid_root
        self.sending_application = sending_application
        self.sending_facility = sending_facility
        self.existing_order = existing_order
        self.charset_fallback = charset_fallback
        self.reporting = reporting
        # (sender, quirk) pairs already logged: a sender's habits are news once, not per
        # message.
        self._quirks_logged: set[tuple[str, str]] = set()
        self._quirks_lock = threading.Lock()

    def _ack(self, msg: ParsedMessage | None, code: str, text: str = "",
             error: ErrorDetail | None = None, warnings: list[str] | None = None) -> bytes:
        if msg is not None and _enhanced(msg):
            code = _ENHANCED[code]
        return build_ack(msg, code, text=text, error=error, warnings=warnings or (),
                         sending_application=self.sending_application,
                         sending_facility=self.sending_facility)

    def reject(self, reason: str, code: str = "100", raw: bytes = b"",
               peer: Peer | None = None) -> bytes:
        """AR for bytes that never became a message (e.g. a frame over the size limit, of
        which ``raw`` is the start): in the sender's terms when its header can be read."""
        token = _PEER.set(peer)
        try:
            return self._reject(reason, code, raw)
        finally:
            _PEER.reset(token)

    def _reject(self, reason: str, code: str, raw: bytes) -> bytes:
        header = salvage_header(raw)
        if header is not None:
            return self._refuse(header, raw, "AR", reason, ErrorDetail(code))
        log.warning("message rejected before parsing: %s", reason)
        metrics.observe_hl7("", "AR")
        if self.audit is not None:
            peer = _PEER.get()
            self.audit.record(AuditEvent(
                Kind.HL7_RECEIVED, "", "AR", address=peer.address if peer else None,
                tls_subject=peer.tls_subject if peer else None,
                detail={"control_id": "", "reason": reason}))
        ack = self._ack(None, "AR", reason, ErrorDetail(code))
        self._keep_rejection(None, raw, "AR", reason, ack)
        return ack

    def handle(self, raw: bytes, peer: Peer | None = None) -> bytes | None:
        """The acknowledgement to send, or None when the sender asked for none (enhanced
        mode, MSH-15 NE, or ER/SU when the outcome does not call for one). ``peer`` is who
        sent it, for the audit trail."""
        token = _PEER.set(peer)
        try:
            return self._handle(raw)
        finally:
            _PEER.reset(token)

    def _handle(self, raw: bytes) -> bytes | None:
        try:
            msg = parse(raw, charset_fallback=self.charset_fallback)
        except MessageError as exc:
            if exc.message is None:
                return self.reject(exc.reason, exc.code, raw)
            # The header was readable: answer in the sender's terms, MSA-2 its MSH-10.
            return _wanted(exc.message, self._refuse(exc.message, raw, exc.ack_code, exc.reason,
                                                     ErrorDetail(exc.code, exc.location)))
        self._log_quirks(msg)
        return _wanted(msg, self._outcome(msg, raw))

    def _log_quirks(self, msg: ParsedMessage) -> None:
        if not msg.quirks:
            return
        sender = self._sender(msg)
        with self._quirks_lock:
            new = [q for q in msg.quirks if (sender, q) not in self._quirks_logged]
            self._quirks_logged.update((sender, q) for q in new)
        for quirk in new:
            log.info("sender %s sends %s; read as the standard's readers do (logged once per "
                     "sender)", sender, quirk)

    def _outcome(self, msg: ParsedMessage, raw: bytes) -> bytes:
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
        digest = content_digest(raw)
        try:
            plan = self._plan(msg)
        except (InvalidOrder, UnsupportedMessage):
            # A resend of a message accepted under an older mapping still gets its ACK.
            previous = self._previous_ack(sender, msg, digest)
            if previous is not None:
                return self._resent(msg, previous)
            raise
        try:
            with self.store.writing() as session:
                earlier = inbound_log.earlier(session, sender, msg.control_id, digest,
                                              content_digest)
                if earlier.ack is not None:
                    return self._resent(msg, earlier.ack)
                warnings = list(plan.warnings)
                if earlier.reused:
                    warnings.insert(0, f"control ID {msg.control_id} reused with different "
                                    "content: processed as a new message")
                ack = self._ack(msg, "AA", warnings=warnings)
                inbound_log.record_accepted(
                    session, sender=sender, control_id=msg.control_id,
                    message_type=f"{msg.message_type}^{msg.trigger_event}",
                    accession_number=plan.accession, raw=raw, ack=ack, digest=digest,
                    warnings=warnings)
                detail = plan.apply(session)
        except IntegrityError:
            # The same message, accepted meanwhile on another connection or broker.
            previous = self._previous_ack(sender, msg, digest)
            if previous is None:
                raise
            return self._resent(msg, previous)
        # Only now, after the commit, may the RIS be told the message is safe.
        self._log(msg, "AA", detail, warnings, accession=plan.accession)
        return ack

    def _previous_ack(self, sender: str, msg: ParsedMessage, digest: str) -> bytes | None:
        with self.store.reading() as session:
            return inbound_log.earlier(session, sender, msg.control_id, digest,
                                       content_digest).ack

    def _resent(self, msg: ParsedMessage, previous: bytes) -> bytes:
        self._log(msg, "AA", "resend of a message already accepted (same content); answered "
                  "with the original ACK, nothing changed")
        return previous

    def _plan(self, msg: ParsedMessage) -> _Plan:
        """What the message will do, read without touching the database."""
        kind = (msg.message_type, msg.trigger_event)
        if kind in _ORDERS:
            orders = self.mapping.to_orders(msg)

            def apply(session: Session) -> str:
                results = apply_orders(session, orders, uid_root=self.uid_root,
                                       existing=self.existing_order,
                                       reporting=self.reporting)
                return ", ".join(f"accession={r.accession_number} status={r.status}"
                                 for r in results)

            accession = orders[0].procedure.accession_number if orders else None
            return _Plan(apply, accession, self.mapping.warnings(msg, orders))
        if msg.message_type == "ADT":
            return self._adt_plan(msg)
        known_type = any(msg.message_type == t for t, _ in _ORDERS)
        raise UnsupportedMessage(
            f"message type {msg.message_type}^{msg.trigger_event} is not supported "
            "(ORM^O01, OMI^O23, ADT)", location="MSH-9",
            code=UNSUPPORTED_EVENT if known_type else UNSUPPORTED_MESSAGE_TYPE)

    def _adt_plan(self, msg: ParsedMessage) -> _Plan:
        event = msg.trigger_event
        if event in _PATIENT_UPDATES:
            patient = self.mapping.to_patient(msg)

            def update(session: Session) -> str:
                result = update_patient(session, patient)
                return f"ADT^{event} patient {'updated' if result.found else 'unknown, ignored'}"

            return _Plan(update)
        if event in _PATIENT_MERGES or event in _IDENTIFIER_CHANGES:
            old_id = msg.get(MERGE_PATIENT_ID_PATH)
            if not old_id:
                raise InvalidOrder("MRG-1 prior patient identifier is required",
                                   location="MRG-1", code="101")
            merge = PatientMerge(self.mapping.to_patient(msg), old_id,
                                 change_identifier_only=event in _IDENTIFIER_CHANGES)

            def merged(session: Session) -> str:
                result = merge_patient(session, merge)
                return f"ADT^{event} merged, {result.items_moved} worklist items moved"

            return _Plan(merged)
        # Admissions, transfers, discharges...: nothing on the worklist depends on them.
        return _Plan(lambda _session: f"ADT^{event} acknowledged and ignored "
                     "(no worklist effect)")

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

    def _log(self, msg: ParsedMessage, code: str, detail: str,
             warnings: list[str] | None = None, *, accession: str | None = None) -> None:
        metrics.observe_hl7(f"{msg.message_type}^{msg.trigger_event}", code)
        if self.audit is not None:
            peer = _PEER.get()
            self.audit.record(AuditEvent(
                Kind.HL7_RECEIVED, self._sender(msg), code,
                address=peer.address if peer else None,
                tls_subject=peer.tls_subject if peer else None,
                accessions=(accession,) if accession else (),
                detail={"control_id": msg.control_id,
                        "message_type": f"{msg.message_type}^{msg.trigger_event}"}))
        level = logging.INFO if code == "AA" and not warnings else logging.WARNING
        detail = "; ".join([detail, *(f"warning: {w}" for w in warnings or ())])
        log.log(level, "msh10=%s type=%s^%s from=%s %s: %s", msg.control_id,
                msg.message_type, msg.trigger_event, msg.msh(3), code, detail)


def handler_from_config(store: Store, config: BrokerConfig) -> OrderMessageHandler:
    """The handler ``serve`` runs and ``messages replay`` reuses: one set of settings."""
    return OrderMessageHandler(
        store, load_mapping(config.mapping), uid_root=config.uid_root,
        sending_application=config.hl7.sending_application,
        sending_facility=config.hl7.sending_facility,
        existing_order=config.hl7.existing_order,
        charset_fallback=config.hl7.charset_fallback or None,
        reporting=config.ris.status_messages.reporting())
