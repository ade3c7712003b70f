"""Server-rendered pages. "One view, two faces": each page asks ``broker.web.views`` (or
the API's functions) one question and renders the answer, or returns it as JSON when asked
with ``?format=json`` or ``Accept: application/json``."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from broker.web import actions, views
from broker.web.api import mapping_test, status
from broker.web.context import console, require
from broker.web.security import csrf_ok

router = APIRouter(include_in_schema=False)

NAV = [("worklist", "Worklist"), ("messages", "Messages"), ("queues", "Queues"),
       ("mapping", "Mapping tester"), ("status", "Status"), ("audit", "Audit")]


def wants_json(request: Request) -> bool:
    return (request.query_params.get("format") == "json"
            or request.headers.get("accept", "").startswith("application/json"))


def render(request: Request, template: str, data: dict[str, Any], *, title: str,
           section: str, status_code: int = 200) -> Response:
    if wants_json(request):
        return JSONResponse(data, status_code=status_code)
    session = getattr(request.state, "session", None)
    principal = getattr(request.state, "principal", None)
    c = console(request)
    return c.templates.TemplateResponse(request, template, {
        "data": data, "title": title, "section": section, "nav": NAV,
        "user": principal, "csrf": session.csrf if session else "",
        "open_console": c.guard.open, "note": request.query_params.get("note"),
        "refresh": c.config.web.refresh_seconds,
    }, status_code=status_code)


def error_page(request: Request, status_code: int, message: str) -> Response:
    return render(request, "error.html", {"error": message, "status": status_code},
                  title=f"Error {status_code}", section="", status_code=status_code)


async def _data(function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await run_in_threadpool(function, *args, **kwargs)
    except views.BadRequest as exc:
        raise HTTPException(400, str(exc)) from None


async def _form(request: Request) -> dict[str, str]:
    """The posted form, after checking its CSRF token against the session's."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    if not csrf_ok(getattr(request.state, "session", None), form.get("csrf")):
        raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page "
                            "and try again")
    return form


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        raise HTTPException(400, f"{text!r} is not a number") from None


def _back(path: str, note: str) -> RedirectResponse:
    sep = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{sep}{urlencode({'note': note})}", status_code=303)


# --- login ----------------------------------------------------------------------------

def _safe_next(target: str | None) -> str:
    # Only paths of this site: no open redirect to another host.
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/worklist"
    return target


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> Response:
    return render(request, "login.html", {"next": _safe_next(next), "error": None},
                  title="Log in", section="login")


@router.post("/login")
async def login(request: Request) -> Response:
    from broker.web.app import client_of, set_session_cookie

    c = console(request)
    form = {k: str(v) for k, v in (await request.form()).items()}
    name, password = form.get("name", ""), form.get("password", "")
    target = _safe_next(form.get("next"))
    wait = c.guard.wait_seconds(name, client_of(request))
    if wait > 0:
        return render(request, "login.html", {"next": target, "error":
                      f"Too many failed attempts: wait {wait:.0f} s and try again."},
                      title="Log in", section="login", status_code=429)
    who = await run_in_threadpool(c.guard.check, name, password, client_of(request))
    if who is None and not c.guard.open:
        # A fixed pause on top of the growing wait: scripted guessing gains nothing.
        await asyncio.sleep(0.5)
        return render(request, "login.html", {"next": target, "error":
                      "Wrong user name or password."}, title="Log in", section="login",
                      status_code=401)
    from broker.web.security import Principal

    token, _ = c.guard.new_session(who or Principal("anonymous", "admin"))
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(response, token, c.config.web.secure_cookie)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    from broker.web.app import COOKIE

    await _form(request)
    console(request).guard.end_session(request.cookies.get(COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# --- pages ----------------------------------------------------------------------------

@router.get("/")
async def home() -> Response:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/worklist")
async def worklist(request: Request) -> Response:
    q = request.query_params
    search = (q.get("search") or "").strip()
    # One search box: an accession, a patient ID or a name, whichever finds something.
    data = None
    kwargs: dict[str, Any] = {
        "date": q.get("date") or None, "modality": q.get("modality") or None,
        "station": q.get("station") or None, "status": q.get("status") or None,
        "page": _int(q.get("page"), 1), "page_size": _int(q.get("page_size"), 100)}
    if search:
        for key in ("accession", "patient_id", "patient_name"):
            data = await _data(views.worklist, console(request).store, **kwargs,
                               **{key: search})
            if data["total"]:
                break
    else:
        data = await _data(views.worklist, console(request).store, **kwargs)
    data["search"] = search
    data["today"] = dt.date.today().isoformat()
    return render(request, "worklist.html", data, title="Worklist", section="worklist")


@router.get("/orders/{accession}")
async def order(accession: str, request: Request) -> Response:
    c = console(request)
    data = await _data(views.order, c.store, accession, dicom=c.config.dicom,
                       calling_ae=request.query_params.get("calling_ae") or None)
    if data is None:
        raise HTTPException(404, f"no worklist item with accession number {accession!r}")
    return render(request, "order.html", data, title=f"Order {accession}", section="worklist")


@router.get("/mpps/{uid}")
async def mpps(uid: str, request: Request) -> Response:
    data = await _data(views.mpps_one, console(request).store, uid)
    if data is None:
        raise HTTPException(404, f"no MPPS {uid}")
    return render(request, "mpps.html", data, title=f"MPPS {uid}", section="worklist")


@router.get("/audit")
async def audit_trail(request: Request) -> Response:
    # Who saw which patient's data is for administrators (the security officer).
    require(request, "admin")
    params = request.query_params
    data = await _data(views.audit_events, console(request).store,
                       accession=params.get("accession"), actor=params.get("actor"),
                       limit=_int(params.get("limit"), 200))
    return render(request, "audit.html", data, title="Audit trail", section="audit")


@router.get("/messages")
async def messages(request: Request) -> Response:
    failed = request.query_params.get("failed") in ("1", "true")
    data = await _data(views.messages, console(request).store, failed_only=failed)
    return render(request, "messages.html", data, title="Messages", section="messages")


@router.get("/messages/{message_id}")
async def message(message_id: int, request: Request) -> Response:
    data = await _data(views.message, console(request).store, message_id)
    if data is None:
        raise HTTPException(404, f"no inbound message {message_id}")
    return render(request, "message.html", data, title=f"Message {message_id}",
                  section="messages")


@router.post("/messages/{message_id}/replay")
async def replay(message_id: int, request: Request) -> Response:
    await _form(request)
    who = require(request, "operator")
    result = await _data(actions.replay, console(request), who.name, message_id)
    note = (f"Replayed: {result['ack_code'] or 'processed'}"
            + (f" — {result['ack_text']}" if result["ack_text"] else ""))
    return _back(f"/messages/{message_id}", note)


@router.get("/queues")
async def queues(request: Request) -> Response:
    data = await _data(views.queues, console(request).store)
    return render(request, "queues.html", data, title="Queues", section="queues")


@router.post("/queues/{queue}/{row_id}/{action}")
async def queue_action(queue: str, row_id: int, action: str, request: Request) -> Response:
    await _form(request)
    who = require(request, "operator")
    if action == "retry":
        await _data(actions.retry, console(request), who.name, queue, row_id)
        return _back("/queues", f"{queue} {row_id} will be sent again")
    if action == "drop":
        await _data(actions.drop, console(request), who.name, queue, row_id)
        return _back("/queues", f"{queue} {row_id} dropped")
    raise HTTPException(404, f"no action {action!r} (retry, drop)")


@router.get("/mapping")
async def mapping_form(request: Request) -> Response:
    return render(request, "mapping.html", {"message": "", "report": None, "error": None},
                  title="Mapping tester", section="mapping")


@router.post("/mapping")
async def mapping(request: Request) -> Response:
    form = await _form(request)
    text = form.get("message", "")
    data: dict[str, Any] = {"message": text, "report": None, "error": None}
    try:
        data["report"] = await run_in_threadpool(
            mapping_test, console(request), text.replace("\r\n", "\r").replace("\n", "\r")
            .encode("utf-8"))
    except views.BadRequest as exc:
        data["error"] = str(exc)
    return render(request, "mapping.html", data, title="Mapping tester", section="mapping",
                  status_code=200 if data["error"] is None else 400)


@router.get("/status")
async def status_page(request: Request) -> Response:
    data = await _data(status, console(request))
    return render(request, "status.html", data, title="Status", section="status")


def order_link(accession: str) -> str:
    return f"/orders/{quote(accession, safe='')}"
