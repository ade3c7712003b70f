"""``GET /health`` and ``GET /metrics``: no login, for load balancers and Prometheus."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from broker import metrics
from broker.web import views
from broker.web.context import Console, console

router = APIRouter(tags=["health"])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parts(c: Console) -> dict[str, str]:
    out = {"database": "ok" if views.database_ok(c.store) else "unreachable"}
    for listener in c.services.listeners:
        out[listener.name] = "up" if listener.up() else "down"
    return out


@router.get("/health", summary="200 when the database answers and every listener is up")
async def health(request: Request) -> JSONResponse:
    found = await run_in_threadpool(parts, console(request))
    healthy = all(state in ("ok", "up") for state in found.values())
    return JSONResponse({"status": "ok" if healthy else "unavailable", **found},
                        status_code=200 if healthy else 503)


class QueueCollector(Collector):
    """Queue depths read from the database at scrape time: brokers sharing one PostgreSQL
    all report the same numbers."""

    def __init__(self, c: Console) -> None:
        self.c = c

    def collect(self) -> Iterator[GaugeMetricFamily]:
        prefix = metrics.PREFIX
        depth = GaugeMetricFamily(f"{prefix}_queue_depth", "Rows per delivery queue and state",
                                  labels=["queue", "state"])
        age = GaugeMetricFamily(f"{prefix}_queue_oldest_pending_age_seconds",
                                "Age of the oldest pending row per queue (0: none)",
                                labels=["queue"])
        dead = GaugeMetricFamily(f"{prefix}_dead_letters",
                                 "Dead-lettered rows (state failed) per queue",
                                 labels=["queue"])
        up = GaugeMetricFamily(f"{prefix}_database_up", "1 if the database answered")
        try:
            depths = views.queue_depths(self.c.store)
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for queue, info in depths.items():
            for state, count in info["states"].items():
                depth.add_metric([queue, state], count)
            age.add_metric([queue], info["oldest_pending_age_seconds"])
            dead.add_metric([queue], info["states"]["failed"])
        yield from (depth, age, dead, up)


@router.get("/metrics", summary="Prometheus text format, every name worklist_broker_*")
async def prometheus(request: Request) -> Response:
    c = console(request)
    registry: CollectorRegistry | None = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(QueueCollector(c))
        request.app.state.metrics_registry = registry
    own = registry
    body = await run_in_threadpool(
        lambda: generate_latest(metrics.REGISTRY) + generate_latest(own))
    return Response(body, media_type=CONTENT_TYPE)
