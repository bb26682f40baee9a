"""The sandbox's ASGI application: the venue's REST and WebSocket, plus controls.

:func:`create_app` wires one :class:`~services.sandbox.exchange.Exchange`
into FastAPI: the ``/api/...`` REST router behind
:class:`~services.sandbox.rest.ApiShell` (REST faults and latency; the routes are
:mod:`services.sandbox.api`), the
WebSocket ``/endpoint`` of the hub, the ``/sandbox/...`` control API and
``/healthz``. The lifespan primes the books and runs the flow task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from services.sandbox import api, control
from services.sandbox.exchange import Exchange
from services.sandbox.rest import ApiShell, install_error_handlers
from services.sandbox.settings import SandboxSettings

__all__ = ["create_app"]


def create_app(settings: SandboxSettings, exchange: Exchange | None = None) -> FastAPI:
    """The sandbox application for ``settings`` (``exchange``: a prebuilt one, for tests)."""
    ex = exchange if exchange is not None else Exchange(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ex.start()
        try:
            yield
        finally:
            await ex.stop()

    app = FastAPI(
        title="KuMEX sandbox exchange",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.exchange = ex
    install_error_handlers(app)
    app.add_middleware(ApiShell, exchange=ex)
    app.include_router(api.router)
    app.include_router(ex.hub.router)
    app.include_router(control.router)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "sequences": ex.sequences()})

    return app
