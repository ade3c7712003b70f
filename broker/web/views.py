"""The console's questions to the core, answered as plain JSON-ready dicts.

"One view, two faces": each page and its JSON twin (and the REST API) call the same function
here, then either render a template or return the dict. Matching, rendering, queue rules and
replay are the existing functions; nothing here re-implements a rule.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from dataclasses import asdict, replace
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from broker import inbound_log, mpps_forward, outbox
from broker.config import DicomConfig
from broker.dicom.why_not import UnknownAccession, explain_recent, recorded_calling_aes
from broker.domain import ItemStatus, WorklistRow
from broker.item_dataset import item_dataset
from broker.matching import InvalidQuery, WorklistQuery, conditions, find_worklist
from broker.models import (
    InboundMessage,
    InboundOutcome,
    MppsForward,
    MPPSTracking,
    OutboxMessage,
    OutboxState,
    Patient,
    WorklistItem,
    utcnow,
)
from broker.store import Store
from broker.timeline import order_timeline

ALL_STATUSES = tuple(ItemStatus)
# The most items one worklist view reads (a busy site's day is a few hundred).
VIEW_LIMIT = 5000
_WILDCARDS = set("*?")


class BadRequest(ValueError):
    """A filter or body the console cannot use; the edge answers 400 with this text."""


def _when(moment: dt.datetime | dt.date | None) -> str | None:
    if moment is None:
        return None
    if isinstance(moment, dt.datetime):
        return moment.isoformat(sep=" ", timespec="seconds")
    return moment.isoformat()


def _stamp(moment: dt.datetime | None) -> str | None:
    """A time the broker stamped (stored as naive UTC), shown in the server's local time
    like the scheduled times the RIS sends."""
    if moment is None:
        return None
    local = moment.replace(tzinfo=dt.UTC).astimezone().replace(tzinfo=None)
    return local.isoformat(sep=" ", timespec="seconds")


def _dicom_date(value: str) -> str:
    """``2026-11-29``, ``20261129`` or a range of them (``a..b`` or ``a-b`` in DICOM form)."""
    value = value.strip()
    if ".." in value:
        low, _, high = value.partition("..")
        return f"{_dicom_date(low) if low else ''}-{_dicom_date(high) if high else ''}"
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return value.replace("-", "")
    return value


def _search(value: str | None) -> str | None:
    """A console search box finds "DOE" in "DOE^JOHN": a value without a DICOM wildcard
    matches as a prefix."""
    if not value or not value.strip():
        return None
    value = value.strip()
    return value if _WILDCARDS & set(value) else value + "*"


def item_summary(row: WorklistRow) -> dict[str, Any]:
    patient, procedure = row.patient, row.procedure
    return {
        "accession_number": procedure.accession_number,
        "status": str(row.status),
        "patient_name": patient.patient_name,
        "patient_id": patient.patient_id,
        "birth_date": _when(patient.birth_date),
        "sex": patient.sex,
        "modality": procedure.modality,
        "station_ae_title": procedure.scheduled_station_ae_title,
        "scheduled_start": _when(procedure.scheduled_start),
        "description": procedure.sps_description or procedure.requested_procedure_description,
        "study_instance_uid": procedure.study_instance_uid,
    }


def worklist(store: Store, *, date: str | None = None, modality: str | None = None,
             station: str | None = None, status: str | None = None,
             patient_name: str | None = None, patient_id: str | None = None,
             accession: str | None = None, page: int = 1, page_size: int = 100,
             ) -> dict[str, Any]:
    """Worklist items through the C-FIND matching code (``broker.matching``), with counts per
    status of everything the other filters select. Without a date or an identifying search,
    today's items."""
    if page < 1 or not 1 <= page_size <= 1000:
        raise BadRequest("page starts at 1 and page_size is 1 to 1000")
    if status and status not in ALL_STATUSES:
        raise BadRequest(f"status {status!r} is not one of {', '.join(ALL_STATUSES)}")
    searching = any((patient_name, patient_id, accession))
    if date is None and not searching:
        date = dt.date.today().isoformat()
    query = WorklistQuery(
        scheduled_start_date=_dicom_date(date) if date else None,
        modality=modality or None, scheduled_station_ae_title=station or None,
        patient_name=_search(patient_name), patient_id=_search(patient_id),
        accession_number=_search(accession), statuses=ALL_STATUSES, limit=VIEW_LIMIT)
    shown = replace(query, statuses=(ItemStatus(status),) if status else ALL_STATUSES,
                    limit=min(page * page_size, VIEW_LIMIT))
    try:
        with store.reading() as session:
            counts = _status_counts(session, query)
            rows = find_worklist(session, shown) if shown.limit > (page - 1) * page_size \
                else []
    except InvalidQuery as exc:
        raise BadRequest(exc.reason) from None
    total = counts[status] if status else sum(counts.values())
    start = (page - 1) * page_size
    return {
        "filters": {"date": date, "modality": modality, "station": station, "status": status,
                    "patient_name": patient_name, "patient_id": patient_id,
                    "accession": accession},
        "counts": {str(s): counts.get(str(s), 0) for s in ALL_STATUSES},
        "total": total,
        "truncated": total > VIEW_LIMIT,
        "page": page, "page_size": page_size,
        "items": [item_summary(row) for row in rows[start:start + page_size]],
    }


def _status_counts(session: Session, query: WorklistQuery) -> Counter[str]:
    """Items per status under the query's other filters: the matching module's conditions,
    counted in SQL rather than by reading every row."""
    where = conditions(query, session.get_bind().dialect.name)
    statement = (select(WorklistItem.status, func.count())
                 .join(Patient, WorklistItem.patient_fk == Patient.id)
                 .where(*where).group_by(WorklistItem.status))
    return Counter({str(s): int(n) for s, n in session.execute(statement)})


def find_item(store: Store, accession: str) -> WorklistRow | None:
    """One item by its exact accession number, whatever its status."""
    query = WorklistQuery(accession_number=accession, statuses=ALL_STATUSES, limit=50)
    if _WILDCARDS & set(accession) or "\\" in accession:
        # Such characters are matching syntax to find_worklist; pin the exact value below.
        query = replace(query, accession_number=None)
    with store.reading() as session:
        if query.accession_number is None:
            exact = session.scalar(select(WorklistItem.id).where(
                WorklistItem.accession_number == accession))
            if exact is None:
                return None
            uid = session.scalar(select(WorklistItem.study_instance_uid).where(
                WorklistItem.id == exact))
            query = replace(query, study_instance_uid=uid)
        rows = find_worklist(session, query)
    return next((r for r in rows if r.procedure.accession_number == accession), None)


def dataset_rows(ds: Dataset) -> list[dict[str, Any]]:
    """A dataset as rows for a table: tag, keyword, VR, value, or nested items."""
    out: list[dict[str, Any]] = []
    element: DataElement
    for element in ds:
        row: dict[str, Any] = {"tag": f"({element.tag.group:04X},{element.tag.element:04X})",
                               "keyword": element.keyword or "", "vr": element.VR}
        if element.VR == "SQ":
            row["items"] = [dataset_rows(item) for item in element.value]
        else:
            value = element.value
            row["value"] = "" if value is None else (
                "\\".join(str(v) for v in value) if isinstance(value, list | tuple)
                or type(value).__name__ == "MultiValue" else str(value))
        out.append(row)
    return out


def _mpps_of(session: Session, accession: str) -> list[dict[str, Any]]:
    records = session.scalars(
        select(MPPSTracking).join(MPPSTracking.items)
        .where(WorklistItem.accession_number == accession).order_by(MPPSTracking.id))
    return [mpps_summary(r) for r in records]


def mpps_summary(record: MPPSTracking) -> dict[str, Any]:
    return {"sop_instance_uid": record.sop_instance_uid, "status": record.status,
            "start": _when(record.start_datetime), "end": _when(record.end_datetime),
            "calling_ae_title": record.calling_ae_title,
            "performed_station_ae_title": record.performed_station_ae_title,
            "created_at": _stamp(record.created_at), "updated_at": _stamp(record.updated_at)}


def _link(ref: dict[str, Any]) -> str | None:
    if ref.get("inbound_message_id") is not None:
        return f"/messages/{ref['inbound_message_id']}"
    if ref.get("mpps_sop_instance_uid"):
        return f"/mpps/{ref['mpps_sop_instance_uid']}"
    if ref.get("outbox_id") is not None:
        return "/queues"
    return None


def timeline_events(session: Session, accession: str) -> list[dict[str, Any]]:
    """The order's timeline (``broker.timeline``), oldest first."""
    return [{"at": _stamp(e.at), "kind": e.kind, "title": e.title, "detail": e.detail,
             "ref": e.ref, "link": _link(e.ref)} for e in order_timeline(session, accession)]


def timeline(store: Store, accession: str) -> dict[str, Any] | None:
    with store.reading() as session:
        events = timeline_events(session, accession)
    return {"accession_number": accession, "timeline": events} if events else None


def why_not(store: Store, dicom: DicomConfig, accession: str, calling_ae: str,
            ) -> list[dict[str, Any]] | None:
    """The calling AE's recent C-FIND identifiers replayed against the item by the matching
    module itself (``broker.dicom.why_not``); None for an unknown accession."""
    try:
        found = explain_recent(store, dicom, accession, calling_ae)
    except UnknownAccession:
        return None
    return [{"at": _stamp(q.at), "calling_ae": q.calling_ae, "matched": q.matched,
             "count": q.count, "matches": q.matches,
             "verdicts": [asdict(v) for v in q.verdicts]} for q in found]


def order(store: Store, accession: str, *, dicom: DicomConfig | None = None,
          calling_ae: str | None = None) -> dict[str, Any] | None:
    """One order: its summary, every DICOM attribute a modality receives, its MPPS, its
    timeline, the calling AEs whose queries are kept and, when one is given, why that
    modality's recent queries did or did not return it."""
    row = find_item(store, accession)
    if row is None:
        return None
    with store.reading() as session:
        mpps = _mpps_of(session, accession)
        events = timeline_events(session, accession)
        calling_aes = recorded_calling_aes(session)
    data: dict[str, Any] = {"item": item_summary(row),
                            "attributes": dataset_rows(item_dataset(row)), "mpps": mpps,
                            "timeline": events, "calling_aes": calling_aes,
                            "why_not_ae": calling_ae or None, "why_not": []}
    if calling_ae and dicom is not None:
        data["why_not"] = why_not(store, dicom, accession, calling_ae) or []
    return data


def mpps_list(store: Store, *, limit: int = 100) -> dict[str, Any]:
    with store.reading() as session:
        records = list(session.scalars(select(MPPSTracking)
                                       .order_by(MPPSTracking.id.desc()).limit(limit)))
        out = []
        for record in records:
            summary = mpps_summary(record)
            summary["accessions"] = [item.accession_number for item in record.items]
            out.append(summary)
    return {"mpps": out}


def mpps_one(store: Store, uid: str) -> dict[str, Any] | None:
    with store.reading() as session:
        record = session.scalars(select(MPPSTracking).where(
            MPPSTracking.sop_instance_uid == uid)).one_or_none()
        if record is None:
            return None
        summary = mpps_summary(record)
        summary["accessions"] = [item.accession_number for item in record.items]
        attributes = record.attributes_json
    summary["dataset"] = dataset_rows(Dataset.from_json(attributes)) if attributes else []
    summary["dataset_json"] = attributes
    return summary


# --- inbound messages ------------------------------------------------------------------

def message_summary(m: InboundMessage) -> dict[str, Any]:
    return {"id": m.id, "received_at": _stamp(m.received_at), "sender": m.sender,
            "control_id": m.control_id, "message_type": m.message_type,
            "accession_number": m.accession_number, "outcome": m.outcome,
            "ack_code": m.ack_code, "reason": m.reason,
            # Applied all the same, with what its ACK warned of (a reused control ID, no
            # scheduled start): an administrator must see the RIS misbehaving.
            "warnings": (m.warnings or "").splitlines()}


def messages(store: Store, *, failed_only: bool = False, limit: int = 100) -> dict[str, Any]:
    """Refused messages first (they are what an administrator comes for), then the rest."""
    with store.reading() as session:
        failed = [message_summary(m) for m in inbound_log.list_messages(
            session, failed_only=True, limit=limit)]
        _mark_resolved(session, failed)
        recent = [] if failed_only else [message_summary(m) for m in inbound_log.list_messages(
            session, failed_only=False, limit=limit)]
    return {"failed": failed, "recent": recent}


def _mark_resolved(session: Session, failed: list[dict[str, Any]]) -> None:
    """A refused message later accepted (replayed, or resent by the RIS) names the accepted
    one: the administrator sees what is still to fix.

    The same control ID is not enough: some RIS reuse them (the listener warns of it), and a
    lost order shown as resolved would never be looked at. The accepted message must be of
    the same type and for the same accession number, unless the refused one had none (then
    what was missing may be what the resend added)."""
    ids = {m["control_id"] for m in failed if m["control_id"]}
    if not ids:
        return
    accepted: dict[tuple[str, str, str], list[tuple[int, str | None]]] = {}
    for sender, control_id, message_type, accession, message_id in session.execute(
            select(InboundMessage.sender, InboundMessage.control_id,
                   InboundMessage.message_type, InboundMessage.accession_number,
                   InboundMessage.id)
            .where(InboundMessage.control_id.in_(ids),
                   InboundMessage.outcome == InboundOutcome.ACCEPTED)
            .order_by(InboundMessage.id)):
        accepted.setdefault((sender, control_id, message_type), []).append(
            (message_id, accession))
    for m in failed:
        later = accepted.get((m["sender"], m["control_id"], m["message_type"]), [])
        m["resolved_by"] = next(
            (message_id for message_id, accession in later if message_id > m["id"]
             and (m["accession_number"] is None or accession == m["accession_number"])),
            None)


_FIELD_REF = re.compile(r"\b([A-Z][A-Z0-9]{2})-(\d+)")


def _segments(raw: str, refused: tuple[str, int] | None) -> list[dict[str, Any]]:
    """The message as segments of fields, the refused field marked."""
    out = []
    for line in raw.replace("\n", "\r").split("\r"):
        if not line:
            continue
        name = line[:3]
        fields = line.split("|")
        marked = None
        if refused and refused[0] == name:
            # MSH-1 is the field separator itself: MSH-n is fields[n - 1].
            index = refused[1] - 1 if name == "MSH" else refused[1]
            if 0 < index < len(fields):
                marked = index
        out.append({"name": name, "fields": fields, "marked": marked})
    return out


def message(store: Store, message_id: int) -> dict[str, Any] | None:
    with store.reading() as session:
        entry = inbound_log.get(session, message_id)
        if entry is None:
            return None
        summary = message_summary(entry)
        raw = entry.raw.decode("utf-8", errors="replace")
        ack = entry.ack.decode("utf-8", errors="replace")
    match = _FIELD_REF.search(summary["reason"] or "")
    refused = (match.group(1), int(match.group(2))) if match else None
    summary.update({
        "raw": raw.replace("\r", "\n").rstrip("\n"),
        "ack": ack.replace("\r", "\n").rstrip("\n"),
        "refused_field": f"{refused[0]}-{refused[1]}" if refused else None,
        "segments": _segments(raw, refused),
        "replayable": summary["outcome"] != InboundOutcome.ACCEPTED,
    })
    return summary


# --- queues ----------------------------------------------------------------------------

def _outbox_row(m: OutboxMessage) -> dict[str, Any]:
    return {"id": m.id, "state": m.state, "event": m.event,
            "accession_number": m.accession_number, "control_id": m.message_control_id,
            "attempts": m.attempts, "created_at": _stamp(m.created_at),
            "next_attempt_at": _stamp(m.next_attempt_at), "sent_at": _stamp(m.sent_at),
            "last_error": m.last_error}


def _forward_row(f: MppsForward) -> dict[str, Any]:
    return {"id": f.id, "state": f.state, "operation": f.operation,
            "destination": f.destination, "sop_instance_uid": f.sop_instance_uid,
            "attempts": f.attempts, "created_at": _stamp(f.created_at),
            "next_attempt_at": _stamp(f.next_attempt_at), "sent_at": _stamp(f.sent_at),
            "last_error": f.last_error}


QUEUES = {"outbox": (outbox.list_messages, outbox.retry, outbox.drop, _outbox_row),
          "mpps-forward": (mpps_forward.list_forwards, mpps_forward.retry, mpps_forward.drop,
                           _forward_row)}


def queue(store: Store, name: str, *, state: str | None = None, limit: int = 100,
          ) -> dict[str, Any]:
    if name not in QUEUES:
        raise BadRequest(f"no queue {name!r} (outbox, mpps-forward)")
    if state is not None and state not in (OutboxState.PENDING, OutboxState.SENT,
                                           OutboxState.FAILED):
        raise BadRequest(f"state {state!r} is not pending, sent or failed")
    list_rows, _, _, shape = QUEUES[name]
    with store.reading() as session:
        rows = [shape(r) for r in list_rows(session, state, limit)]
    return {"queue": name, "state": state, "rows": rows}


def queues(store: Store, *, limit: int = 50) -> dict[str, Any]:
    """Both queues: dead letters first, then pending, then recently sent."""
    out: dict[str, Any] = {}
    for name in QUEUES:
        out[name] = {state: queue(store, name, state=state, limit=limit)["rows"]
                     for state in (OutboxState.FAILED, OutboxState.PENDING, OutboxState.SENT)}
    out["depth"] = queue_depths(store)
    return out


def queue_depths(store: Store) -> dict[str, Any]:
    """Rows per queue and state, and the age of the oldest pending row, from the database
    (so several brokers on one database agree)."""
    now = utcnow()
    out: dict[str, Any] = {}
    with store.reading() as session:
        for name, model in (("outbox", OutboxMessage), ("mpps-forward", MppsForward)):
            counts = dict(session.execute(select(model.state, func.count())
                                          .group_by(model.state)).all())
            oldest = session.scalar(select(func.min(model.created_at))
                                    .where(model.state == OutboxState.PENDING))
            out[name] = {
                "states": {s: int(counts.get(s, 0)) for s in (OutboxState.PENDING,
                                                              OutboxState.SENT,
                                                              OutboxState.FAILED)},
                "oldest_pending_at": _stamp(oldest),
                "oldest_pending_age_seconds": (now - oldest).total_seconds() if oldest else 0.0,
            }
    return out


# --- status ----------------------------------------------------------------------------

def database_ok(store: Store) -> bool:
    try:
        with store.reading() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def ris_link(store: Store) -> dict[str, Any]:
    with store.reading() as session:
        last_ack = session.scalar(select(func.max(OutboxMessage.sent_at)))
        senders = session.execute(
            select(InboundMessage.sender, func.max(InboundMessage.received_at), func.count())
            .group_by(InboundMessage.sender).order_by(InboundMessage.sender)).all()
    depths = queue_depths(store)["outbox"]
    return {
        "last_ack_at": _stamp(last_ack),
        "oldest_pending_at": depths["oldest_pending_at"],
        "oldest_pending_age_seconds": depths["oldest_pending_age_seconds"],
        "pending": depths["states"][OutboxState.PENDING],
        "dead_letters": depths["states"][OutboxState.FAILED],
        "senders": [{"sender": s or "(unreadable header)", "last_received_at": _stamp(at),
                     "messages": int(n)} for s, at, n in senders],
    }


def as_dict(obj: Any) -> Any:
    return asdict(obj)


def audit_events(store: Store, *, accession: str | None = None, actor: str | None = None,
                 limit: int = 200) -> dict[str, Any]:
    """The audit trail (broker.audit) of one order or one actor, or the newest events."""
    from broker.audit import list_events

    accession = (accession or "").strip() or None
    actor = (actor or "").strip() or None
    if limit < 1 or limit > 5000:
        raise BadRequest("limit must be between 1 and 5000")
    with store.reading() as session:
        events = list_events(session, accession_number=accession, actor=actor, limit=limit)
    return {"accession": accession, "actor": actor,
            "events": [event.as_json() for event in reversed(events)]}

