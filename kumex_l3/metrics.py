"""Prometheus metrics, the same way in every service.

Each service owns one :class:`~prometheus_client.CollectorRegistry` (never the
global default one: tests build many services in one process) made by
:func:`make_registry`, declares its metrics on it, and serves it at
``GET /metrics`` with :func:`metrics_router` (FastAPI) or renders it itself
with :func:`render`::

    registry = make_registry()
    received = Counter("kumex_feed_messages_received", "...", ["symbol"], registry=registry)
    app.include_router(metrics_router(registry))

Metric names start with ``kumex_<service>_``; counters get Prometheus'
``_total`` suffix from the client library.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "make_registry", "metrics_router", "render"]

#: The ``Content-Type`` of :func:`render`'s output (Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_LATEST


def make_registry(*, process: bool = True) -> CollectorRegistry:
    """A fresh registry; with ``process``, the usual process/Python/GC metrics are on it."""
    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE


def metrics_router(registry: CollectorRegistry, path: str = "/metrics") -> APIRouter:
    """A FastAPI router serving ``GET {path}`` from ``registry``."""
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = render(registry)
        return Response(content=body, media_type=content_type)

    return router
