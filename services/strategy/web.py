"""The strategy's small HTTP server: ``/healthz``, ``/readyz``, ``/metrics``, ``/state``.

* ``GET /healthz``: 200 while the process runs.
* ``GET /readyz``: 200 once the grid is rebuilt and placed, else 503.
* ``GET /metrics``: Prometheus text (:mod:`services.strategy.metrics`).
* ``GET /state``: the grid: centre, position, open own orders, last event id.

uvicorn runs inside the strategy's event loop (:func:`kumex_l3.service.start_server`)
without its own signal handlers: ``main()`` owns SIGTERM/SIGINT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from kumex_l3.service import service_app

__all__ = ["make_app"]


def make_app(status: Callable[[], dict[str, Any]], registry: CollectorRegistry) -> FastAPI:
    """The app; ``status()`` is the ``/state`` body, with at least ``ready``."""
    app = service_app("kumex-l3 strategy", status, registry, details=False)

    @app.get("/state")
    async def state() -> JSONResponse:
        return JSONResponse(status())

    return app
