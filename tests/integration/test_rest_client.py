"""KumexRestClient against the real sandbox process: every call and the error mapping.

Faults are injected through the sandbox's control API (``/sandbox/rest-error``,
``/sandbox/faults``); retry waits go through an injected ``sleep`` that can end
a fault window, so nothing here depends on timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from kumex_l3.backoff import Backoff
from kumex_l3.rest import (
    AuthError,
    CannotCancel,
    DuplicateClientOid,
    InvalidParameter,
    InvalidSymbol,
    KumexRestClient,
    OrderNotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    TooManyOrders,
)
from kumex_l3.testing.sandbox_proc import DEMO_KEY_1, DEMO_KEY_2, DemoKey, SandboxProcess

SYMBOL = "XBTUSDM"
TICK = Decimal("0.1")


def _fast_backoff() -> Backoff:
    return Backoff(initial=0.001, factor=2.0, max_delay=0.01, seed=1)


def _client(sandbox: SandboxProcess, key: DemoKey = DEMO_KEY_1, **kwargs: Any) -> KumexRestClient:
    kwargs.setdefault("backoff", _fast_backoff)
    return KumexRestClient(sandbox.base_url, key.key, key.secret, key.passphrase,
                           timeout=kwargs.pop("timeout", 10.0), **kwargs)


def _control(sandbox: SandboxProcess, path: str, body: dict[str, Any]) -> None:
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as client:
        client.post(path, json=body).raise_for_status()


@pytest.fixture
async def rest(sandbox: SandboxProcess) -> AsyncIterator[KumexRestClient]:
    async with _client(sandbox) as client:
        await client.cancel_all(SYMBOL)
        yield client
        _control(sandbox, "/sandbox/faults", {"rest_error_status": None, "rest_latency_ms": 5.0})
        await client.cancel_all(SYMBOL)


async def _far_buy_price(rest: KumexRestClient) -> Decimal:
    """A buy price well below the market: the order rests and never fills."""
    contract = await rest.contract(SYMBOL)
    mark = Decimal(str(contract.get("markPrice") or 30000))
    return ((mark * Decimal("0.8")) / TICK).to_integral_value() * TICK


# ---------------------------------------------------------------------- public calls


async def test_public_calls(rest: KumexRestClient) -> None:
    server_ms = await rest.timestamp()
    assert server_ms > 1_600_000_000_000
    offset = await rest.sync_time()
    assert rest.clock_offset_ms == offset
    contracts = await rest.contracts_active()
    assert SYMBOL in {c["symbol"] for c in contracts}
    contract = await rest.contract(SYMBOL)
    assert contract["symbol"] == SYMBOL
    assert Decimal(str(contract["tickSize"])) == TICK
    bullet = await rest.bullet_public()
    assert bullet["token"]
    assert bullet["instanceServers"][0]["endpoint"].startswith("ws")
    snap = await rest.level3_snapshot(SYMBOL)
    assert snap["symbol"] == SYMBOL
    assert isinstance(snap["sequence"], int)
    with pytest.raises(InvalidSymbol) as info:
        await rest.level3_snapshot("NOPEUSDM")
    assert info.value.code == "200003"
    assert info.value.refused


async def test_public_calls_need_no_credentials(sandbox: SandboxProcess) -> None:
    async with KumexRestClient(sandbox.base_url, timeout=10.0) as client:
        assert await client.timestamp() > 0
        with pytest.raises(AuthError):
            await client.active_orders(SYMBOL)


# ---------------------------------------------------------------------- orders


async def test_order_lifecycle(rest: KumexRestClient) -> None:
    price = await _far_buy_price(rest)
    placed = await rest.place_order(client_oid="rt-life-1", symbol=SYMBOL, side="buy",
                                    price=price, size=3, leverage=5)
    assert placed.client_oid == "rt-life-1"
    by_id = await rest.get_order(placed.order_id)
    assert by_id is not None
    assert (by_id.client_oid, by_id.side, by_id.price, by_id.size) == ("rt-life-1", "buy",
                                                                       price, 3)
    assert by_id.is_active and by_id.filled_size == 0
    by_coid = await rest.get_order_by_client_oid("rt-life-1")
    assert by_coid is not None and by_coid.id == placed.order_id
    assert [o.id for o in await rest.active_orders(SYMBOL)] == [placed.order_id]

    assert await rest.cancel_order(placed.order_id) == [placed.order_id]
    done = await rest.get_order(placed.order_id)
    assert done is not None and not done.is_active and done.status == "done"
    assert await rest.active_orders(SYMBOL) == []

    # Cancel twice: the venue refuses the second one (100004).
    with pytest.raises(CannotCancel) as info:
        await rest.cancel_order(placed.order_id)
    assert info.value.code == "100004"
    with pytest.raises(OrderNotFound):
        await rest.cancel_order("ffffffffffffffffffffffff")
    assert await rest.get_order("ffffffffffffffffffffffff") is None
    assert await rest.get_order_by_client_oid("rt-never-placed") is None


async def test_cancel_by_client_oid_and_cancel_all(rest: KumexRestClient) -> None:
    price = await _far_buy_price(rest)
    for i in range(3):
        await rest.place_order(client_oid=f"rt-ca-{i}", symbol=SYMBOL, side="buy",
                               price=price - i * TICK, size=1, leverage="3")
    assert await rest.cancel_by_client_oid("rt-ca-0", SYMBOL) == "rt-ca-0"
    remaining = {o.client_oid for o in await rest.active_orders(SYMBOL)}
    assert remaining == {"rt-ca-1", "rt-ca-2"}
    cancelled = await rest.cancel_all(SYMBOL)
    assert len(cancelled) == 2
    assert await rest.active_orders(SYMBOL) == []
    with pytest.raises(CannotCancel):
        await rest.cancel_by_client_oid("rt-ca-0", SYMBOL)


async def test_refusals_map_to_typed_errors(rest: KumexRestClient) -> None:
    price = await _far_buy_price(rest)
    await rest.place_order(client_oid="rt-dup", symbol=SYMBOL, side="buy", price=price, size=1,
                           leverage=1)
    with pytest.raises(DuplicateClientOid) as dup:
        await rest.place_order(client_oid="rt-dup", symbol=SYMBOL, side="buy", price=price,
                               size=1, leverage=1)
    assert dup.value.code == "300018" and dup.value.refused
    with pytest.raises(InvalidParameter) as bad_tick:
        await rest.place_order(client_oid="rt-tick", symbol=SYMBOL, side="buy",
                               price=price + Decimal("0.05"), size=1, leverage=1)
    assert bad_tick.value.code == "300000"
    with pytest.raises(InvalidParameter) as bad_side:
        await rest.place_order(client_oid="rt-side", symbol=SYMBOL, side="up", price=price,
                               size=1, leverage=1)
    assert bad_side.value.code == "400100"
    with pytest.raises(InvalidSymbol):
        await rest.place_order(client_oid="rt-sym", symbol="NOPEUSDM", side="buy", price=price,
                               size=1, leverage=1)
    # Only the first order exists.
    assert [o.client_oid for o in await rest.active_orders(SYMBOL)] == ["rt-dup"]


@pytest.mark.parametrize(("key", "code"), [
    (DemoKey("no-such-key", "unknown-secret-1", "unknown-passphrase-1"), "400003"),
    (DemoKey(DEMO_KEY_1.key, DEMO_KEY_1.secret, "wrong-passphrase"), "400004"),
    (DemoKey(DEMO_KEY_1.key, "wrong-secret", DEMO_KEY_1.passphrase), "400004"),
])
async def test_bad_credentials_are_auth_errors(sandbox: SandboxProcess, key: DemoKey,
                                               code: str) -> None:
    async with _client(sandbox, key) as client:
        with pytest.raises(AuthError) as info:
            await client.active_orders(SYMBOL)
    assert info.value.code == code
    assert info.value.http_status == 401
    for secret in (key.secret, key.passphrase):
        assert secret not in str(info.value) and secret not in repr(info.value)
        assert secret not in repr(client)


async def test_clock_skew_is_an_auth_error(sandbox: SandboxProcess) -> None:
    async with _client(sandbox, clock_ms=lambda: 1_000_000) as client:
        with pytest.raises(AuthError) as info:
            await client.active_orders(SYMBOL)
        assert info.value.code == "400002"
        await client.sync_time()  # the offset repairs the clock
        assert await client.active_orders(SYMBOL) == []


async def test_active_orders_reads_every_page_and_too_many_orders(
        sandbox: SandboxProcess) -> None:
    # The second demo user, on another contract: its limit is not shared with other tests.
    symbol = "ETHUSDTM"
    async with _client(sandbox, DEMO_KEY_2) as client:
        await client.cancel_all(symbol)
        try:
            contract = await client.contract(symbol)
            tick = Decimal(str(contract["tickSize"]))
            mark = Decimal(str(contract.get("markPrice") or 2000))
            low = ((mark * Decimal("0.7")) / tick).to_integral_value() * tick
            limit = 100
            for i in range(limit):
                await client.place_order(client_oid=f"rt-many-{i}", symbol=symbol, side="buy",
                                         price=low - i * tick, size=1, leverage=2)
            with pytest.raises(TooManyOrders) as info:
                await client.place_order(client_oid="rt-many-x", symbol=symbol, side="buy",
                                         price=low, size=1, leverage=2)
            assert info.value.code == "300001"
            orders = await client.active_orders(symbol, page_size=30)
            assert sorted(o.client_oid for o in orders) == sorted(
                f"rt-many-{i}" for i in range(limit))
        finally:
            await client.cancel_all(symbol)


# ---------------------------------------------------------------------- faults


def _ending_sleep(sandbox: SandboxProcess, after: int,
                  delays: list[float]) -> Callable[[float], Awaitable[None]]:
    """A ``sleep`` that records delays and ends the REST error window at the ``after``-th."""

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == after:
            _control(sandbox, "/sandbox/rest-error", {"status": None})

    return sleep


@pytest.mark.parametrize(("status", "error"), [(429, RateLimited), (500, ServerError)])
async def test_idempotent_calls_retry_through_rate_limit_and_server_errors(
        sandbox: SandboxProcess, status: int, error: type[Exception]) -> None:
    delays: list[float] = []
    async with _client(sandbox, sleep=_ending_sleep(sandbox, 2, delays), retries=5) as client:
        _control(sandbox, "/sandbox/rest-error", {"status": status, "seconds": 60})
        assert await client.active_orders(SYMBOL) == []
        assert len(delays) == 2
        assert await client.cancel_all(SYMBOL) == []
    # Without retries the error surfaces, typed.
    async with _client(sandbox, retries=0) as client:
        _control(sandbox, "/sandbox/rest-error", {"status": status, "seconds": 60})
        try:
            with pytest.raises(error) as info:
                await client.timestamp()
            assert info.value.code == f"{status}000"  # type: ignore[attr-defined]
        finally:
            _control(sandbox, "/sandbox/rest-error", {"status": None})


async def test_place_order_is_never_retried(sandbox: SandboxProcess,
                                            rest: KumexRestClient) -> None:
    price = await _far_buy_price(rest)
    delays: list[float] = []
    async with _client(sandbox, sleep=_ending_sleep(sandbox, 1, delays), retries=5) as client:
        _control(sandbox, "/sandbox/rest-error", {"status": 429, "seconds": 60})
        with pytest.raises(RateLimited) as info:
            await client.place_order(client_oid="rt-429", symbol=SYMBOL, side="buy",
                                     price=price, size=1, leverage=1)
        assert info.value.refused  # a 429 is a refusal: the engine never saw it
        assert delays == []
        _control(sandbox, "/sandbox/rest-error", {"status": None})
        assert await client.get_order_by_client_oid("rt-429") is None


async def test_timeout_is_request_timeout_and_places_no_duplicate(
        sandbox: SandboxProcess, rest: KumexRestClient) -> None:
    price = await _far_buy_price(rest)
    # The sandbox acts, then holds the reply longer than the client waits.
    _control(sandbox, "/sandbox/faults", {"rest_latency_ms": 2000.0})
    delays: list[float] = []
    async with _client(sandbox, timeout=0.3, retries=5,
                       sleep=_ending_sleep(sandbox, 99, delays)) as slow:
        with pytest.raises(RequestTimeout) as info:
            await slow.place_order(client_oid="rt-timeout", symbol=SYMBOL, side="buy",
                                   price=price, size=2, leverage=1)
    assert info.value.maybe_sent and not info.value.refused
    assert not isinstance(info.value, RateLimited | ServerError)
    assert delays == []  # no retry of the POST
    _control(sandbox, "/sandbox/faults", {"rest_latency_ms": 5.0})
    # The order was placed exactly once: find it by clientOid, not by sending again.
    found = await rest.get_order_by_client_oid("rt-timeout")
    assert found is not None and found.is_active
    assert [o.client_oid for o in await rest.active_orders(SYMBOL)] == ["rt-timeout"]


async def test_connection_refused_is_not_sent(sandbox: SandboxProcess) -> None:
    from kumex_l3.rest import ConnectionFailed
    from kumex_l3.testing.sandbox_proc import free_port

    async with KumexRestClient(f"http://127.0.0.1:{free_port()}", "k", "s", "p", timeout=2.0,
                               retries=0) as client:
        with pytest.raises(ConnectionFailed) as info:
            await client.place_order(client_oid="x", symbol=SYMBOL, side="buy", price="1",
                                     size=1, leverage=1)
    assert not info.value.maybe_sent and info.value.refused
    assert isinstance(info.value.__cause__, httpx.ConnectError)
