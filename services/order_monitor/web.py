"""The order monitor's small HTTP server: ``/healthz``, ``/readyz``, ``/metrics``.

* ``GET /healthz``: 200 while the process runs.
* ``GET /readyz``: 200 once the symbol leases are being managed and every symbol
  this replica holds has its consumer started (group ensured, pending entries
  handled again), else 503; the body shows each symbol's state. A replica
  holding no symbol (a standby) is ready.
* ``GET /metrics``: Prometheus text (:mod:`kumex_l3.metrics`).

uvicorn runs inside the service's event loop (:func:`start_server`) without
signal handlers of its own: ``main()`` owns SIGTERM/SIGINT.
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
    """The app; ``status()`` returns at least ``{"ready": bool}`` (plus details shown as is)."""
    app = FastAPI(title="kumex-l3 order monitor", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = status()
        return JSONResponse(body, status_code=200 if body.get("ready") else 503)

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


async def start_server(app: FastAPI, host: str, port: int) -> tuple[HttpServer, asyncio.Task[None]]:
    """Serve ``app`` in this loop; returns once listening (raises ``OSError`` if it cannot)."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="off", ws="none")
    server = HttpServer(config)
    task = asyncio.create_task(server.serve(), name="order-monitor-http")
    while not server.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise OSError(f"HTTP server on {host}:{port} did not start: {exc!r}")
        await asyncio.sleep(0.01)
    return server, task
