"""The process shell every service shares: HTTP server, health endpoints, signals.

Two ways to run a service, both ending with exit status 0 on SIGTERM/SIGINT:

* **The service owns its event loop** (feed, order monitor, strategy).
  ``__main__`` calls :func:`run_service`: settings from the environment
  (:func:`configure`: a bad value exits 2 naming the variable), logging, then
  ``main(settings, stop)`` in a fresh loop where SIGTERM/SIGINT set ``stop``
  (:func:`run_until_stopped`); the process exits with what ``main`` returns.
  Inside, :func:`start_server` serves a small app (:func:`service_app`:
  ``/healthz``, ``/readyz``, ``/metrics``) in that same loop with
  :class:`HttpServer`, a uvicorn server that leaves signals to the process.
* **uvicorn owns the loop** (book, sandbox: the app's lifespan does the
  work). :func:`serve_app` runs :class:`ProcessServer`, which stops gracefully
  on those signals and lets the process exit normally instead of dying of the
  signal, as uvicorn itself would have it.

Both run on uvloop's event loop when it is installed (a dependency on Linux
and macOS: it cuts the CPU each message costs in every service, see
docs/BENCHMARKS.md), else on asyncio's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, Literal, NoReturn, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from kumex_l3.config import CommonSettings, load_settings
from kumex_l3.httpserver import http_protocol
from kumex_l3.logs import kv, secrets_of, setup_logging
from kumex_l3.metrics import metrics_router

__all__ = [
    "STOP_SIGNALS",
    "HttpServer",
    "ProcessServer",
    "Status",
    "configure",
    "health_router",
    "http_protocol",
    "loop_factory",
    "loop_name",
    "run_service",
    "run_until_stopped",
    "serve_app",
    "service_app",
    "start_server",
]

#: The signals that ask a service to stop cleanly.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)

_S = TypeVar("_S", bound=CommonSettings)

#: ``status()`` of a service: at least ``{"ready": bool}``, plus details shown as is.
Status = Callable[[], Mapping[str, Any]]


# --------------------------------------------------------------------------- HTTP


def health_router(status: Status, *, details: bool = True) -> APIRouter:
    """``GET /healthz`` and ``GET /readyz`` of a service.

    ``/healthz`` is 200 while the process runs. ``/readyz`` is 200 when
    ``status()["ready"]`` is true, else 503; its body is ``status()`` itself,
    or only ``{"ready": bool}`` without ``details``.
    """
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        body = status()
        ready = bool(body.get("ready"))
        shown = dict(body) if details else {"ready": ready}
        return JSONResponse(shown, status_code=200 if ready else 503)

    return router


def service_app(title: str, status: Status, registry: CollectorRegistry, *,
                details: bool = True) -> FastAPI:
    """A service's small app: :func:`health_router` and ``/metrics`` from ``registry``.

    No OpenAPI schema nor docs pages; a service adds its own routes to the result.
    """
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(health_router(status, details=details))
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


async def start_server(app: FastAPI, host: str, port: int, *,
                       name: str = "http") -> tuple[HttpServer, asyncio.Task[None]]:
    """Serve ``app`` in this loop as task ``name``; returns once listening.

    Raises ``OSError`` if the server could not start (the port taken, say).
    Stop it with ``server.should_exit = True`` and awaiting the task.
    """
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="off", ws="none", http=http_protocol())
    server = HttpServer(config)
    task = asyncio.create_task(server.serve(), name=name)
    while not server.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise OSError(f"HTTP server on {host}:{port} did not start: {exc!r}")
        await asyncio.sleep(0.01)
    return server, task


#: Bound on ``before_shutdown``: a clean stop never hangs on it.
_BEFORE_SHUTDOWN_S: Final = 20.0


class ProcessServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT ends in a normal exit (status 0).

    uvicorn shuts down gracefully on those signals (lifespan shutdown
    included) and then raises the signal again, so the process would die of
    it; a service that stopped cleanly should say so with its exit status.
    """

    def __init__(self, config: uvicorn.Config,
                 before_shutdown: Callable[[], Awaitable[object]] | None = None) -> None:
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Run ``before_shutdown`` while the server still answers (the book hands its
        symbols off there, proxying to their next owners meanwhile), then uvicorn's."""
        if self.before_shutdown is not None and not self.force_exit:
            try:
                async with asyncio.timeout(_BEFORE_SHUTDOWN_S):
                    await self.before_shutdown()
            except Exception:
                logging.getLogger(__name__).exception("before shutdown failed")
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals can only be handled in the main thread.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve_app(config: uvicorn.Config,
              before_shutdown: Callable[[], Awaitable[object]] | None = None) -> bool:
    """Run a :class:`ProcessServer` until SIGTERM/SIGINT; whether it had started."""
    server = ProcessServer(config, before_shutdown)
    server.run()
    return server.started


# --------------------------------------------------------------------------- __main__


def configure(settings_type: type[_S], service: str) -> _S:
    """The settings from the environment, and logging set up for ``service``.

    Exits with status 2 and a message naming the variable on a bad value
    (``LOG_LEVEL`` included).
    """
    settings = load_settings(settings_type)
    try:
        setup_logging(settings.log_level, service, secrets=secrets_of(settings))
    except ValueError as exc:
        sys.stderr.write(f"invalid configuration for {settings_type.__name__}:\n"
                         f"  LOG_LEVEL: {exc}\n")
        raise SystemExit(2) from None
    return settings


def loop_name(choice: str = "auto") -> Literal["uvloop", "asyncio"]:
    """The event loop to run on (``KUMEX_EVENT_LOOP``): ``auto`` is uvloop when installed.

    Also what uvicorn's ``Config(loop=...)`` takes. Raises ``ValueError`` when
    ``uvloop`` is asked for and not installed, or for an unknown name.
    """
    if choice == "asyncio":
        return "asyncio"
    if choice not in ("auto", "uvloop"):
        raise ValueError(f"unknown event loop {choice!r} (auto, uvloop or asyncio)")
    if importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    if choice == "uvloop":
        raise ValueError("uvloop is not installed")
    return "asyncio"  # Windows, or installed without it


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop function for :func:`loop_name` ``(choice)``."""
    if loop_name(choice) == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_until_stopped(main: Callable[[asyncio.Event], Awaitable[int]], *,
                      log: logging.Logger, event_loop: str = "auto") -> int:
    """``main(stop)`` in a fresh event loop where SIGTERM/SIGINT set ``stop``; its result.

    The first signal is logged (``signal received signal=SIGTERM``); ``main``
    decides how to stop and what exit status that is.
    """

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if not stop.is_set():
                log.info("signal received", extra=kv(signal=sig.name))
            stop.set()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        return await main(stop)

    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        return runner.run(run())


def run_service(settings_type: type[_S], service: str,
                main: Callable[[_S, asyncio.Event], Awaitable[int]], *,
                log: logging.Logger) -> NoReturn:
    """A service's ``__main__``: :func:`configure`, then :func:`run_until_stopped`, then exit.

    The exit status is what ``main(settings, stop)`` returns (0 after a clean
    stop on SIGTERM/SIGINT), 2 for a bad setting.
    """
    settings = configure(settings_type, service)
    raise SystemExit(run_until_stopped(lambda stop: main(settings, stop), log=log,
                                       event_loop=settings.event_loop))
