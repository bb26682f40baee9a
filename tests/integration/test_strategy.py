"""The Trader SDK and the grid strategy against the sandbox process and a real Redis.

The order monitor is not part of these tests: where the strategy needs
order events, the test appends them to ``kumex:{SYM}:order-events`` itself,
with the fields the monitor writes. Faults are named where injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from kumex_l3 import keys, order_store
from kumex_l3.grid import make_client_oid
from kumex_l3.orders import OrderStatus
from kumex_l3.rest import (
    DuplicateClientOid,
    ExchangeOrder,
    InvalidParameter,
    KumexRestClient,
    RateLimited,
    RequestTimeout,
)
from kumex_l3.testing.procs import (
    ServiceProcess,
    async_client,
    eventually,
    is_cluster_url,
    wait_for,
)
from kumex_l3.testing.sandbox_proc import DEMO_KEY_1, SandboxProcess
from kumex_l3.trading import ClientOidInUse, Trader, UnknownOrder
from services.strategy.metrics import StrategyMetrics
from services.strategy.runner import GridStrategy
from services.strategy.settings import StrategySettings
from services.strategy.state import load_state, strategy_state_key
from tests.integration.conftest import SANDBOX_TEST_ENV

SYMBOL = "XBTUSDTM"
#: Upper bound on waiting for a process or an event; never an assertion on speed.
SAFETY_S = 30.0


def _control(sandbox: SandboxProcess, path: str, body: dict[str, Any]) -> None:
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as client:
        client.post(path, json=body).raise_for_status()


@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """Every test here runs on one Redis, then on the Redis Cluster."""
    return any_redis_url


@pytest.fixture(scope="module")
def cluster_sandbox() -> Iterator[SandboxProcess]:
    """The sandbox of the runs on the Redis Cluster: the tests' clientOids are fixed, and
    an exchange remembers every order it was sent (a second run of a test in the same
    sandbox finds the first run's orders)."""
    with SandboxProcess(SANDBOX_TEST_ENV) as proc:
        yield proc


@pytest.fixture
def sandbox_process(sandbox_process: SandboxProcess, redis_url: str,
                    request: pytest.FixtureRequest) -> SandboxProcess:
    """The session's sandbox on one Redis; on the cluster, :func:`cluster_sandbox`."""
    if is_cluster_url(redis_url):
        cluster_sandbox: SandboxProcess = request.getfixturevalue("cluster_sandbox")
        return cluster_sandbox
    return sandbox_process


@pytest.fixture
async def rest(sandbox: SandboxProcess) -> AsyncIterator[KumexRestClient]:
    async with KumexRestClient(sandbox.base_url, DEMO_KEY_1.key, DEMO_KEY_1.secret,
                               DEMO_KEY_1.passphrase, timeout=10.0) as client:
        await client.cancel_all(SYMBOL)
        yield client
        _control(sandbox, "/sandbox/faults", {"rest_latency_ms": 5.0})
        await client.cancel_all(SYMBOL)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = (async_client(redis_url, timeout=SAFETY_S) if is_cluster_url(redis_url)
              else aioredis.Redis.from_url(redis_url))
    try:
        yield client
    finally:
        await client.aclose()


async def _mark(rest: KumexRestClient) -> Decimal:
    contract = await rest.contract(SYMBOL)
    tick = Decimal(str(contract["tickSize"]))
    mark = Decimal(str(contract.get("markPrice") or 30000))
    return (mark / tick).to_integral_value() * tick


async def _own_active(rest: KumexRestClient, prefix: str) -> list[Any]:
    return [o for o in await rest.active_orders(SYMBOL)
            if o.client_oid.startswith(prefix + "-")]


def _oid(strategy: GridStrategy, n: int) -> str:
    """The grid's ``n``-th clientOid (keyed by its secret salt: not guessable from outside)."""
    return make_client_oid(strategy.prefix, n, strategy.state.salt)


def _settings(sandbox: SandboxProcess, redis_url: str, centre: Decimal,
              **overrides: Any) -> StrategySettings:
    values: dict[str, Any] = {
        "redis_url": redis_url, "redis_cluster": is_cluster_url(redis_url),
        "base_url": sandbox.base_url, "symbols": [SYMBOL], "api_key": DEMO_KEY_1.key,
        "api_secret": DEMO_KEY_1.secret,
        "api_passphrase": DEMO_KEY_1.passphrase, "symbol": SYMBOL, "centre_price": centre,
        "step_ticks": 50, "levels": 2, "size": 3, "max_position": 12,
        "max_open_orders": 10, "leverage": 3, "client_oid_prefix": "gt",
        "read_block": 0.05, "resolve_after": 0.0,
    }
    values.update(overrides)
    return StrategySettings(**values)


# ---------------------------------------------------------------------- Trader


async def test_trader_registers_before_sending_and_marks_refusals(
        redis: aioredis.Redis, rest: KumexRestClient) -> None:
    trader = Trader(redis, rest)
    price = await _mark(rest) * Decimal("0.8")
    price = price.quantize(Decimal("0.1"))
    placed = await trader.place_order(SYMBOL, "buy", price, 2, leverage=3, client_oid="tr-1")
    assert placed.client_oid == "tr-1"
    order = await order_store.load(redis, SYMBOL, "tr-1")
    assert order is not None and order.side == "buy" and int(order.size) == 2
    assert await redis.sismember(keys.orders_active(SYMBOL), "tr-1")
    # The same clientOid twice: refused locally, nothing sent.
    with pytest.raises(ClientOidInUse):
        await trader.place_order(SYMBOL, "buy", price, 2, leverage=3, client_oid="tr-1")
    assert len(await _own_active(rest, "tr")) == 1
    # A refusal (a price off the tick): the order is rejected, with an event.
    with pytest.raises(InvalidParameter):
        await trader.place_order(SYMBOL, "buy", price + Decimal("0.05"), 1, leverage=3,
                                 client_oid="tr-2")
    rejected = await order_store.load(redis, SYMBOL, "tr-2")
    assert rejected is not None and rejected.status is OrderStatus.REJECTED
    assert rejected.reason.startswith("300000")
    events: Any = await redis.xrange(keys.order_events(SYMBOL))
    # tr-1's orderId was confirmed from the reply; tr-2 was refused.
    assert [(e[b"clientOid"], e[b"change"]) for _, e in events] == [
        (b"tr-1", b"confirmed"), (b"tr-2", b"rejected")]
    # wait_for returns at once for a final order.
    got = await trader.wait_for(SYMBOL, "tr-2", {"open"}, timeout=SAFETY_S)
    assert got.status is OrderStatus.REJECTED
    with pytest.raises(UnknownOrder):
        await trader.wait_for(SYMBOL, "tr-none", timeout=SAFETY_S)
    # Cancel: accepted once, then the exchange cannot (already done).
    assert await trader.cancel_order(SYMBOL, "tr-1") is True
    assert await trader.cancel_order(SYMBOL, "tr-1") is False


async def test_trader_timeout_leaves_pending_and_resolves_without_duplicate(
        sandbox: SandboxProcess, redis: aioredis.Redis, rest: KumexRestClient) -> None:
    price = (await _mark(rest) * Decimal("0.8")).quantize(Decimal("0.1"))
    # Fault: the sandbox acts, then holds the REST reply longer than the client waits.
    _control(sandbox, "/sandbox/faults", {"rest_latency_ms": 2000.0})
    async with KumexRestClient(sandbox.base_url, DEMO_KEY_1.key, DEMO_KEY_1.secret,
                               DEMO_KEY_1.passphrase, timeout=0.3) as slow:
        with pytest.raises(RequestTimeout):
            await Trader(redis, slow).place_order(SYMBOL, "buy", price, 1, leverage=2,
                                                  client_oid="to-1")
    _control(sandbox, "/sandbox/faults", {"rest_latency_ms": 5.0})
    pending = await order_store.load(redis, SYMBOL, "to-1")
    assert pending is not None and pending.status is OrderStatus.PENDING
    trader = Trader(redis, rest)
    resolution = await trader.resolve_after_timeout(SYMBOL, "to-1", resend=True)
    assert resolution.outcome == "found"  # checked first: not sent again
    assert resolution.order is not None and resolution.order.status is OrderStatus.OPEN
    assert resolution.order.order_id == resolution.exchange_order.id  # type: ignore[union-attr]
    assert [o.client_oid for o in await _own_active(rest, "to")] == ["to-1"]
    again = await trader.resolve_after_timeout(SYMBOL, "to-1")
    assert again.outcome == "settled"


async def test_trader_resolves_an_order_that_never_left(
        redis: aioredis.Redis, rest: KumexRestClient) -> None:
    price = (await _mark(rest) * Decimal("0.8")).quantize(Decimal("0.1"))
    # Registered, then "the process died" before sending.
    assert await order_store.register(redis, SYMBOL, "nl-1", side="buy", price=f"{price:f}",
                                      size=1, now_ms=1, extra={"leverage": "2"})
    trader = Trader(redis, rest)
    absent = await trader.resolve_after_timeout(SYMBOL, "nl-1")
    assert absent.outcome == "absent"
    assert await _own_active(rest, "nl") == []
    resent = await trader.resolve_after_timeout(SYMBOL, "nl-1", resend=True)
    assert resent.outcome == "resent" and resent.placed is not None
    assert [o.client_oid for o in await _own_active(rest, "nl")] == ["nl-1"]
    # A second resend finds it: still one order.
    assert (await trader.resolve_after_timeout(SYMBOL, "nl-1", resend=True)).outcome == "found"
    assert len(await _own_active(rest, "nl")) == 1
    # Lost Redis state while the exchange has it: 300018 adopts, never rejects.
    await redis.delete(keys.order(SYMBOL, "nl-1"))
    with pytest.raises(DuplicateClientOid):
        await trader.place_order(SYMBOL, "buy", price, 1, leverage=2, client_oid="nl-1")
    adopted = await order_store.load(redis, SYMBOL, "nl-1")
    assert adopted is not None and adopted.status is OrderStatus.OPEN


async def test_wait_for_and_follow_read_the_event_stream(
        redis: aioredis.Redis, rest: KumexRestClient) -> None:
    assert await order_store.register(redis, SYMBOL, "wf-1", side="sell", price="99999.0",
                                      size=1, now_ms=1)
    trader = Trader(redis, rest)
    with pytest.raises(TimeoutError):
        await trader.wait_for(SYMBOL, "wf-1", {"open"}, timeout=0.1)

    async def reject_later() -> None:
        await asyncio.sleep(0.05)
        await order_store.mark_rejected(redis, SYMBOL, "wf-1", code="x", msg="test", now_ms=2)

    task = asyncio.create_task(reject_later())
    seen = [e async for e in trader.follow(SYMBOL, "wf-1", idle_timeout=SAFETY_S)]
    await task
    assert [e["change"] for e in seen] == ["state", "rejected"]
    assert seen[0]["status"] == "pending" and seen[-1]["status"] == "rejected"
    final = await trader.wait_for(SYMBOL, "wf-1", timeout=SAFETY_S)
    assert final.status is OrderStatus.REJECTED


# ---------------------------------------------------------------------- strategy


async def test_dry_run_places_and_writes_nothing(
        sandbox: SandboxProcess, redis_url: str, redis: aioredis.Redis,
        rest: KumexRestClient) -> None:
    centre = await _mark(rest)
    settings = _settings(sandbox, redis_url, centre, dry_run=True, client_oid_prefix="dry")
    strategy = GridStrategy(settings, redis, rest)
    await strategy.start()
    assert strategy.ready
    assert strategy.state.open_count == 4  # decided, in memory only
    await strategy.shutdown()
    assert await _own_active(rest, "dry") == []
    assert await redis.keys("*") == []


async def test_grid_is_placed_and_adopted_on_restart_without_duplicates(
        sandbox: SandboxProcess, redis_url: str, redis: aioredis.Redis,
        rest: KumexRestClient) -> None:
    centre = await _mark(rest)
    settings = _settings(sandbox, redis_url, centre)
    step = Decimal("0.1") * 50
    first = GridStrategy(settings, redis, rest)
    await first.start()
    live = await _own_active(rest, "gt")
    assert sorted((o.side, o.price) for o in live) == sorted([
        ("buy", centre - step), ("buy", centre - 2 * step),
        ("sell", centre + step), ("sell", centre + 2 * step)])
    assert all(o.size == 3 and o.leverage == "3" for o in live)
    stored = await load_state(redis, strategy_state_key(SYMBOL, "gt"))
    assert stored.exists and stored.next_seq == 5 and stored.centre == centre
    assert stored.plans == {}  # every planned order was registered and sent

    # A restart (no cancel in between: a crash): everything adopted, nothing placed.
    second = GridStrategy(settings.model_copy(update={"centre_price": None}), redis, rest)
    await second.start()
    assert second.config is not None and second.config.centre == centre  # from the state
    assert sorted(o.id for o in await _own_active(rest, "gt")) == sorted(o.id for o in live)
    assert second.state.open_count == 4 and second.state.next_seq == 5
    # The exchange's records were adopted: orderId known, status open.
    coids = sorted(_oid(second, n) for n in range(1, 5))
    assert sorted(o.client_oid for o in live) == coids
    for coid in coids:
        order = await order_store.load(redis, SYMBOL, coid)
        assert order is not None and order.status is OrderStatus.OPEN and order.order_id

    # Redis loses everything; the exchange still has the grid: adopted again, no duplicate.
    await redis.flushall()
    third = GridStrategy(settings, redis, rest)
    await third.start()
    assert sorted(o.id for o in await _own_active(rest, "gt")) == sorted(o.id for o in live)
    assert third.state.open_count == 4
    assert sorted(await order_store.active(redis, SYMBOL)) == coids
    # The lost salt is drawn again: nothing the third life places can be an old clientOid.
    assert third.state.salt != second.state.salt and _oid(third, 1) not in coids

    await third.shutdown()
    assert await _own_active(rest, "gt") == []


async def _market(rest: KumexRestClient, side: str, size: int) -> None:
    await rest.place_order(client_oid=f"pos-{uuid.uuid4().hex[:12]}", symbol=SYMBOL,
                           side=side, size=size, leverage=3, order_type="market")


async def _set_position(rest: KumexRestClient, target: int) -> None:
    """Trade demo-1's account (outside any grid) to ``target`` contracts in ``SYMBOL``."""
    for _ in range(3):
        gap = target - await rest.position(SYMBOL)
        if not gap:
            return
        await _market(rest, "buy" if gap > 0 else "sell", abs(gap))
    assert await rest.position(SYMBOL) == target


async def test_the_grid_measures_its_risk_from_the_exchanges_position_too(
        sandbox: SandboxProcess, redis_url: str, redis: aioredis.Redis,
        rest: KumexRestClient) -> None:
    """Another tool left the account long 8: the grid (its own count 0, max 12, size 3)
    places one buy, not two: 8 + 3 <= 12 < 8 + 6. Both sells fit (0 - 6 >= -12)."""
    await _set_position(rest, 8)
    metrics = StrategyMetrics()
    strategy = GridStrategy(_settings(sandbox, redis_url, await _mark(rest),
                                      client_oid_prefix="gx"), redis, rest, metrics=metrics)
    try:
        await strategy.start()
        live = await _own_active(rest, "gx")
        assert sorted(o.side for o in live) == ["buy", "sell", "sell"]
        assert strategy.state.exchange_position == 8 and strategy.state.position == 0
        assert strategy.status()["exchangePosition"] == 8
        assert metrics.registry.get_sample_value("kumex_strategy_exchange_position") == 8
        assert metrics.registry.get_sample_value(
            "kumex_strategy_position_mismatches_total") == 1
    finally:
        await strategy.shutdown()
        await _set_position(rest, 0)


async def _event(redis: aioredis.Redis, coid: str, status: str, filled: int) -> str:
    """An order event as the order monitor writes it."""
    entry = await redis.xadd(keys.order_events(SYMBOL), {
        "clientOid": coid, "orderId": "", "status": status, "filledSize": str(filled),
        "sequence": "1", "reason": "", "change": "fill"})
    return entry.decode() if isinstance(entry, bytes) else str(entry)


async def _centre_at_best_ask(sandbox: SandboxProcess, rest: KumexRestClient) -> Decimal:
    """The best ask: a counter sell placed there rests (never takes)."""
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as http:
        asks = http.get(f"/sandbox/book/{SYMBOL}").json()["asks"]
    return Decimal(asks[0]["price"]) if asks else await _mark(rest) + 100


async def _at_exchange(rest: KumexRestClient, coid: str) -> ExchangeOrder:
    """The exchange's record of ``coid``, once it has one."""
    found: list[ExchangeOrder] = []

    async def known() -> bool:
        record = await rest.get_order_by_client_oid(coid, SYMBOL)
        found[:] = [] if record is None else [record]
        return bool(found)

    await eventually(known, f"{coid} at the exchange")
    return found[0]


@contextlib.asynccontextmanager
async def _running(strategy: GridStrategy) -> AsyncIterator[None]:
    """``strategy.run`` as a task, ready on entry; stopped (own orders cancelled) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(strategy.run(stop))
    try:
        async with asyncio.timeout(SAFETY_S):
            while not strategy.ready:
                await asyncio.sleep(0.02)
        yield
    finally:
        stop.set()
        await task


async def test_fill_events_give_counter_orders_once_across_restarts(
        sandbox: SandboxProcess, redis_url: str, redis: aioredis.Redis,
        rest: KumexRestClient) -> None:
    centre = await _centre_at_best_ask(sandbox, rest)
    step = Decimal("0.1") * 50
    settings = _settings(sandbox, redis_url, centre, client_oid_prefix="gf")
    metrics = StrategyMetrics()
    strategy = GridStrategy(settings, redis, rest, metrics=metrics)
    async with _running(strategy):
        gf1, gf5 = _oid(strategy, 1), _oid(strategy, 5)
        buy = strategy.state.orders[gf1]
        assert buy.side == "buy" and buy.price == centre - step
        # The buy fills 2 of 3 (as the monitor would report it).
        await _event(redis, gf1, "partially_filled", 2)
        async with asyncio.timeout(SAFETY_S):
            while gf5 not in strategy.state.orders:
                await asyncio.sleep(0.02)
        counter = strategy.state.orders[gf5]
        assert (counter.side, counter.price, counter.size) == ("sell", centre, 2)
        assert strategy.state.position == 2
        # Decided first, then registered and sent: wait for the exchange to know it.
        placed = await _at_exchange(rest, gf5)
        assert (placed.side, placed.price, placed.size) == ("sell", centre, 2)
    # Shutdown cancelled every own order.
    assert await _own_active(rest, "gf") == []
    assert metrics.registry.get_sample_value("kumex_strategy_fills_total") == 1
    assert metrics.registry.get_sample_value("kumex_strategy_counter_orders_total") == 1

    # Restart: the fill event is not acted upon twice; the grid comes back, no counter again.
    again = GridStrategy(settings, redis, rest)
    await again.start()
    live_after = await _own_active(rest, "gf")
    assert gf5 not in {o.client_oid for o in live_after}
    # The fill above was told by a made-up event: the exchange's final record of gf1 (canceled
    # at the shutdown, nothing filled), adopted on restart, is the last word on it.
    assert again.state.position == 0
    sells_at_centre = [o for o in live_after if o.side == "sell" and o.price == centre]
    assert sells_at_centre == []
    assert len({o.client_oid for o in live_after}) == len(live_after)
    await again.shutdown()


async def test_a_rate_limited_counter_order_is_sent_again_under_a_new_client_oid(
        sandbox: SandboxProcess, redis_url: str, redis: aioredis.Redis,
        rest: KumexRestClient) -> None:
    centre = await _centre_at_best_ask(sandbox, rest)
    settings = _settings(sandbox, redis_url, centre, client_oid_prefix="gr")
    metrics = StrategyMetrics()
    strategy = GridStrategy(settings, redis, rest, metrics=metrics)
    async with _running(strategy):
        # Every REST call answers 429 for a moment: the counter-order to this fill is
        # refused (never accepted), so the grid decides it again once the wait is over.
        _control(sandbox, "/sandbox/rest-error", {"status": 429, "seconds": 1.0})
        await _event(redis, _oid(strategy, 1), "filled", 3)

        async def answered() -> list[Any]:
            try:
                active = await _own_active(rest, "gr")
            except RateLimited:  # the test's own reads fall in the window too
                return []
            return [o for o in active if (o.side, o.price, o.size) == ("sell", centre, 3)]

        (placed,) = await eventually(answered, "the counter-order accepted at last")
        # The 5th and any retry that still fell in the window were refused: never at the
        # exchange, each marked rejected; the one accepted is a later clientOid.
        refused = [c for c, o in strategy.state.orders.items() if o.status == "rejected"]
        assert _oid(strategy, 5) in refused and placed.client_oid not in refused
        for coid in refused:
            assert await rest.get_order_by_client_oid(coid, SYMBOL) is None
            stored = await order_store.load(redis, SYMBOL, coid)
            assert stored is not None and stored.status is OrderStatus.REJECTED
        again = strategy.state.orders[placed.client_oid]
        assert (again.side, again.price, again.size) == ("sell", centre, 3)
    assert metrics.registry.get_sample_value("kumex_strategy_orders_retried_total") == \
        len(refused)
    assert metrics.registry.get_sample_value("kumex_strategy_orders_refused_total",
                                             {"code": "429000"}) == len(refused)


async def test_a_counter_order_the_exchange_never_saw_is_sent_again(
        sandbox: SandboxProcess, redis_url: str, redis: aioredis.Redis,
        rest: KumexRestClient) -> None:
    centre = await _centre_at_best_ask(sandbox, rest)
    settings = _settings(sandbox, redis_url, centre, client_oid_prefix="gu",
                         resolve_after=30.0)
    metrics = StrategyMetrics()
    strategy = GridStrategy(settings, redis, rest, metrics=metrics)
    async with _running(strategy):
        # A 500 window: the counter-order's outcome is unknown, so it is left pending...
        _control(sandbox, "/sandbox/rest-error", {"status": 500, "seconds": 0.5})
        gu5, gu6 = _oid(strategy, 5), _oid(strategy, 6)
        await _event(redis, _oid(strategy, 1), "filled", 3)
        async with asyncio.timeout(SAFETY_S):
            while gu5 not in strategy.state.orders:
                await asyncio.sleep(0.02)
        await eventually(lambda: metrics.registry.get_sample_value(
            "kumex_strategy_order_timeouts_total") == 1, "the unknown outcome")
        assert await rest.get_order_by_client_oid(gu5, SYMBOL) is None
        # ...until the order monitor rejects it as never seen on the stream: the grid
        # asks the exchange, which has no such order, and decides it again.
        await redis.xadd(keys.order_events(SYMBOL), {
            "clientOid": gu5, "orderId": "", "status": "rejected", "filledSize": "0",
            "sequence": "1", "reason": "unseen", "change": "unseen"})
        placed = await _at_exchange(rest, gu6)
        assert (placed.side, placed.price, placed.size) == ("sell", centre, 3)
        again = strategy.state.orders[gu6]
        assert (again.side, again.price, again.size) == ("sell", centre, 3)
    assert metrics.registry.get_sample_value("kumex_strategy_orders_retried_total") == 1


def test_sigterm_cancels_every_own_order(sandbox: SandboxProcess, redis_url: str) -> None:
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as http:
        contract = http.get(f"/api/v1/contracts/{SYMBOL}").json()["data"]
    centre = Decimal(str(contract["markPrice"])).quantize(Decimal("0.1"))
    strategy = ServiceProcess("services.strategy", {
        "REDIS_URL": redis_url, "KUMEX_BASE_URL": sandbox.base_url, "KUMEX_SYMBOLS": SYMBOL,
        "KUMEX_API_KEY": DEMO_KEY_1.key, "KUMEX_API_SECRET": DEMO_KEY_1.secret,
        "KUMEX_API_PASSPHRASE": DEMO_KEY_1.passphrase, "STRATEGY_CENTRE_PRICE": f"{centre:f}",
        "STRATEGY_STEP_TICKS": "40", "STRATEGY_LEVELS": "3", "STRATEGY_CLIENT_OID_PREFIX": "sig",
        "STRATEGY_HTTP_HOST": "127.0.0.1", "STRATEGY_MAX_POSITION": "10", "LOG_LEVEL": "INFO",
    }, port_var="STRATEGY_HTTP_PORT", prefix=("STRATEGY_", "KUMEX_", "SANDBOX_"),
        stop_timeout=SAFETY_S)
    try:
        strategy.start(wait=False)
        with httpx.Client(base_url=strategy.url, timeout=2.0) as http:
            def ready() -> bool:
                strategy.check_running()
                with contextlib.suppress(httpx.HTTPError):
                    return http.get("/readyz").status_code == 200
                return False

            wait_for(ready, "the strategy to be ready", proc=strategy)
            state = http.get("/state").json()
            metrics = http.get("/metrics").text
        assert state["openOrders"] == 6 and state["centre"] == f"{centre:f}"
        assert "kumex_strategy_orders_placed_total 6.0" in metrics
        own = _sync_own_active(sandbox, "sig")
        assert len(own) == 6
        assert strategy.stop() == 0
    finally:
        text = strategy.log_text()
        strategy.close()
        assert _sync_own_active(sandbox, "sig") == [], text
        assert "no own order active at the exchange" in text
        for secret in (DEMO_KEY_1.secret, DEMO_KEY_1.passphrase):
            assert secret not in text
        assert all(len(line.split(" ", 3)) >= 3 for line in text.splitlines() if line)


def _sync_own_active(sandbox: SandboxProcess, prefix: str) -> list[str]:
    async def go() -> list[str]:
        async with KumexRestClient(sandbox.base_url, DEMO_KEY_1.key, DEMO_KEY_1.secret,
                                   DEMO_KEY_1.passphrase, timeout=10.0) as client:
            return [o.client_oid for o in await _own_active(client, prefix)]

    return asyncio.run(go())


async def test_end_to_end_a_real_fill_gives_a_counter_order(
        sandbox: SandboxProcess, redis_url: str, redis: aioredis.Redis,
        rest: KumexRestClient) -> None:
    """Sandbox -> feed -> Redis -> order monitor -> order events -> strategy -> sandbox."""
    from kumex_l3.testing.sandbox_proc import DEMO_KEY_2
    from services.feed.run import run_feed
    from services.feed.settings import FeedSettings
    from services.order_monitor.service import run_monitor
    from services.order_monitor.settings import MonitorSettings

    common: dict[str, Any] = {"redis_url": redis_url, "base_url": sandbox.base_url,
                              "redis_cluster": is_cluster_url(redis_url), "symbols": [SYMBOL]}
    creds: dict[str, Any] = {"api_key": DEMO_KEY_1.key, "api_secret": DEMO_KEY_1.secret,
                              "api_passphrase": DEMO_KEY_1.passphrase}
    services_stop = asyncio.Event()
    feed = asyncio.create_task(run_feed(FeedSettings(
        **common, http_host="127.0.0.1", http_port=0, snapshot_per_min=0), services_stop))
    monitor = asyncio.create_task(run_monitor(MonitorSettings(
        **common, **creds, http_host="127.0.0.1", http_port=0, block_ms=100, refresh_s=0.2,
        lease_ttl_s=2, replica_id="strategy-e2e"), services_stop))
    strategy_stop = asyncio.Event()
    strategy_task: asyncio.Task[None] | None = None
    try:
        async def monitor_consuming() -> bool:
            if not await redis.exists(keys.l3_stream(SYMBOL)):
                return False
            groups = await redis.xinfo_groups(keys.l3_stream(SYMBOL))
            return bool(groups) and await redis.exists(keys.owner(SYMBOL, "order_monitor")) > 0

        await eventually(monitor_consuming, "feed and order monitor")
        centre = await _mark(rest)
        step = Decimal("0.1") * 5
        settings = _settings(sandbox, redis_url, centre, client_oid_prefix="ge", levels=1,
                             step_ticks=5, size=3)
        strategy = GridStrategy(settings, redis, rest)
        strategy_task = asyncio.create_task(strategy.run(strategy_stop))
        await eventually(lambda: strategy.ready, "the strategy started")
        ge1, ge2, ge3 = (_oid(strategy, n) for n in (1, 2, 3))

        async def grid_open() -> bool:
            orders = await order_store.load_many(redis, SYMBOL, [ge1, ge2])
            return len(orders) == 2 and all(o.status is OrderStatus.OPEN
                                            for o in orders.values())

        await eventually(grid_open, "the grid open on the stream")
        buy = await order_store.load(redis, SYMBOL, ge1)
        assert buy is not None and buy.side == "buy" and Decimal(buy.price) == centre - step

        # Another user sells into every bid down to the grid's buy and 2 of it (FIFO). The
        # sandbox's flow leaves hidden orders, which no book shows and which come first
        # when their price is better: every bid above the grid's is sold first (IOC, until
        # one fills less than it asked), then what the public book shows ahead of ours.
        tick = Decimal(str((await rest.contract(SYMBOL))["tickSize"]))
        async with KumexRestClient(sandbox.base_url, DEMO_KEY_2.key, DEMO_KEY_2.secret,
                                   DEMO_KEY_2.passphrase, timeout=10.0) as taker:
            for n in range(100):
                sweep = await taker.place_order(
                    client_oid=f"sweep-{n}", symbol=SYMBOL, side="sell", price=centre - step + tick,
                    size=10_000, leverage=2, time_in_force="IOC")
                swept = await taker.get_order(sweep.order_id)
                if swept is None or swept.filled_size < 10_000:
                    break
            with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as http:
                book = http.get(f"/sandbox/book/{SYMBOL}").json()
            assert Decimal(book["bids"][0]["price"]) == centre - step, book["bids"][:2]
            ahead = 0
            for resting in book["bids"][0]["orders"]:
                if resting["orderId"] == buy.order_id:
                    break
                ahead += int(resting["size"])
            placed = await taker.place_order(client_oid="taker-1", symbol=SYMBOL, side="sell",
                                             price=centre - step, size=ahead + 2, leverage=2,
                                             time_in_force="IOC")
            sold = await taker.get_order(placed.order_id)
        # The fill happened at the exchange, or the stream cannot be blamed for what follows.
        ours = await rest.get_order(buy.order_id)
        assert ours is not None and ours.filled_size == 2, (
            f"the taker's IOC sell of {ahead + 2} at {centre - step} did not fill 2 of the "
            f"grid's buy: taker {sold}, grid buy {ours}, bids read {book['bids'][:8]}")

        async def counter_open() -> bool:
            order = await order_store.load(redis, SYMBOL, ge3)
            return order is not None and order.status is OrderStatus.OPEN

        try:
            await eventually(counter_open, "the counter-order open on the stream")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await _explain(redis, rest, strategy)}") from None
        counter = await order_store.load(redis, SYMBOL, ge3)
        assert counter is not None
        assert (counter.side, Decimal(counter.price), int(counter.size)) == ("sell", centre, 2)
        filled = await order_store.load(redis, SYMBOL, ge1)
        assert filled is not None and filled.status is OrderStatus.PARTIALLY_FILLED
        assert int(filled.filled_size) == 2
        assert strategy.state.position == 2
        live = {o.client_oid for o in await _own_active(rest, "ge")}
        assert live == {ge1, ge2, ge3}

        # Stop: cancel all, confirmed at the exchange, then on the stream by the monitor.
        strategy_stop.set()
        await strategy_task
        assert await _own_active(rest, "ge") == []

        async def all_canceled() -> bool:
            orders = await order_store.load_many(redis, SYMBOL, [ge1, ge2, ge3])
            return all(o.status is OrderStatus.CANCELED for o in orders.values())

        await eventually(all_canceled, "cancels on the stream")
        assert await order_store.active(redis, SYMBOL) == []
    finally:
        strategy_stop.set()
        if strategy_task is not None and not strategy_task.done():
            await strategy_task
        services_stop.set()
        assert await feed == 0
        assert await monitor == 0


async def _explain(redis: aioredis.Redis, rest: KumexRestClient,
                   strategy: GridStrategy) -> str:
    """What the grid, Redis and the exchange hold: for a failure's message."""
    lines = [f"grid: {c} {o.side} {o.size}@{o.price} {o.status} filled={o.filled}"
             for c, o in strategy.state.orders.items()]
    for coid in strategy.state.orders:
        lines.append(f"hash {coid}: {await redis.hgetall(keys.order(SYMBOL, coid))}")
    for _, fields in await redis.xrange(keys.order_events(SYMBOL)):
        lines.append(f"event: {fields}")
    for record in await rest.active_orders(SYMBOL):
        lines.append(f"exchange: {record.client_oid} {record.side} {record.size}@"
                     f"{record.price} filled={record.filled_size}")
    return "\n".join(lines)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from kumex_l3.config import load_settings

    for name in list(os.environ):
        if name.startswith(("STRATEGY_", "KUMEX_", "BOOK_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KUMEX_SYMBOLS", "ETHUSDTM,XBTUSDM")
    monkeypatch.setenv("STRATEGY_DRY_RUN", "true")
    monkeypatch.setenv("BOOK_URL", "http://book:8080/")
    settings = load_settings(StrategySettings)
    assert settings.trade_symbol == "ETHUSDTM" and settings.http_port == 8083
    assert settings.book_url == "http://book:8080" and settings.client_oid_prefix == "grid"
    monkeypatch.setenv("STRATEGY_DRY_RUN", "false")
    monkeypatch.setenv("KUMEX_API_SECRET", "zz-very-secret-zz")
    with pytest.raises(SystemExit):
        load_settings(StrategySettings)
    err = capsys.readouterr().err
    assert "STRATEGY_DRY_RUN" in err and "KUMEX_API_KEY" in err
    assert "zz-very-secret-zz" not in err
