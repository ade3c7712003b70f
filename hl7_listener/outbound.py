"""The road back to the RIS: outbox rows rendered as HL7 status messages and sent over MLLP.

The outbox decides what is due (``broker.outbox.deliverable``: per order in the order
written, after any backoff); this module renders, sends and judges the ACK. A message counts
as sent only when the RIS answers AA (or CA) with MSA-2 equal to its MSH-10; the MSH-10 is
stored with the row, so a resend after a lost ACK carries the same id and the RIS can drop
the duplicate. AR/CR dead-letters the message; AE/CE and garbage are retried with backoff; an
unreachable RIS ends the run (the rest would fail the same way) and delays, never drops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker import outbox
from broker.audit import AuditEvent, Kind
from broker.audit_trail import AuditTrail
from broker.config import Hl7Config, RisConfig
from broker.domain import StatusKind
from broker.store import Store
from broker.tls import ContextSource, expected_server_name
from hl7_listener.message import MessageError
from hl7_listener.mllp import MllpClient, MllpError
from hl7_listener.status_message import StatusFormat, parse_ack, render_status_message

log = logging.getLogger(__name__)

_POSITIVE = frozenset({"AA", "CA"})
_REJECTED = frozenset({"AR", "CR"})


@dataclass(frozen=True, slots=True)
class OutboundReport:
    sent: int
    failed: int
    skipped: bool = False  # another broker on the same database is delivering


@dataclass(frozen=True, slots=True)
class _Pending:
    id: int
    message_control_id: str
    accession_number: str
    payload_json: str


class OutboundSender:
    """Delivers pending outbox messages; one instance per broker, run by one job at a time."""

    def __init__(self, store: Store, ris: RisConfig, hl7: Hl7Config, *, batch_size: int,
                 tls: ContextSource | None = None, audit: AuditTrail | None = None) -> None:
        self._store = store
        self._audit = audit
        self._ris = ris
        self._hl7 = hl7
        self._batch_size = batch_size
        self._policy = outbox.RetryPolicy(ris.retry_initial_seconds, ris.retry_max_seconds,
                                          ris.max_attempts)
        messages = ris.status_messages
        # Decided when sent, not when queued: a changed format applies to what is pending.
        self._formats: dict[StatusKind, StatusFormat] = {}
        for kind in StatusKind:
            chosen = getattr(messages, kind.value)
            self._formats[kind] = StatusFormat(
                message_type=chosen.message_type, version=chosen.version or ris.hl7_version,
                templates=messages.field_templates.get(chosen.message_type, {}))
        self._client = MllpClient(
            ris.host, ris.port, connect_timeout=ris.connect_timeout_seconds,
            read_timeout=ris.ack_timeout_seconds,
            tls=(lambda: tls.context) if tls is not None else None,
            server_name=expected_server_name(ris.tls, ris.host) if tls is not None else None)

    def _pending(self) -> list[_Pending]:
        with self._store.reading() as session:
            return [_Pending(m.id, m.message_control_id, m.accession_number, m.payload_json)
                    for m in outbox.deliverable(session, self._batch_size)]

    def _render(self, message: _Pending) -> bytes:
        event = outbox.decode_event(message.payload_json)
        return render_status_message(
            event,
            message_control_id=message.message_control_id,
            sending_application=self._hl7.sending_application,
            sending_facility=self._hl7.sending_facility,
            receiving_application=self._ris.receiving_application,
            receiving_facility=self._ris.receiving_facility,
            fmt=self._formats[event.status_kind],
        )

    def _deliver(self, message: _Pending) -> tuple[str, str] | None:
        """Send one message; None when the RIS accepted it, else (outcome, reason)."""
        try:
            reply = self._client.send(self._render(message))
        except MllpError as exc:
            self._audit_sent(message, "unreachable")
            return (outbox.Outcome.UNREACHABLE,
                    f"RIS {self._ris.host}:{self._ris.port} unreachable: {exc}")
        try:
            ack = parse_ack(reply)
        except MessageError as exc:
            self._audit_sent(message, "not-an-ack")
            return outbox.Outcome.NEGATIVE, f"RIS answered something that is not an ACK: {exc}"
        self._audit_sent(message, ack.code)
        if ack.control_id != message.message_control_id:
            return (outbox.Outcome.NEGATIVE, f"ACK MSA-2 {ack.control_id!r} does not match "
                    f"MSH-10 {message.message_control_id!r}")
        if ack.code in _POSITIVE:
            return None
        outcome = outbox.Outcome.REJECTED if ack.code in _REJECTED else outbox.Outcome.NEGATIVE
        return outcome, f"RIS answered {ack.code}: {ack.text or 'no reason given'}"

    def _audit_sent(self, message: _Pending, outcome: str) -> None:
        if self._audit is None:
            return
        ris = self._ris
        self._audit.record(AuditEvent(
            Kind.HL7_SENT, f"{ris.receiving_application}^{ris.receiving_facility}", outcome,
            address=f"{ris.host}:{ris.port}", accessions=(message.accession_number,),
            detail={"control_id": message.message_control_id}))

    def run_once(self) -> OutboundReport:
        # One deliverer per database: two brokers sending the same order's messages at once
        # could put a late IP after its CM.
        with self._store.exclusive("outbound") as mine:
            if not mine:
                log.debug("outbound run skipped: another broker holds the outbound lock")
                return OutboundReport(sent=0, failed=0, skipped=True)
            return self._deliver_due()

    def _deliver_due(self) -> OutboundReport:
        sent = failed = 0
        held: set[str] = set()  # orders with a failure in this run: their later messages wait
        for message in self._pending():
            if message.accession_number in held:
                continue
            result = self._deliver(message)
            if result is None:
                with self._store.writing() as session:
                    outbox.mark_sent(session, message.id)
                sent += 1
                log.info("status message sent msh10=%s accession=%s",
                         message.message_control_id, message.accession_number)
                continue
            outcome, reason = result
            with self._store.writing() as session:
                state = outbox.record_failure(session, message.id, reason, outcome=outcome,
                                              policy=self._policy)
            failed += 1
            held.add(message.accession_number)
            log.warning("status message not delivered msh10=%s accession=%s (now %s): %s",
                        message.message_control_id, message.accession_number, state, reason)
            if outcome == outbox.Outcome.UNREACHABLE:
                break
        return OutboundReport(sent=sent, failed=failed)

    def close(self) -> None:
        self._client.close()
