"""The REST API (JSON) under ``/api``; docs/rest-api.md describes it, ``/openapi.json``
too. Every route asks a function of ``broker.web.views`` (reads) or
``broker.web.actions`` (changes): the pages call the same ones."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from broker.web import actions, views
from broker.web.context import Console, console, require

router = APIRouter(prefix="/api", tags=["api"])


async def _view(function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await run_in_threadpool(function, *args, **kwargs)
    except views.BadRequest as exc:
        raise HTTPException(400, str(exc)) from None


def _found(value: Any, what: str) -> Any:
    if value is None:
        raise HTTPException(404, f"no {what}")
    return value


@router.get("/worklist", summary="Worklist items (C-FIND matching); today by default")
async def worklist(request: Request,
                   date: str | None = Query(None, description="YYYY-MM-DD, YYYYMMDD, or a "
                                            "range a..b (either end may be empty)"),
                   modality: str | None = None,
                   station: str | None = Query(None, description="Scheduled Station AE"),
                   status: str | None = Query(None, description="SCHEDULED, IN PROGRESS, ..."),
                   patient_name: str | None = Query(None, description="prefix or DICOM "
                                                    "wildcards"),
                   patient_id: str | None = None, accession: str | None = None,
                   page: int = 1, page_size: int = 100) -> dict[str, Any]:
    return await _view(views.worklist, console(request).store, date=date, modality=modality,
                       station=station, status=status, patient_name=patient_name,
                       patient_id=patient_id, accession=accession, page=page,
                       page_size=page_size)


@router.get("/worklist/{accession}", summary="One item with every DICOM attribute a "
            "modality receives, and its MPPS")
async def item(accession: str, request: Request) -> dict[str, Any]:
    return _found(await _view(views.order, console(request).store, accession),
                  f"worklist item {accession!r}")


@router.get("/worklist/{accession}/timeline", summary="The order's timeline, oldest first")
async def timeline(accession: str, request: Request) -> dict[str, Any]:
    return _found(await _view(views.timeline, console(request).store, accession),
                  f"order {accession!r}")


@router.get("/worklist/{accession}/why-not", summary="Why a modality's recent C-FIND "
            "queries did (not) return this item, key by key")
async def why_not(accession: str, request: Request,
                  calling_ae: str = Query(..., description="the modality's calling AE title"),
                  ) -> dict[str, Any]:
    c = console(request)
    found = _found(await _view(views.why_not, c.store, c.config.dicom, accession, calling_ae),
                   f"worklist item {accession!r}")
    return {"accession_number": accession, "calling_ae": calling_ae, "queries": found}


@router.get("/calling-aes", summary="Calling AEs whose recent C-FIND identifiers are kept")
async def calling_aes(request: Request) -> dict[str, Any]:
    def read() -> list[str]:
        with console(request).store.reading() as session:
            return views.recorded_calling_aes(session)

    return {"calling_aes": await _view(read)}


@router.get("/messages", summary="Inbound HL7 messages, refused ones first")
async def messages(request: Request, failed: bool = False,
                   limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    return await _view(views.messages, console(request).store, failed_only=failed, limit=limit)


@router.get("/messages/{message_id}", summary="One message, raw, with its ACK")
async def message(message_id: int, request: Request) -> dict[str, Any]:
    return _found(await _view(views.message, console(request).store, message_id),
                  f"inbound message {message_id}")


@router.post("/messages/{message_id}/replay", summary="Replay through the current mapping "
             "(operator)")
async def replay(message_id: int, request: Request) -> dict[str, Any]:
    who = require(request, "operator")
    return await _view(actions.replay, console(request), who.name, message_id)


@router.get("/queues/{queue}", summary="outbox or mpps-forward rows, by state")
async def queue(queue: str, request: Request, state: str | None = None,
                limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    if queue not in views.QUEUES:
        raise HTTPException(404, f"no queue {queue!r} (outbox, mpps-forward)")
    return await _view(views.queue, console(request).store, queue, state=state, limit=limit)


@router.post("/queues/{queue}/retry-failed", summary="Retry every dead letter (operator)")
async def retry_all(queue: str, request: Request) -> dict[str, Any]:
    who = require(request, "operator")
    return await _view(actions.retry, console(request), who.name, queue, None)


@router.post("/queues/{queue}/{row_id}/retry", summary="Retry one dead letter (operator)")
async def retry(queue: str, row_id: int, request: Request) -> dict[str, Any]:
    who = require(request, "operator")
    return await _view(actions.retry, console(request), who.name, queue, row_id)


@router.post("/queues/{queue}/{row_id}/drop", summary="Drop an unsent row (operator)")
async def drop(queue: str, row_id: int, request: Request) -> dict[str, Any]:
    who = require(request, "operator")
    return await _view(actions.drop, console(request), who.name, queue, row_id)


@router.get("/mpps", summary="MPPS records, newest first")
async def mpps_list(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    return await _view(views.mpps_list, console(request).store, limit=limit)


@router.get("/mpps/{uid}", summary="One MPPS with its dataset")
async def mpps_one(uid: str, request: Request) -> dict[str, Any]:
    return _found(await _view(views.mpps_one, console(request).store, uid), f"MPPS {uid}")


def mapping_test(c: Console, raw: bytes) -> dict[str, Any]:
    """What ``worklist-broker mapping-test`` prints, as JSON; nothing is written."""
    from hl7_listener.mapping_report import prepare

    try:
        report = c.services.mapping_report(prepare(raw))
    except Exception as exc:  # the parser's and the mapping's errors name the field
        raise views.BadRequest(f"{getattr(exc, 'reason', None) or exc}") from None
    return views.as_dict(report)


@router.post("/mapping-test", summary="Map an HL7 message (the request body, text) with the "
             "mapping in use; no database write",
             openapi_extra={"requestBody": {"content": {"text/plain": {}}}})
async def mapping(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise HTTPException(400, "the body is empty: send an HL7 message as text")
    return await _view(mapping_test, console(request), raw)


def status(c: Console) -> dict[str, Any]:
    from broker.web.health import parts

    return {
        "parts": parts(c),
        "listeners": [{"name": li.name, "address": li.address, "up": li.up()}
                      for li in c.services.listeners],
        "database": {"backend": c.store.backend, "reachable": views.database_ok(c.store)},
        "open_associations": c.services.open_associations(),
        "ris": {"enabled": c.config.ris.enabled,
                "address": f"{c.config.ris.host}:{c.config.ris.port}",
                **views.ris_link(c.store)},
        "queues": views.queue_depths(c.store),
    }


@router.get("/status", summary="Listeners, database, RIS link, associations open")
async def status_route(request: Request) -> dict[str, Any]:
    return await _view(status, console(request))
