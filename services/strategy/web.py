"""The strategy's small HTTP server: ``/healthz``, ``/readyz``, ``/metrics``, ``/state``.

* ``GET /healthz``: 200 while the process runs.
* ``GET /readyz``: 200 once the grid is rebuilt and placed, else 503.
* ``GET /metrics``: Prometheus text (:mod:`services.strategy.metrics`).
* ``GET /state``: the grid: centre, position, open own orders, last event id;
  with ``STRATEGY_API_TOKEN`` (``Authorization: Bearer`` or ``?token=``), or
  without one only on a loopback address (:mod:`kumex_l3.access`): 401 or 403
  otherwise.

uvicorn runs inside the strategy's event loop (:func:`kumex_l3.service.start_server`)
without its own signal handlers: ``main()`` owns SIGTERM/SIGINT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from kumex_l3.access import Guard, presented_token
from kumex_l3.service import service_app

__all__ = ["make_app"]


def make_app(status: Callable[[], dict[str, Any]], registry: CollectorRegistry,
             guard: Guard) -> FastAPI:
    """The app; ``status()`` is the ``/state`` body, with at least ``ready``."""
    app = service_app("kumex-l3 strategy", status, registry, details=False)

    @app.get("/state")
    async def state(request: Request) -> JSONResponse:
        if not guard.allows(presented_token(request.headers, request.query_params)):
            return JSONResponse(
                {"detail": guard.refusal("the grid's state", "STRATEGY_API_TOKEN")},
                status_code=403 if guard.policy == "off" else 401,
                headers={"WWW-Authenticate": "Bearer"} if guard.policy == "token" else None)
        return JSONResponse(status())

    return app
