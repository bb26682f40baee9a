"""The strategy's small HTTP server: ``/healthz``, ``/readyz``, ``/metrics``, ``/state``.

* ``GET /healthz``: 200 while the process runs.
* ``GET /readyz``: 200 once the grid is rebuilt and placed, else 503.
* ``GET /metrics``: Prometheus text (:mod:`services.strategy.metrics`).
* ``GET /state``: the grid: centre, position, open own orders, last event id.

uvicorn runs inside the strategy's event loop without its own signal
handlers: ``main()`` owns SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from kumex_l3.metrics import metrics_router

__all__ = ["HttpServer", "make_app", "start_server"]


def make_app(status: Callable[[], dict[str, Any]], registry: CollectorRegistry) -> FastAPI:
    """The app; ``status()`` is the ``/state`` body, with at least ``ready``."""
    app = FastAPI(title="kumex-l3 strategy", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = bool(status().get("ready"))
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/state")
    async def state() -> JSONResponse:
        return JSONResponse(status())

    app.include_router(metrics_router(registry))
    return app


class HttpServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int | None:
        """The bound port once started (useful with port 0)."""
        for server in self.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None


async def start_server(app: FastAPI, host: str,
                       port: int) -> tuple[HttpServer, asyncio.Task[None]]:
    """Serve ``app`` in this loop; returns once listening (raises if it could not bind)."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="off", ws="none")
    server = HttpServer(config)
    task = asyncio.create_task(server.serve(), name="strategy-http")
    while not server.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise OSError(f"HTTP server on {host}:{port} did not start: {exc!r}")
        await asyncio.sleep(0.01)
    return server, task
