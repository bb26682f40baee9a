"""The feed's small HTTP server: ``/healthz``, ``/readyz``, ``/metrics``.

* ``GET /healthz``: 200 while the process runs.
* ``GET /readyz``: 200 when connected to the exchange and subscribed to every
  symbol, else 503; the body says what is missing.
* ``GET /metrics``: Prometheus text (:mod:`kumex_l3.metrics`).

uvicorn runs inside the feed's event loop (:func:`kumex_l3.service.start_server`),
without its own signal handlers: the feed's ``main()`` owns SIGTERM/SIGINT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from kumex_l3.service import service_app

__all__ = ["make_app"]


def make_app(status: Callable[[], dict[str, Any]], registry: CollectorRegistry) -> FastAPI:
    """The app; ``status()`` returns at least ``{"ready": bool}`` (plus details shown as is)."""
    return service_app("kumex-l3 feed", status, registry)
