"""The console's ASGI app: built by :func:`create_app` from the store, the config and the
live services of the serve process; ``broker.app`` runs it.

Who may see what is decided once, in a middleware, by path:
- ``/health``, ``/metrics``, ``/login`` and ``/static`` are public;
- the API (``/api/...``, the Orthanc-compatible ``/worklists...``, the OpenAPI document)
  takes HTTP Basic (or a console session for reads): none -> 401 with
  ``WWW-Authenticate``;
- every page takes a session cookie: none -> a redirect to the login form.
With no ``web.users`` (allowed on loopback only) everyone is an administrator, and a page
visit still gets a session so that its forms carry a CSRF token.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import DataError
from starlette.middleware.base import BaseHTTPMiddleware

from broker.config import BrokerConfig
from broker.store import Store
from broker.web import api, health, pages, worklists_api
from broker.web.context import Console
from broker.web.security import Guard, Principal, Session
from broker.web.services import ConsoleServices

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "wlb_session"
_PUBLIC = ("/health", "/metrics", "/login", "/static/", "/favicon.ico")
_API = ("/api/", "/worklists", "/openapi.json", "/docs")
_OPEN = Principal("anonymous", "admin")


def _is(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in prefixes)


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8"
                                                                              ).partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (name, password) if sep else None


def _cross_site(request: Request) -> bool:
    """A browser names the page's origin on every cross-origin POST/PUT/DELETE; scripts
    (curl, httpx) send none."""
    origin = request.headers.get("origin")
    if origin is None:
        return request.headers.get("sec-fetch-site") == "cross-site"
    return urlsplit(origin).netloc != request.headers.get("host", "")


def _unauthorized(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=401,
                        headers={"WWW-Authenticate": 'Basic realm="worklist-broker"'})


class AuthMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: FastAPI, guard: Guard, secure_cookie: bool) -> None:
        super().__init__(app)
        self.guard = guard
        self.secure_cookie = secure_cookie

    async def dispatch(self, request: Request,
                       call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if request.method not in ("GET", "HEAD", "OPTIONS") and _cross_site(request):
            # Another site's page posting to this console (the open console on loopback
            # has no password to stop it): refused whatever the credentials.
            return JSONResponse({"error": "cross-site request refused"}, status_code=403)
        session: Session | None = self.guard.session(request.cookies.get(COOKIE))
        request.state.session = session
        request.state.principal = session.principal if session else None
        if _is(path, _PUBLIC):
            return await call_next(request)
        if _is(path, _API):
            credentials = _basic(request)
            if credentials is not None and not self.guard.open:
                name, password = credentials
                wait = self.guard.wait_seconds(name, client_of(request))
                if wait > 0:
                    return JSONResponse(
                        {"error": f"too many failed logins; try again in {wait:.0f} s"},
                        status_code=429, headers={"Retry-After": str(int(wait) + 1)})
                who = self.guard.check(name, password, client_of(request))
                if who is None:
                    return _unauthorized("wrong user name or password")
                request.state.principal = who
                request.state.via_basic = True
                return await call_next(request)
            if self.guard.open:
                request.state.principal = _OPEN
                request.state.via_basic = True
                return await call_next(request)
            if session is not None and request.method in ("GET", "HEAD"):
                return await call_next(request)
            return _unauthorized("credentials required (HTTP Basic)")
        # Pages.
        new_token = None
        if session is None and self.guard.open:
            new_token, session = self.guard.new_session(_OPEN)
            request.state.session = session
            request.state.principal = _OPEN
        if session is None:
            target = path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        response = await call_next(request)
        if new_token is not None:
            set_session_cookie(response, new_token, self.secure_cookie)
        return response


def set_session_cookie(response: Response, token: str, secure: bool) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="lax", secure=secure,
                        path="/")


def create_app(store: Store, config: BrokerConfig, services: ConsoleServices) -> FastAPI:
    """The console for one broker; ``services`` are the live parts it reports on."""
    app = FastAPI(title="worklist-broker", version=_version(),
                  description="Operator console and REST API of worklist-broker "
                  "(docs/rest-api.md).", docs_url="/docs", redoc_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    guard = Guard(config.web, audit=services.audit)
    app.state.console = Console(store, config, services, guard, templates)
    app.add_middleware(AuthMiddleware, guard=guard, secure_cookie=config.web.secure_cookie)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(health.router)
    app.include_router(api.router)
    app.include_router(worklists_api.router)
    app.include_router(pages.router)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if _is(request.url.path, _API) or pages.wants_json(request):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                                headers=exc.headers)
        return pages.error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> Response:
        # A request carrying a value the database cannot take (a NUL character in a search
        # or an ID on PostgreSQL): the request is wrong, not the server.
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return await _http_error(request, HTTPException(
            400, f"the database cannot take a value of this request: {reason}"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in exc.errors())
        if _is(request.url.path, _API) or pages.wants_json(request):
            return JSONResponse({"error": problems}, status_code=400)
        return PlainTextResponse(problems, status_code=400)

    return app


def _version() -> str:
    from broker import __version__

    return __version__
