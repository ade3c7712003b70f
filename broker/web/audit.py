"""Operator actions (replay, retry, drop, worklist create/modify/delete) recorded with who,
when and what, through the core's ``broker.operator_actions``, and, once the change has
committed, on the audit log file and syslog collector (``broker.audit_trail``)."""

from __future__ import annotations

import logging

from sqlalchemy import event
from sqlalchemy.orm import Session

from broker.audit import AuditEvent, Kind
from broker.audit_trail import AuditTrail
from broker.models import utcnow
from broker.operator_actions import record_action

log = logging.getLogger(__name__)


def record(session: Session, trail: AuditTrail | None, *, user: str, action: str,
           accession_number: str | None = None, target: str, detail: str) -> None:
    """Add the action to the caller's transaction (it is kept only if the change commits)."""
    log.info("operator action user=%s action=%s accession=%s target=%s", user, action,
             accession_number or "", target)
    at = utcnow()
    record_action(session, user=user, action=action, accession_number=accession_number,
                  target=target, detail=detail, at=at)
    if trail is not None:
        # The operator_action row is the record in the database (one source of truth); the
        # audit log line follows only a commit, so a rolled-back action leaves no line.
        line = AuditEvent(Kind.OPERATOR_ACTION, user, action, at=at,
                          accessions=(accession_number,) if accession_number else (),
                          detail={"target": target})
        event.listen(session, "after_commit",
                     lambda _session: trail.record(line, stored=False), once=True)
