"""The audit trail: who saw or sent which patient's data, and when (IHE ATNA's question).

Events are plain values (:class:`AuditEvent`); the edges hand them to the buffered recorder
(``broker.audit_trail``), which writes them here in batches, as JSON lines on the audit log
file and, if configured, as RFC 5424 syslog messages. Operator actions have their own table
(``broker.operator_actions``, written with the change they describe): :func:`list_events`
reads them with these, so that each fact has one record.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from broker.db_text import storable
from broker.models import AuditAccession, OperatorAction, utcnow
from broker.models import AuditEvent as AuditRow


class Kind:
    """What an event records (``audit_event.kind``)."""

    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REJECTED = "association-rejected"
    CFIND = "c-find"
    MPPS_CREATE = "mpps-n-create"
    MPPS_SET = "mpps-n-set"
    HL7_RECEIVED = "hl7-received"
    HL7_SENT = "hl7-sent"
    TLS_FAILED = "tls-handshake-failed"  # DICOM or HL7: no certificate, expired, other CA...
    LOGIN = "login"
    LOGIN_FAILED = "login-failed"
    OPERATOR_ACTION = "operator-action"  # read from operator_action, never written here


_KIND_MAX, _ACTOR_MAX, _ADDRESS_MAX, _SUBJECT_MAX, _OUTCOME_MAX, _ACCESSION_MAX = (
    32, 200, 100, 400, 32, 16)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited event. ``actor`` is the calling AE title, the HL7 sender (MSH-3^MSH-4) or
    the console user; ``detail`` holds what else identifies it (control ID, SOP Instance UID,
    item count...), never a patient's name."""

    kind: str
    actor: str
    outcome: str
    at: dt.datetime = field(default_factory=utcnow)
    address: str | None = None
    tls_subject: str | None = None
    accessions: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The audit log line's object (keys in a fixed order, UTC time with a Z)."""
        return {"at": self.at.isoformat(timespec="milliseconds") + "Z", "kind": self.kind,
                "actor": self.actor, "outcome": self.outcome, "address": self.address,
                "tls_subject": self.tls_subject, "accessions": list(self.accessions),
                **self.detail}


def write_events(session: Session, events: Sequence[AuditEvent]) -> None:
    """Add a batch of events and their accession numbers to the caller's transaction."""
    if not events:
        return
    table = AuditRow.__table__
    rows = [{"at": e.at, "kind": e.kind[:_KIND_MAX], "actor": storable(e.actor)[:_ACTOR_MAX],
             "address": e.address and e.address[:_ADDRESS_MAX],
             "tls_subject": e.tls_subject and e.tls_subject[:_SUBJECT_MAX],
             "outcome": e.outcome[:_OUTCOME_MAX],
             "accession_numbers": "\\".join(e.accessions) or None,
             "detail": json.dumps(e.detail, ensure_ascii=False) if e.detail else None}
            for e in events]
    # One multi-row INSERT ... RETURNING on both backends (SQLAlchemy's "insertmanyvalues"),
    # the ids in the order of the rows.
    ids = list(session.scalars(
        insert(table).returning(table.c.id, sort_by_parameter_order=True), rows))
    links = [{"event_fk": event_id, "accession_number": accession}
             for event_id, event in zip(ids, events, strict=True)
             for accession in sorted({a[:_ACCESSION_MAX] for a in event.accessions if a})]
    if links:
        session.execute(insert(AuditAccession.__table__), links)


def _from_row(row: AuditRow) -> AuditEvent:
    return AuditEvent(kind=row.kind, actor=row.actor, outcome=row.outcome, at=row.at,
                      address=row.address, tls_subject=row.tls_subject,
                      accessions=tuple(row.accession_numbers.split("\\"))
                      if row.accession_numbers else (),
                      detail=json.loads(row.detail) if row.detail else {})


def _from_action(action: OperatorAction) -> AuditEvent:
    return AuditEvent(kind=Kind.OPERATOR_ACTION, actor=action.user, outcome=action.action,
                      at=action.at,
                      accessions=(action.accession_number,) if action.accession_number else (),
                      detail={"target": action.target, "detail": action.detail})


def list_events(session: Session, *, accession_number: str | None = None,
                actor: str | None = None, since: dt.datetime | None = None,
                kinds: Sequence[str] = (), limit: int = 1000) -> list[AuditEvent]:
    """The events of one order or one actor (calling AE, sender, user), oldest first, at most
    ``limit`` (the newest ones), operator actions included."""
    query = select(AuditRow).order_by(AuditRow.at.desc(), AuditRow.id.desc()).limit(limit)
    actions = select(OperatorAction).order_by(OperatorAction.at.desc(),
                                              OperatorAction.id.desc()).limit(limit)
    if accession_number is not None:
        query = query.where(AuditRow.id.in_(select(AuditAccession.event_fk).where(
            AuditAccession.accession_number == accession_number)))
        actions = actions.where(OperatorAction.accession_number == accession_number)
    if actor is not None:
        query = query.where(AuditRow.actor == actor)
        actions = actions.where(OperatorAction.user == actor)
    if since is not None:
        query = query.where(AuditRow.at >= since)
        actions = actions.where(OperatorAction.at >= since)
    if kinds:
        query = query.where(AuditRow.kind.in_(list(kinds)))
    # Read newest first (the limit keeps the newest), then put oldest first: a stable sort
    # by time keeps events of the same instant in the order they were written.
    found = [_from_row(row) for row in session.scalars(query)][::-1]
    if not kinds or Kind.OPERATOR_ACTION in kinds:
        found += [_from_action(action) for action in session.scalars(actions)][::-1]
    found.sort(key=lambda e: e.at)
    return found[-limit:]


def delete_older(session: Session, before: dt.datetime, *, limit: int) -> int:
    """Delete up to ``limit`` events older than ``before`` (the purge, in short batches)."""
    ids = list(session.scalars(select(AuditRow.id).where(AuditRow.at < before)
                               .order_by(AuditRow.id).limit(limit)))
    if not ids:
        return 0
    # Explicitly, not by ON DELETE CASCADE: SQLite enforces it only with foreign_keys on.
    session.execute(delete(AuditAccession).where(AuditAccession.event_fk.in_(ids)))
    return session.execute(delete(AuditRow).where(AuditRow.id.in_(ids))).rowcount
