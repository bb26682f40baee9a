"""The private channel: our account's own word on its orders, a second source beside the stream.

With API credentials, the order monitor holds one WebSocket connection to the
exchange's private order channel (``/contractMarket/tradeOrders``, a token from
the signed ``bullet-private``; docs/protocol.md §8). Every change it tells
(``open``, ``match``, ``filled``, ``canceled``, ``update``, each with the
order's filled size and size still open) is applied to the own order of that
clientOid (:func:`kumex_l3.order_store.apply_order_change`: load, merge with
what the stream said, save at the revision loaded, fenced by the symbol's
lease), **for the symbols this replica holds**; another replica applies the
others' from its own connection.

Why: the public stream goes through the feed and Redis, and stops when the
feed does. The private channel goes straight from the exchange, so own orders
stay current while the feed is down, and it confirms each clientOid ↔ orderId
link with our account's authority (a ``received`` on the public stream can be
anyone's). The two are merged so that neither counts a fill twice nor takes a
state back (:mod:`kumex_l3.orders`, "Two sources").

Loss: when the connection drops, every order active then is owed a check
against the exchange's record, even if the stream finishes it meanwhile (a
change the channel never sent may be the only word of a fill); each time the
connection is (re)made, every active order is too, as after a gap on the
stream. A frame that is not a valid order change is counted and logged, never
applied; a change that cannot be written (Redis down, a hash that keeps
changing) is counted and logged, and its order owes a check; one whose hash
cannot be read is counted and logged. The connection goes on either way.

A change that links or relinks an order is also given to the symbol's
consumer, so that the stream's messages of that orderId are recognised at
once (and a relink is counted and logged as the consumer's are).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kumex_l3 import order_store
from kumex_l3.errors import Fenced, KumexError, MessageError
from kumex_l3.logs import kv
from kumex_l3.messages import PRIVATE_TOPIC, parse_order_change
from kumex_l3.orders import CLIENT_OID_PATTERN, Change
from kumex_l3.rest import KumexRestClient
from kumex_l3.wsclient import Bullet, TokenError, WsClient, WsOptions, parse_bullet_data
from services.order_monitor.metrics import MonitorMetrics
from services.order_monitor.monitor import SymbolMonitor
from services.order_monitor.settings import MonitorSettings

__all__ = ["PrivateChannel"]

log = logging.getLogger("kumex.order_monitor.private")

#: Log a malformed frame at most this often (each one is counted).
_LOG_EVERY_S: Final = 10.0


class PrivateChannel:
    """One connection to the private order channel, applied to the held symbols' orders.

    ``monitors``: the live :class:`SymbolMonitor` of each symbol this replica
    holds (their fences and reconciliation). :meth:`run` until cancelled; it
    raises on a lost connection (its caller restarts it with backoff).
    """

    def __init__(self, rest: KumexRestClient, redis: aioredis.Redis,
                 monitors: Mapping[str, SymbolMonitor], settings: MonitorSettings,
                 metrics: MonitorMetrics, *, clock_ms: Callable[[], int] | None = None) -> None:
        self.rest = rest
        self.redis = redis
        self.monitors = monitors
        self.settings = settings
        self.metrics = metrics
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.client = WsClient(settings.base_url, options=WsOptions(tls=settings.tls()),
                               bullet=self._bullet)
        #: True while subscribed (the /readyz view).
        self.connected = False
        self._logged_at = float("-inf")

    async def _bullet(self) -> Bullet:
        try:
            return parse_bullet_data(await self.rest.bullet_private())
        except KumexError as exc:
            if isinstance(exc, TokenError):
                raise
            raise TokenError(f"bullet-private failed: {exc}") from exc

    async def aclose(self) -> None:
        """Close the token client."""
        await self.client.aclose()

    async def run(self) -> None:
        """Connect, subscribe, owe every held symbol a reconciliation, apply changes."""
        subscribed = False
        try:
            async with self.client.connect([PRIVATE_TOPIC]) as conn:
                subscribed = True
                self.connected = True
                self.metrics.private_connected.set(1)
                self.metrics.private_connections.inc()
                for monitor in list(self.monitors.values()):
                    monitor.owe_reconciliation()
                log.info("private channel subscribed", extra=kv(
                    topic=PRIVATE_TOPIC, symbols=",".join(sorted(self.monitors))))
                async for text in conn:
                    await self.handle(text)
        finally:
            self.connected = False
            self.metrics.private_connected.set(0)
            if subscribed:  # what it did not send from now on is lost: check them all
                for monitor in list(self.monitors.values()):
                    monitor.recheck()

    async def handle(self, text: str) -> str:
        """Apply one frame; what became of it (the ``result`` label of the counter)."""
        try:
            change = parse_order_change(text)
        except MessageError as exc:
            return self._count("malformed", "", reason=exc.reason)
        if change is None:
            return self._count("other", "")
        monitor = self.monitors.get(change.symbol)
        if monitor is None:
            return self._count("not_held", change.symbol)  # another replica's symbol
        if not CLIENT_OID_PATTERN.fullmatch(change.client_oid):
            return self._count("not_ours", change.symbol)
        try:
            done = await order_store.apply_order_change(
                self.redis, change, now_ms=self._clock_ms(),
                finished_ttl_s=self.settings.finished_ttl_s,
                events_maxlen=self.settings.events_maxlen, fence=monitor.fence,
                writer=f"{self.settings.consumer}/private")
        except Fenced:
            return self._count("fenced", change.symbol)
        except (RedisError, RuntimeError) as exc:
            # Not written: the exchange's record will say it (and the stream may too).
            monitor.recheck([change.client_oid])
            return self._count("error", change.symbol,
                               reason=f"{change.client_oid}: {type(exc).__name__}: {exc}")
        except ValueError as exc:  # a hash that cannot be read: nothing to check it against
            return self._count("error", change.symbol,
                               reason=f"{change.client_oid}: unreadable hash: {exc}")
        if done is None:
            return self._count("not_ours", change.symbol)  # placed by another tool
        order, transition = done
        if not transition.changed:
            return self._count("known", change.symbol)
        if transition.change is not None:
            self.metrics.changes.labels(change.symbol, transition.change.value).inc()
        if transition.change is Change.RELINKED:
            monitor.contested(order, transition)
        if transition.linked or transition.finished:
            monitor.track(order)
        return self._count("applied", change.symbol)

    def _count(self, result: str, symbol: str, *, reason: str = "") -> str:
        self.metrics.private_changes.labels(symbol, result).inc()
        if result in ("malformed", "error"):
            now = time.monotonic()
            if now - self._logged_at >= _LOG_EVERY_S:
                self._logged_at = now
                log.warning("private channel: change not applied", extra=kv(
                    result=result, symbol=symbol, reason=reason[:200]))
        return result
