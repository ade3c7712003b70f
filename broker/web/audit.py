"""Operator actions (replay, retry, drop, worklist create/modify/delete) recorded with who,
when and what, through the core's ``broker.operator_actions``."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from broker.operator_actions import record_action

log = logging.getLogger(__name__)


def record(session: Session, *, user: str, action: str, accession_number: str | None = None,
           target: str, detail: str) -> None:
    """Add the action to the caller's transaction (it is kept only if the change commits)."""
    log.info("operator action user=%s action=%s accession=%s target=%s", user, action,
             accession_number or "", target)
    record_action(session, user=user, action=action, accession_number=accession_number,
                  target=target, detail=detail)
