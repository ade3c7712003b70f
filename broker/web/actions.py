"""The console's state-changing actions (replay, retry, drop), shared by the REST API and the
pages' forms; each is recorded as an operator action."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from broker.errors import BrokerError
from broker.web import audit, views
from broker.web.context import Console

_NOUN = {"outbox": "outbox message", "mpps-forward": "MPPS forward"}


def replay(c: Console, user: str, message_id: int) -> dict[str, Any]:
    """Through the handler in use (the live mapping): the same path as
    ``worklist-broker messages replay``."""
    try:
        result = c.services.replay(message_id)
    except BrokerError as exc:
        raise HTTPException(404, str(exc)) from None
    with c.store.reading() as session:
        entry = views.inbound_log.get(session, message_id)
        accession = entry.accession_number if entry else None
    outcome = {"message_id": message_id, "accepted": result.accepted,
               "ack_code": result.ack_code, "ack_text": result.ack_text,
               "reply": (result.reply or b"").decode("utf-8", errors="replace")
               .replace("\r", "\n").rstrip("\n")}
    with c.store.writing() as session:
        audit.record(session, c.services.audit, user=user, action="replay",
                     accession_number=accession, target=f"inbound message {message_id}",
                     detail=f"answered {result.ack_code or 'nothing'}"
                     + (f": {result.ack_text}" if result.ack_text else ""))
    return outcome


def retry(c: Console, user: str, queue: str, row_id: int | None) -> dict[str, Any]:
    if queue not in views.QUEUES:
        raise HTTPException(404, f"no queue {queue!r} (outbox, mpps-forward)")
    _, retry_rows, _, _ = views.QUEUES[queue]
    with c.store.writing() as session:
        count = retry_rows(session, row_id)
        if row_id is not None and count == 0:
            raise HTTPException(409, f"{queue} row {row_id} is not in the failed state")
        audit.record(session, c.services.audit, user=user, action="retry",
                     accession_number=_accession(session, queue, row_id),
                     target=f"{_NOUN[queue]} {row_id if row_id is not None else '(all failed)'}",
                     detail=f"{count} row(s) put back to pending")
    return {"queue": queue, "id": row_id, "retried": count}


def drop(c: Console, user: str, queue: str, row_id: int) -> dict[str, Any]:
    if queue not in views.QUEUES:
        raise HTTPException(404, f"no queue {queue!r} (outbox, mpps-forward)")
    _, _, drop_row, shape = views.QUEUES[queue]
    with c.store.writing() as session:
        accession = _accession(session, queue, row_id)
        dropped = drop_row(session, row_id)
        if dropped is None:
            raise HTTPException(409, f"{queue} row {row_id} does not exist or was already sent")
        row = shape(dropped)
        audit.record(session, c.services.audit, user=user, action="drop",
                     accession_number=accession, target=f"{_NOUN[queue]} {row_id}",
                     detail=f"dropped while {row['state']}")
    return {"queue": queue, "id": row_id, "dropped": row}


def _accession(session: Any, queue: str, row_id: int | None) -> str | None:
    if row_id is None or queue != "outbox":
        return None
    from broker.models import OutboxMessage

    row = session.get(OutboxMessage, row_id)
    return row.accession_number if row is not None else None
