"""``python -m services.strategy``: settings from the environment, then run until SIGTERM/Ctrl-C.

A bad setting stops the process at once with a message naming the variable
(exit status 2). On SIGTERM or SIGINT the grid cancels its orders, confirms
at the exchange that none is left, and exits 0; a failure at start exits 1.
"""

from __future__ import annotations

import asyncio
import logging

from kumex_l3 import redis_adapter
from kumex_l3.access import Guard
from kumex_l3.config import redact_url
from kumex_l3.errors import KumexError
from kumex_l3.logs import kv
from kumex_l3.rest import KumexRestClient
from kumex_l3.service import run_service, start_server
from services.strategy.metrics import StrategyMetrics
from services.strategy.runner import GridStrategy
from services.strategy.settings import StrategySettings
from services.strategy.web import make_app

_log = logging.getLogger("services.strategy")


async def _run(settings: StrategySettings, stop: asyncio.Event) -> int:
    redis = redis_adapter.connect(settings.redis_url, "strategy", block=settings.read_block,
                                  cluster=settings.redis_cluster)
    rest = KumexRestClient(settings.base_url, settings.api_key, settings.api_secret,
                           settings.api_passphrase, timeout=settings.request_timeout,
                           tls=settings.tls())
    metrics = StrategyMetrics()
    strategy = GridStrategy(settings, redis, rest, metrics=metrics)
    guard = Guard(settings.api_token, settings.http_host)
    if guard.policy == "off":
        _log.warning("STRATEGY_API_TOKEN is not set and the HTTP server listens beyond the "
                     "loopback interface: /state is not served",
                     extra=kv(host=settings.http_host))
    server, server_task = await start_server(make_app(strategy.status, metrics.registry, guard),
                                             settings.http_host, settings.http_port,
                                             name="strategy-http")
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
    run_service(StrategySettings, "strategy", _run, log=_log)


if __name__ == "__main__":
    main()
