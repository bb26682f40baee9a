"""``python -m services.strategy``: settings from the environment, then run until SIGTERM/Ctrl-C.

A bad setting stops the process at once with a message naming the variable
(exit status 2). On SIGTERM or SIGINT the grid cancels its orders, confirms
at the exchange that none is left, and exits 0; a failure at start exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import redis.asyncio as aioredis

from kumex_l3.config import load_settings, redact_url
from kumex_l3.errors import KumexError
from kumex_l3.logs import kv, secrets_of, setup_logging
from kumex_l3.rest import KumexRestClient
from services.strategy.metrics import StrategyMetrics
from services.strategy.runner import GridStrategy
from services.strategy.settings import StrategySettings
from services.strategy.web import make_app, start_server

_log = logging.getLogger("services.strategy")


async def _main(settings: StrategySettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            _log.info("signal received", extra=kv(signal=sig.name))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    redis = aioredis.Redis.from_url(settings.redis_url)
    rest = KumexRestClient(settings.base_url, settings.api_key, settings.api_secret,
                           settings.api_passphrase, timeout=settings.request_timeout)
    metrics = StrategyMetrics()
    strategy = GridStrategy(settings, redis, rest, metrics=metrics)
    server, server_task = await start_server(make_app(strategy.status, metrics.registry),
                                             settings.http_host, settings.http_port)
    _log.info("strategy starting", extra=kv(
        symbol=strategy.symbol, exchange=settings.base_url, redis=redact_url(settings.redis_url),
        port=server.port, dryRun=settings.dry_run, prefix=settings.client_oid_prefix))
    status = 0
    try:
        await strategy.run(stop)
    except (KumexError, OSError) as exc:
        _log.error("strategy failed", extra=kv(error=str(exc)))
        status = 1
    finally:
        server.should_exit = True
        await server_task
        await rest.aclose()
        await redis.aclose()
    _log.info("strategy stopped", extra=kv(status=status))
    return status


def main() -> None:
    """Entry point of the strategy service."""
    settings = load_settings(StrategySettings)
    try:
        setup_logging(settings.log_level, "strategy", secrets=secrets_of(settings))
    except ValueError as exc:
        sys.stderr.write(f"invalid configuration for StrategySettings:\n  LOG_LEVEL: {exc}\n")
        raise SystemExit(2) from None
    raise SystemExit(asyncio.run(_main(settings)))


if __name__ == "__main__":
    main()
