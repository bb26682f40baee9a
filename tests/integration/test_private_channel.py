"""The order monitor's private channel (services.order_monitor.private) on a real Redis.

Frames go straight into :meth:`PrivateChannel.handle`, as its socket would hand
them over: what each becomes (the ``result`` counted), what is written, and
what the symbol's consumer learns. The connection itself is tested end to end
(tests/e2e/test_trading.py) and against the sandbox's channel
(tests/integration/test_sandbox_private_channel.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

from kumex_l3 import keys, order_store
from kumex_l3.messages import PRIVATE_TOPIC
from kumex_l3.rest import KumexRestClient
from services.order_monitor.metrics import MonitorMetrics
from services.order_monitor.monitor import SymbolMonitor
from services.order_monitor.private import PrivateChannel
from services.order_monitor.settings import MonitorSettings

SYM = "XBTUSDM"
OID = "629727c9edde6b0001f422a7"
OTHER = "629727c9edde6b0001f40000"
T0 = 1_700_000_000_000


def frame(kind: str, *, coid: str = "c1", oid: str = OID, filled: int = 0, remain: int = 10,
          symbol: str = SYM, ts_ms: int = T0 + 1, **extra: Any) -> str:
    data = {"orderId": oid, "symbol": symbol, "type": kind,
            "status": "done" if kind in ("filled", "canceled") else "open",
            "orderType": "limit", "side": "buy", "price": "31570.0", "size": "10",
            "remainSize": str(remain), "filledSize": str(filled), "canceledSize": "0",
            "clientOid": coid, "orderTime": T0 * 1_000_000, "ts": ts_ms * 1_000_000, **extra}
    return json.dumps({"type": "message", "topic": PRIVATE_TOPIC, "subject": "orderChange",
                       "channelType": "private", "data": data})


class Held:
    """A monitor with ``SYM`` held, the channel applying to it, and their metrics."""

    def __init__(self, r: redis.asyncio.Redis, url: str) -> None:
        self.settings = MonitorSettings(redis_url=url, symbols=[SYM], consumer="t1")
        self.metrics = MonitorMetrics()
        self.monitor = SymbolMonitor(r, SYM, self.settings, self.metrics)
        self.rest = KumexRestClient("http://127.0.0.1:9", "k", "s", "p")  # never called
        self.channel = PrivateChannel(self.rest, r, {SYM: self.monitor}, self.settings,
                                      self.metrics, clock_ms=lambda: T0 + 100)

    def count(self, result: str, symbol: str = SYM) -> float:
        value = self.metrics.registry.get_sample_value(
            "kumex_order_monitor_private_changes_total", {"symbol": symbol, "result": result})
        return value or 0.0


@pytest.fixture
async def held(redis_client: redis.asyncio.Redis, redis_url: str) -> AsyncIterator[Held]:
    h = Held(redis_client, redis_url)
    yield h
    await h.rest.aclose()
    await h.channel.aclose()


async def test_changes_of_our_orders_are_applied_and_the_consumer_learns_the_link(
        held: Held, redis_client: redis.asyncio.Redis) -> None:
    await order_store.register(redis_client, SYM, "c1", side="buy", price="31570.0", size=10,
                               now_ms=T0)
    assert await held.channel.handle(frame("open")) == "applied"
    assert held.monitor.by_oid == {OID: "c1"}  # the stream's messages of it are ours now
    assert await held.channel.handle(frame("open")) == "known"  # delivered twice
    assert await held.channel.handle(frame(
        "match", filled=4, remain=6, ts_ms=T0 + 2, matchSize="4", matchPrice="31570.0",
        tradeId="t1", liquidity="maker")) == "applied"
    assert await held.channel.handle(frame("canceled", filled=4, remain=0,
                                           ts_ms=T0 + 3)) == "applied"
    order = await order_store.load(redis_client, SYM, "c1")
    assert order is not None
    assert (order.status.value, order.filled_size, order.order_id, order.confirmed_by) == (
        "canceled", 4, OID, "exchange")
    assert held.monitor.by_oid == {}  # finished: out of the index
    events = [{k.decode(): v.decode() for k, v in f.items()}
              for _, f in await redis_client.xrange(keys.order_events(SYM))]
    assert [(e["change"], e["by"]) for e in events] == [
        ("open", "t1/private"), ("fill", "t1/private"), ("done", "t1/private")]
    assert events[1]["fillSize"] == "4" and events[1]["tradeId"] == "t1"
    assert not await redis_client.sismember(keys.orders_active(SYM), "c1")


async def test_what_is_not_ours_or_not_held_or_malformed_is_counted_and_never_written(
        held: Held, redis_client: redis.asyncio.Redis) -> None:
    assert await held.channel.handle(frame("open", coid="placed-elsewhere")) == "not_ours"
    assert await held.channel.handle(frame("open", coid="")) == "not_ours"
    assert await held.channel.handle(frame("open", symbol="ETHUSDTM")) == "not_held"
    assert await held.channel.handle('{"type":"message","topic":"/contractMarket/'
                                     'tradeOrders","data":{"type":"open"}}') == "malformed"
    assert await held.channel.handle("not json") == "malformed"
    assert await held.channel.handle('{"type":"pong","id":"1"}') == "other"
    assert await redis_client.dbsize() == 0
    assert (held.count("not_ours"), held.count("not_held", "ETHUSDTM"),
            held.count("malformed", "")) == (2, 1, 2)


async def test_a_relink_is_counted_and_a_change_past_the_lease_is_fenced(
        held: Held, redis_client: redis.asyncio.Redis) -> None:
    await order_store.register(redis_client, SYM, "c1", side="buy", price="31570.0", size=10,
                               now_ms=T0)
    order = await order_store.load(redis_client, SYM, "c1")
    assert order is not None
    order.order_id, order.rev = OTHER, order.rev + 1  # linked to someone else's order
    await redis_client.hset(keys.order(SYM, "c1"), mapping=order.to_hash())
    held.monitor.by_oid[OTHER] = "c1"
    assert await held.channel.handle(frame("open")) == "applied"
    assert held.monitor.by_oid == {OID: "c1"}  # the other order is no longer taken for ours
    assert held.metrics.registry.get_sample_value(
        "kumex_order_monitor_relinked_total", {"symbol": SYM}) == 1
    # The lease is someone else's: nothing is written.
    held.monitor.fence = (keys.owner(SYM, "order_monitor"), "not-us")
    await redis_client.set(keys.owner(SYM, "order_monitor"), "someone-else")
    before = await redis_client.hgetall(keys.order(SYM, "c1"))
    assert await held.channel.handle(frame("canceled", remain=0, ts_ms=T0 + 5)) == "fenced"
    assert await redis_client.hgetall(keys.order(SYM, "c1")) == before


async def test_a_change_that_cannot_be_written_is_counted_and_costs_a_check(
        held: Held, redis_client: redis.asyncio.Redis) -> None:
    await redis_client.hset(keys.order(SYM, "c9"), mapping={"clientOid": "c9"})  # corrupt
    assert await held.channel.handle(frame("open", coid="c9")) == "error"
    assert held.count("error") == 1 and not held.monitor.reconcile_due  # nothing to ask
    await order_store.register(redis_client, SYM, "c1", side="buy", price="31570.0", size=10,
                               now_ms=T0)
    await redis_client.config_set("maxmemory", "1")  # Redis refuses the write (OOM)
    try:
        assert await held.channel.handle(frame("open")) == "error"
    finally:
        await redis_client.config_set("maxmemory", "0")
    assert held.monitor.reconcile_due and "c1" in held.monitor._recheck
    assert (await order_store.load(redis_client, SYM, "c1")).status.value == "pending"
