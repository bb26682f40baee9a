"""kumex_l3.order_store on a real Redis: registration, atomic saves, TTLs, events."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio

from kumex_l3 import keys, order_store
from kumex_l3.messages import DataMessage, parse_message
from kumex_l3.orders import Change, OrderStatus, OwnOrder, apply, reconcile

SYM = "XBTUSDM"
OID = "629727c9edde6b0001f422a7"
T0 = 1_700_000_000_000


def msg(subject: str, seq: int, **data: Any) -> DataMessage:
    body = {"type": "message", "topic": f"/contractMarket/level3v2:{SYM}", "subject": subject,
            "data": {"symbol": SYM, "sequence": seq, "ts": (T0 + seq) * 1_000_000, **data}}
    return parse_message(json.dumps(body))  # type: ignore[return-value]


async def reg(r: redis.asyncio.Redis, coid: str = "c1", size: int = 10, **kw: Any) -> bool:
    return await order_store.register(r, SYM, coid, side="buy", price="31570.0", size=size,
                                      now_ms=T0, **kw)


async def events(r: redis.asyncio.Redis) -> list[dict[str, str]]:
    entries = await r.xrange(keys.order_events(SYM))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]



@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """Every test here runs on one Redis, then on the Redis Cluster."""
    return any_redis_url

async def test_register_creates_a_pending_order_once(redis_client: redis.asyncio.Redis) -> None:
    assert await reg(redis_client, extra={"level": "4"})
    h = await redis_client.hgetall(keys.order(SYM, "c1"))
    got = {k.decode(): v.decode() for k, v in h.items()}
    assert got["status"] == "pending" and got["filledSize"] == "0"
    assert got["lastSequence"] == "0" and got["orderId"] == ""
    assert got["createdAt"] == got["updatedAt"] == got["submittedAt"] == str(T0)
    assert got["level"] == "4" and got["size"] == "10"
    assert await order_store.active(redis_client, SYM) == ["c1"]
    # The clientOid is the idempotency key: a second registration touches nothing.
    assert not await order_store.register(redis_client, SYM, "c1", side="sell", price="1",
                                          size=99, now_ms=T0 + 5)
    again = await order_store.load(redis_client, SYM, "c1")
    assert again is not None and again.side == "buy" and again.size == 10
    assert await events(redis_client) == []


async def test_register_refuses_a_bad_client_oid(redis_client: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError):
        await reg(redis_client, coid="no spaces")
    assert await redis_client.dbsize() == 0


async def test_load_resolve_and_active_of_unknown(redis_client: redis.asyncio.Redis) -> None:
    assert await order_store.load(redis_client, SYM, "nope") is None
    assert await order_store.resolve(redis_client, SYM, OID) is None
    assert await order_store.active(redis_client, SYM) == []


async def test_save_change_writes_everything_in_one_go(redis_client: redis.asyncio.Redis) -> None:
    await reg(redis_client)
    order = await order_store.load(redis_client, SYM, "c1")
    assert order is not None
    t = apply(order, msg("received", 100, orderId=OID, clientOid="c1"), T0 + 1)
    assert await order_store.save_change(redis_client, order, t, stream_id="1700000000001-0",
                                         finished_ttl_s=60)
    stored = await order_store.load(redis_client, SYM, "c1")
    assert stored == order and stored.status is OrderStatus.RECEIVED
    assert await order_store.resolve(redis_client, SYM, OID) == "c1"
    assert await redis_client.ttl(keys.order_id(SYM, OID)) == -1
    assert await order_store.active(redis_client, SYM) == ["c1"]
    [ev] = await events(redis_client)
    assert {k: ev[k] for k in ("clientOid", "orderId", "status", "filledSize", "sequence",
                               "reason", "change", "streamId", "prevStatus")} == {
        "clientOid": "c1", "orderId": OID, "status": "received", "filledSize": "0",
        "sequence": "100", "reason": "", "change": "received", "streamId": "1700000000001-0",
        "prevStatus": "pending"}


async def test_finishing_removes_from_active_and_sets_ttls(
    redis_client: redis.asyncio.Redis,
) -> None:
    await reg(redis_client)
    await reg(redis_client, coid="c2")
    order = await order_store.load(redis_client, SYM, "c1")
    assert order is not None
    steps = [(apply(order, m, T0), f"1-{i}") for i, m in enumerate([
        msg("received", 100, orderId=OID, clientOid="c1"),
        msg("open", 101, side="buy", price="31570.0", size="10", orderId=OID),
        msg("match", 102, side="sell", price="31570.0", size="10", makerOrderId=OID,
            takerOrderId="x", tradeId="T1"),
        msg("done", 103, orderId=OID, reason="filled"),
    ])]
    assert [t.changed for t, _ in steps] == [True, True, True, False]
    assert await order_store.save_changes(redis_client, order, steps, finished_ttl_s=120)
    assert await order_store.active(redis_client, SYM) == ["c2"]
    assert 0 < await redis_client.ttl(keys.order(SYM, "c1")) <= 120
    assert 0 < await redis_client.ttl(keys.order_id(SYM, OID)) <= 120
    stored = await order_store.load(redis_client, SYM, "c1")
    assert stored is not None and stored.status is OrderStatus.FILLED
    assert stored.filled_size == 10 and stored.last_sequence == 103
    evs = await events(redis_client)
    assert [e["change"] for e in evs] == ["received", "open", "fill"]
    assert evs[2]["fillSize"] == "10" and evs[2]["tradeId"] == "T1"
    assert evs[2]["liquidity"] == "maker" and evs[2]["status"] == "filled"


async def test_a_stale_revision_writes_nothing(redis_client: redis.asyncio.Redis) -> None:
    await reg(redis_client)
    a = await order_store.load(redis_client, SYM, "c1")
    b = await order_store.load(redis_client, SYM, "c1")
    assert a is not None and b is not None
    ta = apply(a, msg("received", 100, orderId=OID, clientOid="c1"), T0)
    assert await order_store.save_change(redis_client, a, ta, stream_id=None)
    tb = apply(b, msg("received", 100, orderId=OID, clientOid="c1"), T0)
    assert not await order_store.save_change(redis_client, b, tb, stream_id=None)
    assert b.rev == a.rev - 1  # left at the revision it was loaded at
    assert len(await events(redis_client)) == 1
    # A vanished order is not written back either.
    await redis_client.delete(keys.order(SYM, "c1"))
    assert not await order_store.save_change(redis_client, a, ta, stream_id=None)
    assert await redis_client.exists(keys.order(SYM, "c1")) == 0


async def test_save_many_one_round_trip_and_script_reload(
    redis_client: redis.asyncio.Redis,
) -> None:
    await redis_client.script_flush()
    for i in range(3):
        await reg(redis_client, coid=f"c{i}")
    loaded = await order_store.load_many(redis_client, SYM, ["c0", "c1", "c2", "missing"])
    assert sorted(loaded) == ["c0", "c1", "c2"]
    items = []
    for i, (coid, order) in enumerate(sorted(loaded.items())):
        t = apply(order, msg("received", 10 + i, orderId=f"o{i}", clientOid=coid), T0)
        items.append((order, [(t, None)]))
    await redis_client.script_flush()  # NOSCRIPT on the first try: loaded and retried
    assert await order_store.save_many(redis_client, items) == [True, True, True]
    assert [await order_store.resolve(redis_client, SYM, f"o{i}") for i in range(3)] == [
        "c0", "c1", "c2"]
    assert [e["sequence"] for e in await events(redis_client)] == ["10", "11", "12"]


async def test_mark_rejected(redis_client: redis.asyncio.Redis) -> None:
    await reg(redis_client)
    t = await order_store.mark_rejected(redis_client, SYM, "c1", code="300001",
                                        msg="too many active orders", now_ms=T0 + 7,
                                        finished_ttl_s=30)
    assert t is not None and t.finished
    stored = await order_store.load(redis_client, SYM, "c1")
    assert stored is not None and stored.status is OrderStatus.REJECTED
    assert stored.reason == "300001 too many active orders"
    assert await order_store.active(redis_client, SYM) == []
    assert 0 < await redis_client.ttl(keys.order(SYM, "c1")) <= 30
    assert [e["change"] for e in await events(redis_client)] == ["rejected"]
    assert await order_store.mark_rejected(redis_client, SYM, "zz", code="1", msg="",
                                           now_ms=T0) is None


async def test_works_with_a_decoding_client(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await order_store.register(client, SYM, "d1", side="sell", price="1.5",
                                          size="3", now_ms=T0)
        order = await order_store.load(client, SYM, "d1")
        assert isinstance(order, OwnOrder) and order.size == 3
        t = apply(order, msg("received", 5, orderId=OID, clientOid="d1"), T0)
        assert await order_store.save_change(client, order, t, stream_id=None)
        assert await order_store.resolve(client, SYM, OID) == "d1"
        assert await order_store.active(client, SYM) == ["d1"]
    finally:
        await client.aclose()


async def test_registration_keeps_the_stream_head_and_a_received_before_it_is_not_ours(
        redis_client: redis.asyncio.Redis) -> None:
    """Someone used our clientOid on the stream before we registered it (the head was at
    500): that received is not ours; the first one after the registration is."""
    await redis_client.set(keys.stream_head(SYM), "500")
    assert await reg(redis_client)
    order = await order_store.load(redis_client, SYM, "c1")
    assert order is not None and order.after_sequence == 500
    assert not apply(order, msg("received", 480, orderId="f" * 24, clientOid="c1"), T0).changed
    assert apply(order, msg("received", 501, orderId=OID, clientOid="c1"), T0).changed
    assert order.order_id == OID


async def test_a_conflict_is_recorded_never_overwriting_and_a_relink_drops_the_old_index(
        redis_client: redis.asyncio.Redis) -> None:
    assert await reg(redis_client)
    order = await order_store.load(redis_client, SYM, "c1")
    assert order is not None
    foreign = "f" * 24
    linked = apply(order, msg("received", 1, orderId=foreign, clientOid="c1"), T0)
    assert await order_store.save_change(redis_client, order, linked, stream_id="1-0")
    # Our REST reply names our own orderId: a conflict, recorded, nothing overwritten.
    conflict = await order_store.confirm_order_id(redis_client, SYM, "c1", OID, now_ms=T0)
    assert conflict is not None and conflict.change is Change.CONFLICT
    stored = await order_store.load(redis_client, SYM, "c1")
    assert stored is not None and (stored.order_id, stored.conflicts) == (foreign, 1)
    (_, event) = await events(redis_client)
    assert (event["change"], event["orderId"], event["conflictOrderId"]) == (
        "conflict", foreign, OID)
    # Our account's record says which is ours: relinked, the foreign index gone.
    record = {"id": OID, "clientOid": "c1", "symbol": SYM, "size": 10, "filledSize": 10,
              "status": "done", "isActive": False, "cancelExist": False, "updatedAt": T0}
    relinked = reconcile(stored, record, T0 + 1)
    assert await order_store.save_change(redis_client, stored, relinked, stream_id=None)
    assert await redis_client.get(keys.order_id(SYM, OID)) == b"c1"
    assert await redis_client.get(keys.order_id(SYM, foreign)) is None
    last = (await events(redis_client))[-1]
    assert (last["change"], last["orderId"], last["previousOrderId"], last["status"]) == (
        "relinked", OID, foreign, "filled")


async def test_a_fenced_save_writes_nothing_once_the_lease_is_someone_elses(
        redis_client: redis.asyncio.Redis) -> None:
    """The order monitor's saves carry its lease value: a monitor paused past its lease
    (another replica holds it now) writes nothing at all."""
    assert await reg(redis_client)
    lease = keys.owner(SYM, "order_monitor")
    await redis_client.set(lease, "monitor-a")
    order = await order_store.load(redis_client, SYM, "c1")
    assert order is not None
    step = apply(order, msg("received", 1, orderId=OID, clientOid="c1"), T0)
    assert await order_store.save_many(redis_client, [(order, [(step, "1-0")])],
                                       fence=(lease, "monitor-a"), writer="a")
    assert (await events(redis_client))[-1]["by"] == "a"
    await redis_client.set(lease, "monitor-b")
    step = apply(order, msg("open", 2, orderId=OID, side="buy", price="31570.0", size="10",
                            orderTime=1), T0)
    with pytest.raises(order_store.Fenced):
        await order_store.save_many(redis_client, [(order, [(step, "2-0")])],
                                    fence=(lease, "monitor-a"), writer="a")
    stored = await order_store.load(redis_client, SYM, "c1")
    assert stored is not None and stored.status is OrderStatus.RECEIVED
    assert len(await events(redis_client)) == 1
