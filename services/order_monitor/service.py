"""The order monitor process: symbol leases, one consumer task per symbol held, HTTP.

:class:`OrderMonitor` asks :class:`~kumex_l3.lease.LeaseManager` for the
symbols (role ``order_monitor``); for each one gained it starts a
:class:`~services.order_monitor.monitor.SymbolMonitor` under a supervisor that
restarts it after an error (with backoff; unacknowledged entries are claimed
again on restart), and stops it when the lease is lost. With credentials it also
runs the private order channel (:mod:`services.order_monitor.private`) for the
symbols held, under a supervisor of its own. :func:`run_monitor`
builds everything from the settings and runs until ``stop`` is set; it then
stops the consumers, gives the leases back and closes its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, Final

import redis.asyncio as aioredis

from kumex_l3 import redis_adapter
from kumex_l3.backoff import Backoff
from kumex_l3.config import redact_url
from kumex_l3.lease import LeaseManager, LeaseOwner, supervise
from kumex_l3.logs import kv
from kumex_l3.rest import KumexRestClient
from kumex_l3.service import start_server
from kumex_l3.tasks import cancel_and_wait
from services.order_monitor.metrics import MonitorMetrics
from services.order_monitor.monitor import LeaseLost, OrderLookup, SymbolMonitor
from services.order_monitor.private import PrivateChannel
from services.order_monitor.settings import ROLE, MonitorSettings
from services.order_monitor.web import make_app

__all__ = ["OrderMonitor", "run_monitor"]

log = logging.getLogger("services.order_monitor")

_STOP_TIMEOUT_S: Final = 5.0


class OrderMonitor:
    """Leases and per-symbol consumers of one replica. ``await run(stop)``."""

    def __init__(
        self,
        settings: MonitorSettings,
        redis: aioredis.Redis,
        metrics: MonitorMetrics,
        lookup: OrderLookup | None,
        *,
        url: str | None = None,
        private: Callable[[Mapping[str, SymbolMonitor]], PrivateChannel] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.metrics = metrics
        self.lookup = lookup
        self.leases = LeaseManager(
            redis, ROLE, settings.symbols, LeaseOwner(settings.replica, url),
            ttl=settings.lease_ttl_s, on_gained=self._gained, on_lost=self._lost,
            members=True)
        self.monitors: dict[str, SymbolMonitor] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        #: The private order channel, applied to the symbols in ``monitors`` (None: off).
        self.private = private(self.monitors) if private is not None else None

    # ------------------------------------------------------------------ leases

    async def _gained(self, symbol: str) -> None:
        log.info("symbol gained", extra=kv(symbol=symbol))
        self.metrics.owned.labels(symbol).set(1)
        old = self._workers.get(symbol)
        if old is None or old.done():
            self._workers[symbol] = asyncio.create_task(self._supervise(symbol),
                                                        name=f"order-monitor-{symbol}")

    async def _lost(self, symbol: str) -> None:
        log.info("symbol lost", extra=kv(symbol=symbol))
        self.metrics.owned.labels(symbol).set(0)
        self.monitors.pop(symbol, None)
        await self._stop_workers(self._workers.pop(symbol, None))

    async def _supervise(self, symbol: str) -> None:
        """Run the symbol's consumer while the lease is held; restart it after an error."""
        async def run() -> None:
            monitor = SymbolMonitor(self.redis, symbol, self.settings, self.metrics,
                                    self.lookup, holds=lambda: self.leases.holds(symbol),
                                    fence=(self.leases.key(symbol),
                                           self.leases.owner.to_json()))
            self.monitors[symbol] = monitor
            await monitor.run()

        await supervise(run, what="order monitor consumer", symbol=symbol,
                        backoff=Backoff(initial=0.5, factor=2.0, max_delay=15.0),
                        holds=lambda: self.leases.holds(symbol), stop_on=(LeaseLost,),
                        on_failure=lambda _: self.metrics.errors.labels(symbol).inc())

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Manage leases and consumers until ``stop`` is set; then give everything back."""
        leases = asyncio.create_task(self.leases.run(), name="order-monitor-leases")
        channel = None if self.private is None else asyncio.create_task(
            supervise(self.private.run, what="private order channel", symbol="*",
                      backoff=Backoff(initial=0.5, factor=2.0, max_delay=15.0),
                      on_failure=lambda _: self.metrics.errors.labels("*").inc()),
            name="order-monitor-private")
        try:
            await stop.wait()
        finally:
            await cancel_and_wait(leases, channel)
            if self.private is not None:
                await self.private.aclose()
            await self.leases.drain()  # each symbol's consumer stopped, then released
            await self.leases.close()
            await self._stop_workers(*self._workers.values())

    @staticmethod
    async def _stop_workers(*tasks: asyncio.Task[None] | None) -> None:
        still = await cancel_and_wait(*tasks, timeout=_STOP_TIMEOUT_S)
        for task in still:
            log.error("consumer did not stop", extra=kv(task=task.get_name()))

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` shows: ``ready`` and each held symbol's consumer state."""
        symbols: dict[str, Any] = {}
        ready = self.leases.rounds > 0
        for symbol in sorted(self.leases.held):
            monitor = self.monitors.get(symbol)
            started = monitor is not None and monitor.ready
            ready = ready and started
            symbols[symbol] = {
                "ready": started,
                "lastSequence": None if monitor is None else monitor.sequences.position,
                "streamTime": None if monitor is None else monitor.stream_ms,
                "reconcileDue": None if monitor is None else monitor.reconcile_due,
            }
        return {"ready": ready, "replica": self.settings.replica, "symbols": symbols,
                "privateChannel": None if self.private is None else self.private.connected}


async def run_monitor(settings: MonitorSettings, stop: asyncio.Event) -> int:
    """Build the service from ``settings`` and run it until ``stop``; the exit status."""
    redis = redis_adapter.connect(settings.redis_url, "order-monitor",
                                  timeout=settings.redis_timeout,
                                  block=settings.block_ms / 1000,
                                  cluster=settings.redis_cluster)
    lookup: KumexRestClient | None = None
    if settings.has_credentials:
        lookup = KumexRestClient(settings.base_url, settings.api_key, settings.api_secret,
                                 settings.api_passphrase, timeout=settings.http_timeout,
                                 tls=settings.tls())
    else:
        log.warning("no API credentials (KUMEX_API_KEY, KUMEX_API_SECRET, "
                    "KUMEX_API_PASSPHRASE): reconciliation with the exchange is off")
    metrics = MonitorMetrics()
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") \
        else socket.gethostname()
    def private(monitors: Mapping[str, SymbolMonitor]) -> PrivateChannel:
        assert lookup is not None
        return PrivateChannel(lookup, redis, monitors, settings, metrics)

    if lookup is not None and not settings.private_channel:
        log.info("private order channel off (MONITOR_PRIVATE_CHANNEL=false)")
    service = OrderMonitor(settings, redis, metrics, lookup,
                           url=f"http://{host}:{settings.http_port}",
                           private=private if lookup is not None and settings.private_channel
                           else None)
    try:
        try:
            server, server_task = await start_server(
                make_app(service.status, metrics.registry), settings.http_host,
                settings.http_port, name="order-monitor-http")
        except OSError as exc:
            log.error("cannot serve HTTP", extra=kv(error=str(exc)))
            return 1
        log.info("started", extra=kv(redis=redact_url(settings.redis_url),
                                     symbols=",".join(settings.symbols), port=server.port,
                                     replica=settings.replica, consumer=settings.consumer,
                                     exchange=settings.base_url if lookup else "none"))
        try:
            await service.run(stop)
        finally:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(server_task, _STOP_TIMEOUT_S)
    finally:
        if lookup is not None:
            await lookup.aclose()
        await redis.aclose()
    log.info("stopped")
    return 0
