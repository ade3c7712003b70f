"""What every console route reaches through ``request.app.state``: one place, no globals."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.templating import Jinja2Templates

from broker.config import BrokerConfig
from broker.store import Store
from broker.web.security import Guard, Principal, may
from broker.web.services import ConsoleServices


@dataclass(frozen=True)
class Console:
    store: Store
    config: BrokerConfig
    services: ConsoleServices
    guard: Guard
    templates: Jinja2Templates


def console(request: Request) -> Console:
    return request.app.state.console


def principal(request: Request) -> Principal:
    return request.state.principal


def require(request: Request, role: str) -> Principal:
    """The caller, if their role may do this; else 403 naming the role needed."""
    who = principal(request)
    if not may(who.role, role):
        raise HTTPException(403, f"user {who.name!r} ({who.role}) may not do this: it needs "
                            f"the {role} role")
    return who
