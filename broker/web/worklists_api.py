"""Orthanc-compatible worklist endpoints (the Worklists plugin's REST API, Orthanc 1.12.10):
``POST /worklists/create``, ``GET /worklists``, ``GET/PUT/DELETE /worklists/{id}``.

Scripts written for Orthanc work unchanged: the same bodies (``{"Tags": {...}}`` with DICOM
keywords, or ``"0010,0010"`` tags, sequences as lists of objects), the same answers
(``{"ID", "Path"}``; ``[{"ID", "Tags"}]``; ``?format=Simplify|Human|Short|Full``). The ID is
the item's accession number (unique in the broker) rather than a UUID. A dataset becomes an
item through ``broker.item_dataset`` (the conversion ``import-wl`` uses) and
``broker.orders.apply_order``; DELETE cancels the item (CANCELLED: off the worklist, kept
for the timeline and purged with the others).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.tag import Tag
from sqlalchemy import select

from broker.domain import ItemStatus, Order, OrderControl, PatientData, ProcedureData
from broker.errors import BrokerError, InvalidOrder
from broker.item_dataset import item_dataset, order_from_dataset
from broker.matching import WorklistQuery, find_worklist
from broker.models import WorklistItem
from broker.orders import apply_order, check_order
from broker.web import audit, views
from broker.web.context import Console, console, require

router = APIRouter(tags=["Orthanc-compatible worklists"])

_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["Tags"],
    "properties": {"Tags": {"type": "object", "description": "DICOM keywords (or "
                            "'gggg,eeee') -> values; sequences as lists of objects"},
                   "Force": {"type": "boolean", "description": "skip the Scheduled "
                             "Procedure Step checks (create)"}}},
    "example": {"Tags": {"PatientID": "PID-45", "PatientName": "DOE^JANE",
                         "AccessionNumber": "A1", "ScheduledProcedureStepSequence": [
                             {"Modality": "US", "ScheduledProcedureStepStartDate": "20261129"}]
                         }}}}}}

_FORMATS = {"simplify": "human", "human": "human", "short": "short", "full": "full"}


class TagsError(ValueError):
    pass


def _tag(key: str) -> int:
    if "," in key:
        group, _, element = key.partition(",")
        try:
            return int(Tag(int(group, 16), int(element, 16)))
        except ValueError:
            raise TagsError(f"{key!r} is not a DICOM tag (gggg,eeee)") from None
    tag = tag_for_keyword(key)
    if tag is None:
        raise TagsError(f"unknown DICOM keyword {key!r}")
    return int(tag)


def dataset_from_tags(tags: dict[str, Any], where: str = "Tags") -> Dataset:
    """Orthanc's JSON form of a dataset (keywords or tags; sequences as lists of objects)."""
    ds = Dataset()
    for key, value in tags.items():
        tag = _tag(key)
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise TagsError(f"{where}.{key}: not in the DICOM dictionary") from None
        if vr == "SQ":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise TagsError(f"{where}.{key}: a sequence is a list of objects")
            ds.add_new(tag, vr, [dataset_from_tags(v, f"{where}.{key}[{i}]")
                                 for i, v in enumerate(value)])
        elif value is None:
            ds.add_new(tag, vr, None)
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            ds.add_new(tag, vr, str(value))
        elif isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            ds.add_new(tag, vr, "\\".join(str(v) for v in value))
        else:
            raise TagsError(f"{where}.{key}: expected a string, a number or a list of them")
    return ds


def tags_from_dataset(ds: Dataset, fmt: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for element in ds:
        if element.VR == "SQ":
            value: Any = [tags_from_dataset(item, fmt) for item in element.value]
            kind = "Sequence"
        else:
            raw = element.value
            value = "" if raw is None else ("\\".join(str(v) for v in raw)
                                            if type(raw).__name__ == "MultiValue" else str(raw))
            kind = "String"
        short = f"{element.tag.group:04x},{element.tag.element:04x}"
        if fmt == "human":
            out[element.keyword or short] = value
        elif fmt == "short":
            out[short] = value
        else:
            out[short] = {"Name": element.keyword or keyword_for_tag(element.tag) or "",
                          "Type": kind, "Value": value}
    return out


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "HttpStatus": status}, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TagsError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("Tags"), dict):
        raise TagsError("'Tags' field is missing or not a JSON object")
    return body


def _order(body: dict[str, Any], *, control: OrderControl, accession: str | None = None,
           ) -> Order:
    tags = dict(body["Tags"])
    tags.pop("SpecificCharacterSet", None)  # values arrive as JSON text, i.e. Unicode
    if accession is not None:
        given = tags.get("AccessionNumber", tags.get("0008,0050"))
        if given in (None, ""):
            tags["AccessionNumber"] = accession
        elif given != accession:
            raise TagsError(f"AccessionNumber {given!r} differs from the worklist ID "
                            f"{accession!r}: the ID stays; delete and create to change it")
    ds = dataset_from_tags(tags)
    if not body.get("Force", control is OrderControl.CHANGE):
        # The plugin's own checks on create, bypassed with "Force": true as there.
        steps = ds.get("ScheduledProcedureStepSequence")
        if not steps:
            raise TagsError("'Tags' is missing a 'ScheduledProcedureStepSequence' (use "
                            "'Force': true to bypass this check)")
        for keyword in ("Modality", "ScheduledProcedureStepStartDate"):
            if not steps[0].get(keyword):
                raise TagsError(f"'ScheduledProcedureStepSequence' is missing a '{keyword}' "
                                "(use 'Force': true to bypass this check)")
    try:
        order = order_from_dataset(ds)
    except (BrokerError, ValueError, AttributeError, TypeError) as exc:
        raise TagsError(str(exc)) from None
    if not order.procedure.accession_number:
        raise TagsError("AccessionNumber is missing: the broker keys every item by it")
    try:
        check_order(order)  # before the item is looked up: a NUL fails that on PostgreSQL
    except InvalidOrder as exc:
        raise TagsError(exc.reason) from None
    # PUT replaces the item's attributes (Orthanc's plugin rewrites the whole file).
    return Order(control, order.patient, order.procedure, message_control_id="rest-api",
                 replace=control is OrderControl.CHANGE)


def _exists(session: Any, accession: str) -> WorklistItem | None:
    return session.scalars(select(WorklistItem).where(
        WorklistItem.accession_number == accession)).one_or_none()


def _store_order(c: Console, request: Request, order: Order, action: str,
                 *, must_be_new: bool) -> JSONResponse:
    accession = order.procedure.accession_number
    try:
        with c.store.writing() as session:
            existing = _exists(session, accession)
            if must_be_new and existing is not None and existing.status != ItemStatus.CANCELLED:
                return _error(409, f"an item with AccessionNumber {accession!r} exists; "
                              f"PUT /worklists/{accession} changes it")
            if order.control is OrderControl.CHANGE and existing is None:
                order = replace(order, control=OrderControl.NEW)
            apply_order(session, order, uid_root=c.services.uid_root,
                        reporting=c.config.ris.status_messages.reporting())
            audit.record(session, c.services.audit, user=request.state.principal.name,
                         action=action,
                         accession_number=accession, target=f"worklist item {accession}",
                         detail=json.dumps({"Tags": request.state.tags}, sort_keys=True)[:4000])
    except BrokerError as exc:
        return _error(400, str(exc))
    return JSONResponse({"ID": accession, "Path": f"/worklists/{accession}"})


@router.post("/worklists/create", summary="Create a worklist item from DICOM tags",
             openapi_extra=_BODY)
async def create(request: Request) -> JSONResponse:
    c = console(request)
    require(request, "operator")
    try:
        body = await _body(request)
        request.state.tags = body["Tags"]
        order = _order(body, control=OrderControl.NEW)
    except TagsError as exc:
        return _error(400, str(exc))
    return await _run(_store_order, c, request, order, "worklist-create", must_be_new=True)


@router.put("/worklists/{worklist_id}", summary="Replace a worklist item's attributes",
            openapi_extra=_BODY)
async def modify(worklist_id: str, request: Request) -> JSONResponse:
    c = console(request)
    require(request, "operator")
    try:
        body = await _body(request)
        request.state.tags = body["Tags"]
        order = _order(body, control=OrderControl.CHANGE, accession=worklist_id)
    except TagsError as exc:
        return _error(400, str(exc))
    return await _run(_store_order, c, request, order, "worklist-modify", must_be_new=False)


def _delete(c: Console, request: Request, worklist_id: str) -> JSONResponse:
    with c.store.writing() as session:
        item = _exists(session, worklist_id)
        if item is None or item.status == ItemStatus.CANCELLED:
            return _error(404, f"no worklist {worklist_id!r}")
        apply_order(session, Order(OrderControl.CANCEL, PatientData(item.patient.patient_id),
                                   ProcedureData(worklist_id), message_control_id="rest-api"),
                    uid_root=c.services.uid_root,
                    reporting=c.config.ris.status_messages.reporting())
        audit.record(session, c.services.audit, user=request.state.principal.name,
                     action="worklist-delete",
                     accession_number=worklist_id, target=f"worklist item {worklist_id}",
                     detail="cancelled (status CANCELLED)")
    return JSONResponse({})


@router.delete("/worklists/{worklist_id}", summary="Delete (cancel) a worklist item")
async def delete(worklist_id: str, request: Request) -> JSONResponse:
    require(request, "operator")
    return await _run(_delete, console(request), request, worklist_id)


def _format(request: Request) -> str | None:
    return _FORMATS.get(request.query_params.get("format", "human").lower())


def _one(c: Console, worklist_id: str, fmt: str) -> JSONResponse:
    row = views.find_item(c.store, worklist_id)
    if row is None or row.status == ItemStatus.CANCELLED:
        return _error(404, f"no worklist {worklist_id!r}")
    return JSONResponse({"ID": worklist_id,
                         "Tags": tags_from_dataset(item_dataset(row), fmt)})


def _all(c: Console, fmt: str) -> JSONResponse:
    visible = tuple(ItemStatus(s) for s in c.config.dicom.visible_statuses)
    with c.store.reading() as session:
        rows = find_worklist(session, WorklistQuery(statuses=visible, limit=100_000))
    return JSONResponse([{"ID": row.procedure.accession_number,
                          "Tags": tags_from_dataset(item_dataset(row), fmt)} for row in rows])


@router.get("/worklists/{worklist_id}", summary="One worklist item as DICOM tags")
async def get_one(worklist_id: str, request: Request) -> JSONResponse:
    fmt = _format(request)
    if fmt is None:
        return _error(400, "format is one of Simplify, Human, Short, Full")
    return await _run(_one, console(request), worklist_id, fmt)


@router.get("/worklists", summary="Every worklist item a modality can see, as DICOM tags")
async def get_all(request: Request) -> JSONResponse:
    fmt = _format(request)
    if fmt is None:
        return _error(400, "format is one of Simplify, Human, Short, Full")
    return await _run(_all, console(request), fmt)


async def _run(function: Any, *args: Any, **kwargs: Any) -> Any:
    # Database work off the event loop.
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args, **kwargs)
