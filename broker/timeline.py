"""The timeline of one order: everything the broker did with it, oldest first.

A read model over the tables that already hold each fact (no second copy):

- ``inbound_message``: each HL7 message logged under the accession number, with its ACK code;
- ``cfind_exposure``: each calling AE the item was given to in C-FIND answers (first and last
  time, how often);
- ``mpps_tracking`` (linked through ``mpps_item``): its N-CREATE at the record's creation time,
  and its last N-SET at the record's last update. The broker keeps no time per N-SET, so
  intermediate N-SETs (attribute updates while IN PROGRESS) are folded into the last one;
- ``outbox``: each status message queued, then ACKed (``sent_at``), still pending after failed
  attempts, or dead-lettered (no time of its own is kept for that: it is shown at its
  queueing time, with the last error);
- ``operator_action``: console actions, and the purge of the item.

Times are the store's: naive UTC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker import cfind_log
from broker.models import (
    InboundMessage,
    MPPSItemLink,
    MPPSTracking,
    OperatorAction,
    OutboxMessage,
    OutboxState,
    WorklistItem,
)

KINDS = ("hl7", "cfind", "mpps", "status_message", "purge", "operator")
# Among events of the same instant, the order a reader expects: the cause before its effect.
_RANK = {kind: rank for rank, kind in enumerate(
    ("hl7", "operator", "cfind", "mpps", "status_message", "purge"))}


@dataclass(frozen=True)
class TimelineEvent:
    at: dt.datetime
    kind: str  # one of KINDS
    title: str
    detail: str
    ref: dict[str, str | int | None] = field(default_factory=dict)


def _when(moment: dt.datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment is not None else "-"


def _hl7(session: Session, accession_number: str) -> list[TimelineEvent]:
    rows = session.scalars(select(InboundMessage)
                           .where(InboundMessage.accession_number == accession_number)
                           .order_by(InboundMessage.id))
    return [TimelineEvent(
        at=m.received_at, kind="hl7",
        title=f"HL7 {m.message_type} received, answered {m.ack_code}",
        detail=(f"MSH-10 {m.control_id} from {m.sender}: {m.outcome}"
                + (f": {m.reason}" if m.reason else "")),
        ref={"inbound_message_id": m.id, "control_id": m.control_id, "ack_code": m.ack_code,
             "outcome": m.outcome}) for m in rows]


def _cfind(session: Session, accession_number: str) -> list[TimelineEvent]:
    events = []
    for e in cfind_log.exposures_of(session, accession_number):
        times = "once" if e.count == 1 else f"{e.count} times"
        events.append(TimelineEvent(
            at=e.first_at, kind="cfind", title=f"Given to {e.calling_ae} in C-FIND answers",
            detail=f"{times}, first {_when(e.first_at)}, last {_when(e.last_at)}",
            ref={"calling_ae": e.calling_ae, "count": e.count,
                 "first_at": e.first_at.isoformat(), "last_at": e.last_at.isoformat()}))
    return events


def _mpps(session: Session, item_id: int | None) -> list[TimelineEvent]:
    if item_id is None:
        return []
    rows = session.scalars(select(MPPSTracking)
                           .join(MPPSItemLink, MPPSItemLink.mpps_fk == MPPSTracking.id)
                           .where(MPPSItemLink.item_fk == item_id)
                           .order_by(MPPSTracking.id))
    events = []
    for r in rows:
        ref: dict[str, str | int | None] = {"mpps_sop_instance_uid": r.sop_instance_uid,
                                            "status": r.status}
        source = f"from {r.calling_ae_title or '-'} (station {r.performed_station_ae_title or '-'})"
        events.append(TimelineEvent(
            at=r.created_at, kind="mpps", title="MPPS N-CREATE: IN PROGRESS",
            detail=f"{source}, started {_when(r.start_datetime)}, uid {r.sop_instance_uid}",
            ref=ref))
        if r.status != "IN PROGRESS" or r.updated_at > r.created_at:
            events.append(TimelineEvent(
                at=r.updated_at, kind="mpps", title=f"MPPS N-SET: {r.status}",
                detail=(f"{source}, ended {_when(r.end_datetime)}, uid {r.sop_instance_uid}"
                        " (the last N-SET; earlier ones are not timed separately)"),
                ref=ref))
    return events


def _status_messages(session: Session, accession_number: str) -> list[TimelineEvent]:
    rows = session.scalars(select(OutboxMessage)
                           .where(OutboxMessage.accession_number == accession_number)
                           .order_by(OutboxMessage.id))
    events = []
    for m in rows:
        ref: dict[str, str | int | None] = {"outbox_id": m.id,
                                            "message_control_id": m.message_control_id,
                                            "state": m.state}
        name = f"status message ORC-5 {m.event}"
        events.append(TimelineEvent(at=m.created_at, kind="status_message",
                                    title=f"{name} queued for the RIS",
                                    detail=f"MSH-10 {m.message_control_id}", ref=ref))
        tries = f"after {m.attempts} attempt(s)"
        if m.state == OutboxState.SENT and m.sent_at is not None:
            events.append(TimelineEvent(at=m.sent_at, kind="status_message",
                                        title=f"{name} sent, ACKed by the RIS",
                                        detail=f"MSH-10 {m.message_control_id}, {tries}",
                                        ref=ref))
        elif m.state == OutboxState.FAILED:
            events.append(TimelineEvent(at=m.created_at, kind="status_message",
                                        title=f"{name} dead-lettered",
                                        detail=f"{tries}: {m.last_error or 'no reason kept'}",
                                        ref=ref))
        elif m.attempts:
            events.append(TimelineEvent(
                at=m.created_at, kind="status_message", title=f"{name} not delivered yet",
                detail=(f"{tries}, next attempt {_when(m.next_attempt_at)}: "
                        f"{m.last_error or ''}"), ref=ref))
    return events


def _actions(session: Session, accession_number: str) -> list[TimelineEvent]:
    rows = session.scalars(select(OperatorAction)
                           .where(OperatorAction.accession_number == accession_number)
                           .order_by(OperatorAction.id))
    events = []
    for a in rows:
        kind = "purge" if a.action == "purge" else "operator"
        title = ("Purged by the retention rules" if kind == "purge"
                 else f"{a.action} by {a.user}")
        events.append(TimelineEvent(at=a.at, kind=kind, title=title,
                                    detail=f"{a.target}: {a.detail}" if a.detail else a.target,
                                    ref={"operator_action_id": a.id, "user": a.user,
                                         "action": a.action}))
    return events


def order_timeline(session: Session, accession_number: str) -> list[TimelineEvent]:
    """Every recorded event of the order, oldest first (an empty list: nothing known)."""
    item_id = session.scalar(select(WorklistItem.id)
                             .where(WorklistItem.accession_number == accession_number))
    events = [*_hl7(session, accession_number), *_cfind(session, accession_number),
              *_mpps(session, item_id), *_status_messages(session, accession_number),
              *_actions(session, accession_number)]
    events.sort(key=lambda e: (e.at, _RANK[e.kind]))
    return events
