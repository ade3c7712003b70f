"""The operator actions log: who did what through the console, and when.

Written in the caller's transaction, with the change it describes, so an action that rolls
back leaves no record and a record always names a change that happened.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, Select, func, insert, literal, select
from sqlalchemy.orm import Session

from broker.models import OperatorAction, utcnow

# What the console and the purge record; free text is allowed, these are the usual names.
ACTIONS = ("replay", "retry", "drop", "worklist-create", "worklist-modify", "worklist-delete",
           "purge")

_USER_MAX, _ACTION_MAX, _ACCESSION_MAX, _TARGET_MAX = 100, 32, 16, 200


def record_action(session: Session, *, user: str, action: str, accession_number: str | None,
                  target: str, detail: str, at: dt.datetime | None = None) -> None:
    """Add one action to the caller's transaction.

    ``target`` names what was acted on ("inbound message 12", "outbox message 7", "worklist
    item ACC1"); ``detail`` says what changed, for the order's timeline.
    """
    session.execute(insert(OperatorAction.__table__), {
        "at": at or utcnow(), "user": user[:_USER_MAX], "action": action[:_ACTION_MAX],
        "accession_number": (accession_number or None) and accession_number[:_ACCESSION_MAX],
        "target": target[:_TARGET_MAX], "detail": detail})


def record_purged(session: Session, accession_numbers: Select[tuple[str]],
                  at: dt.datetime) -> None:
    """One "purge" action per item the retention rules remove, written by the database from
    what ``accession_numbers`` selects: a year's purge writes 146,000 of them, and building
    each row here was a third of the purge's own CPU time."""
    source = accession_numbers.subquery()
    accession = source.c[0]
    session.execute(insert(OperatorAction.__table__).from_select(
        ["at", "user", "action", "accession_number", "target", "detail"],
        select(literal(at, DateTime), literal("system"), literal("purge"),
               func.substr(accession, 1, _ACCESSION_MAX),
               func.substr(literal("worklist item ") + accession, 1, _TARGET_MAX),
               literal("retention rules"))))


def list_actions(session: Session, *, accession_number: str | None = None,
                 user: str | None = None, limit: int = 100) -> list[OperatorAction]:
    """The newest actions first, of one order or one user if asked."""
    query = select(OperatorAction).order_by(OperatorAction.id.desc()).limit(limit)
    if accession_number is not None:
        query = query.where(OperatorAction.accession_number == accession_number)
    if user is not None:
        query = query.where(OperatorAction.user == user)
    return list(session.scalars(query))
