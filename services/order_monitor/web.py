"""The order monitor's small HTTP server: ``/healthz``, ``/readyz``, ``/metrics``.

* ``GET /healthz``: 200 while the process runs.
* ``GET /readyz``: 200 once the symbol leases are being managed and every symbol
  this replica holds has its consumer started (group ensured, pending entries
  handled again), else 503; the body shows each symbol's state. A replica
  holding no symbol (a standby) is ready.
* ``GET /metrics``: Prometheus text (:mod:`kumex_l3.metrics`).

uvicorn runs inside the service's event loop (:func:`kumex_l3.service.start_server`)
without signal handlers of its own: ``main()`` owns SIGTERM/SIGINT.
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
    return service_app("kumex-l3 order monitor", status, registry)
