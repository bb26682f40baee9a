"""The order monitor as a separate process, on a real Redis (and the sandbox exchange).

* Own orders' messages mixed with thousands of others: hashes, events, active
  set and orderId index end exactly as the messages say; the monitor is killed
  with SIGKILL mid-run and restarted, a dead consumer's pending entries are
  taken over, then the whole stream is replayed from the start: no change is
  counted twice.
* Messages lost (``ctl=gap``, a sequence jump): the own orders are reconciled
  with the sandbox exchange (real orders placed over signed REST) and end as
  its ``GET /api/v1/orders/{id}`` says.

Waits poll with a safety ceiling; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families

from kumex_l3 import keys, order_store
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.sandbox_proc import (
    DEMO_KEY_1,
    DEMO_KEY_2,
    SANDBOX_TEST_ENV,
    KcAuth,
    SandboxProcess,
)
from kumex_l3.testing.synthetic import StreamGenerator

SYM = "XBTUSDM"
GROUP = "order_monitor"


# ---------------------------------------------------------------------- the process


class MonitorProcess(ServiceProcess):
    """``python -m services.order_monitor`` with its own environment, started at once."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__("services.order_monitor", {
            "KUMEX_SYMBOLS": SYM, "MONITOR_HTTP_HOST": "127.0.0.1", "MONITOR_BLOCK_MS": "100",
            "MONITOR_REFRESH_S": "0.2", "MONITOR_LEASE_TTL_S": "2",
            "MONITOR_REPLICA_ID": "test-replica", **env,
        }, port_var="MONITOR_HTTP_PORT", prefix=("MONITOR_", "KUMEX_", "REDIS_"),
            name="monitor", stop_timeout=15, check_stop=False)
        self.start(wait=False)

    def wait_ready(self, *, holding: bool = True) -> None:
        def ready() -> bool:
            self.check_running()
            with contextlib.suppress(httpx.HTTPError):
                body = httpx.get(f"{self.url}/readyz", timeout=2).json()
                held = body["symbols"].get(SYM, {}).get("ready")
                return bool(body["ready"] and (held or not holding))
            return False
        wait_for(ready, "monitor ready", proc=self)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text


@contextlib.contextmanager
def monitor(env: dict[str, str]) -> Iterator[MonitorProcess]:
    proc = MonitorProcess(env)
    try:
        yield proc
    except BaseException:
        sys.stderr.write(f"--- order monitor log ---\n{proc.log_text()}\n")
        raise
    finally:
        proc.close()


def caught_up(r: redis.Redis) -> bool:
    """The group has read every entry and acknowledged everything."""
    groups = {g["name"].decode(): g for g in r.xinfo_groups(keys.l3_stream(SYM))}
    g = groups.get(GROUP)
    return bool(g and g["pending"] == 0
                and g["last-delivered-id"] == r.xinfo_stream(keys.l3_stream(SYM))[
                    "last-generated-id"])


def text_hash(r: redis.Redis, coid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.order(SYM, coid)).items()}


def order_events(r: redis.Redis) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for _, fields in r.xrange(keys.order_events(SYM)):
        ev = {k.decode(): v.decode() for k, v in fields.items()}
        out.setdefault(ev["clientOid"], []).append(ev)
    return out


def register(url: str, orders: list[tuple[str, int, int]], *, side: str = "buy",
             price: str = "30000.0") -> None:
    """``order_store.register`` each ``(clientOid, size, submitted_ms)`` as the strategy does."""

    async def go() -> None:
        client = redis.asyncio.Redis.from_url(url)
        try:
            for coid, size, now_ms in orders:
                assert await order_store.register(client, SYM, coid, side=side, price=price,
                                                  size=size, now_ms=now_ms)
        finally:
            await client.aclose()

    asyncio.run(go())


# ---------------------------------------------------------------------- a mixed stream


def envelope(subject: str, **data: Any) -> dict[str, Any]:
    return {"type": "message", "topic": f"/contractMarket/level3v2:{SYM}", "subject": subject,
            "data": {"symbol": SYM, "sequence": 0, **data}}


@dataclass
class Own:
    """One own order of the scenario and what it must end as."""

    coid: str
    size: int
    status: str
    filled: int
    changes: list[str]
    oid: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    submitted_ago_ms: int = 0
    pair: Own | None = None  # its messages come after this order's (a self-trade)


def scenario(copies: int) -> tuple[list[Own], list[list[dict[str, Any]]]]:
    """Own orders of every kind (each kind ``copies`` times), and their message chains
    (each chain must keep its order on the stream)."""
    owns: list[Own] = []
    n = 0

    def new(size: int, status: str, filled: int, changes: list[str]) -> Own:
        nonlocal n
        n += 1
        own = Own(f"own-{n}", size, status, filled, changes, oid=f"00ff{n:020x}")
        owns.append(own)
        return own

    def rcv(o: Own, oid: str | None = None) -> dict[str, Any]:
        return envelope("received", orderId=oid or o.oid, clientOid=o.coid)

    def opn(o: Own, size: int) -> dict[str, Any]:
        return envelope("open", side="buy", price="30000.0", size=str(size), orderId=o.oid,
                        orderTime=1)

    def mtc(size: int, maker: str, taker: str) -> dict[str, Any]:
        return envelope("match", side="sell", price="30000.0", size=str(size),
                        makerOrderId=maker, takerOrderId=taker, tradeId=uuid.uuid4().hex)

    def done(o: Own, reason: str) -> dict[str, Any]:
        return envelope("done", orderId=o.oid, reason=reason)

    for _ in range(copies):
        o = new(10, "canceled", 5, ["received", "open", "fill", "fill", "done"])
        o.messages = [rcv(o), opn(o, 10), mtc(3, o.oid, "f1"), mtc(2, o.oid, "f2"),
                      done(o, "canceled")]
        o = new(4, "filled", 4, ["received", "open", "fill"])
        o.messages = [rcv(o), opn(o, 4), mtc(4, o.oid, "f3"), done(o, "filled")]
        o = new(5, "filled", 5, ["received", "fill", "fill"])
        o.messages = [rcv(o), mtc(2, "f4", o.oid), mtc(3, "f5", o.oid), done(o, "filled")]
        o = new(6, "partially_filled", 2, ["received", "fill"])
        o.messages = [rcv(o), mtc(2, "f6", o.oid), opn(o, 4)]
        o = new(7, "open", 0, ["received", "open"])
        o.messages = [rcv(o), opn(o, 7)]
        o = new(9, "partially_filled", 1, ["received", "open", "update", "fill"])
        o.messages = [rcv(o), opn(o, 9), envelope("update", orderId=o.oid, size="5"),
                      mtc(1, o.oid, "f7")]
        o = new(3, "canceled", 0, ["received", "done"])
        o.messages = [rcv(o), done(o, "canceled")]
        o = new(2, "rejected", 0, ["unseen"])  # never reached the engine
        o.submitted_ago_ms = 120_000
        new(2, "pending", 0, [])  # just registered, not sent yet
        # A self-trade: our taker against our own resting maker.
        a = new(5, "partially_filled", 3, ["received", "open", "fill"])
        b = new(3, "filled", 3, ["received", "fill"])
        a.messages = [rcv(a), opn(a, 5)]
        b.messages = [rcv(b), mtc(3, a.oid, b.oid), done(b, "filled")]
        a.pair = b
        # Someone else's order with the same clientOid after ours: not ours, and said
        # so once (a conflict event) without touching ours.
        o = new(8, "received", 0, ["received", "conflict"])
        o.messages = [rcv(o), rcv(o, oid="beef" * 6),
                      envelope("open", side="sell", price="1.0", size="8",
                               orderId="beef" * 6)]
    paired = {id(o.pair) for o in owns if o.pair is not None}
    chains = [o.messages + (o.pair.messages if o.pair is not None else [])
              for o in owns if o.messages and id(o) not in paired]
    return owns, chains


def build_stream(rng: random.Random, chains: list[list[dict[str, Any]]],
                 foreign: int) -> list[str]:
    """Foreign messages with the own chains merged among them at random (each chain in
    order); sequences renumbered 1, 2, ... and ``ts`` set near now."""
    base = [json.loads(m) for m in StreamGenerator(SYM, seed=11).take(foreign)]
    queues = [list(c) for c in chains]
    own: list[dict[str, Any]] = []
    while queues:
        q = rng.choice(queues)
        own.append(q.pop(0))
        if not q:
            queues.remove(q)
    slots = set(rng.sample(range(len(base)), len(own)))
    merged: list[dict[str, Any]] = []
    it = iter(own)
    for i, msg in enumerate(base):
        if i in slots:
            merged.append(next(it))
        merged.append(msg)
    now_ns = time.time_ns()
    out = []
    for seq, msg in enumerate(merged, start=1):
        msg["data"]["sequence"] = seq
        msg["data"]["ts"] = now_ns + seq
        out.append(json.dumps(msg, separators=(",", ":")))
    return out


def xadd_all(r: redis.Redis, raws: list[str], chunk: int = 500) -> None:
    for i in range(0, len(raws), chunk):
        pipe = r.pipeline(transaction=False)
        for raw in raws[i:i + chunk]:
            pipe.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: raw})
        pipe.execute()


def check_final_state(r: redis.Redis, owns: list[Own]) -> None:
    events = order_events(r)
    for o in owns:
        h = text_hash(r, o.coid)
        assert (h["status"], h["filledSize"]) == (o.status, str(o.filled)), (o.coid, h)
        got = [e["change"] for e in events.get(o.coid, [])]
        assert got == o.changes, (o.coid, got)
        if o.messages and o.status != "rejected":
            assert h["orderId"] == o.oid
            assert r.get(keys.order_id(SYM, o.oid)) == o.coid.encode()
        finished = o.status in ("filled", "canceled", "rejected")
        assert bool(r.sismember(keys.orders_active(SYM), o.coid)) is not finished, o.coid
        if finished:
            assert r.ttl(keys.order(SYM, o.coid)) > 0
        # Fill events carry exactly the filled size, once each.
        fills = [int(e["fillSize"]) for e in events.get(o.coid, []) if e["change"] == "fill"]
        assert sum(fills) == o.filled
    unseen = [o for o in owns if o.status == "rejected"]
    assert all(text_hash(r, o.coid)["reason"] == "unseen" for o in unseen)


def test_own_orders_among_thousands_survive_kill_and_replay(redis_sync: redis.Redis,
                                                              redis_url: str) -> None:
    rng = random.Random(20240501)
    owns, chains = scenario(copies=3)
    raws = build_stream(rng, chains, foreign=6000)
    now = int(time.time() * 1000)
    register(redis_url, [(o.coid, o.size, now - o.submitted_ago_ms) for o in owns])
    # Noise the monitor must shrug off: a bad entry, a snapshot note.
    redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: "{not json"})
    redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "snapshot", "sequence": "0"})
    env = {"REDIS_URL": redis_url, "MONITOR_BATCH_SIZE": "40"}
    half = len(raws) // 2
    xadd_all(redis_sync, raws[:half])

    # Run 1: killed with SIGKILL while entries keep arriving.
    with monitor(env) as first:
        first.wait_ready()
        xadd_all(redis_sync, raws[half:half + 400], chunk=100)
        first.kill()
    xadd_all(redis_sync, raws[half + 400:])

    # A consumer that read entries and died before acknowledging them.
    taken = redis_sync.xreadgroup(GROUP, "dead-consumer", {keys.l3_stream(SYM): ">"},
                                  count=600)
    dead_raws = [f[b"msg"].decode() for _, f in taken[0][1]]
    assert len(dead_raws) == 600
    assert any('"clientOid":"own-' in m or '"00ff' in m for m in dead_raws)

    # Run 2: takes the dead consumers' pending entries over, then reads the rest.
    with monitor(env) as second:
        second.wait_ready()
        wait_for(lambda: caught_up(redis_sync), "the monitor to catch up", proc=second)
        check_final_state(redis_sync, owns)
        metrics = second.metrics()
        assert 'kumex_order_monitor_own_messages_total{symbol="XBTUSDM"}' in metrics
        assert 'kumex_order_monitor_messages_read_total{symbol="XBTUSDM"}' in metrics
        assert second.stop() == 0  # clean SIGTERM
    consumers = {c["name"].decode() for c in redis_sync.xinfo_consumers(
        keys.l3_stream(SYM), GROUP)}
    assert "dead-consumer" not in consumers  # its entries were claimed, then it was dropped

    # Run 3: the group rewound to the start: every message applied again changes nothing.
    snapshot = {o.coid: text_hash(redis_sync, o.coid) for o in owns}
    events_before = redis_sync.xlen(keys.order_events(SYM))
    redis_sync.xgroup_setid(keys.l3_stream(SYM), GROUP, "0")
    with monitor(env) as third:
        third.wait_ready()
        wait_for(lambda: caught_up(redis_sync), "the replay to finish", proc=third)
        assert redis_sync.xlen(keys.order_events(SYM)) == events_before
        assert {o.coid: text_hash(redis_sync, o.coid) for o in owns} == snapshot
        check_final_state(redis_sync, owns)


def test_one_replica_consumes_a_symbol_and_another_takes_over(redis_sync: redis.Redis,
                                                                redis_url: str) -> None:
    rng = random.Random(7)
    owns, chains = scenario(copies=1)
    raws = build_stream(rng, chains, foreign=2000)
    register(redis_url, [(o.coid, o.size, int(time.time() * 1000) - o.submitted_ago_ms)
                         for o in owns])
    xadd_all(redis_sync, raws[:1000])
    env = {"REDIS_URL": redis_url, "MONITOR_BATCH_SIZE": "50"}
    with monitor({**env, "MONITOR_REPLICA_ID": "a"}) as a, \
            monitor({**env, "MONITOR_REPLICA_ID": "b"}) as b:
        # Even shares by rank of id: one symbol is "a"'s (handed over by "b" if "b" took
        # it first), and "b" stands by.
        wait_for(lambda: json.loads(redis_sync.get(keys.owner(SYM, "order_monitor"))
                                    or "{}").get("id") == "a", "a to hold the symbol", proc=a)
        holder, standby = a, b
        holder.wait_ready()
        standby.wait_ready(holding=False)  # a standby holding nothing is ready too
        wait_for(lambda: caught_up(redis_sync), "the holder to catch up", proc=holder)
        consumers = redis_sync.xinfo_consumers(keys.l3_stream(SYM), GROUP)
        assert len(consumers) == 1  # only the holder ever read
        holder.kill()
        xadd_all(redis_sync, raws[1000:])
        wait_for(lambda: json.loads(redis_sync.get(keys.owner(SYM, "order_monitor"))
                                    or "{}").get("id") == ("b" if holder is a else "a"),
                 "the standby to take the symbol", proc=standby)
        wait_for(lambda: caught_up(redis_sync), "the standby to catch up", proc=standby)
        check_final_state(redis_sync, owns)


# ---------------------------------------------------------------------- with the exchange


def api(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == "200000", body
    return body["data"]


def place(http: httpx.Client, auth: KcAuth, url: str, **order: Any) -> str:
    """Register the order (as the strategy does), then send it; its orderId."""
    size = int(order["size"])
    register(url, [(order["clientOid"], size, int(time.time() * 1000))],
             side=order["side"], price=order.get("price", ""))
    body = {"symbol": SYM, "leverage": "5", "type": "limit", **order}
    data = api(http.post("/api/v1/orders", content=json.dumps(body).encode(), auth=auth,
                         headers={"Content-Type": "application/json"}))
    return str(data["orderId"])


def expected_status(rec: dict[str, Any]) -> str:
    if rec["status"] == "done":
        return "canceled" if rec["cancelExist"] else "filled"
    return "partially_filled" if rec["filledSize"] else "open"



@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """Every test here runs on one Redis, then on the Redis Cluster."""
    return any_redis_url

@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Closes what a test opened, passed or failed."""
    with contextlib.ExitStack() as opened:
        yield opened


def test_gap_and_sequence_jump_reconcile_with_the_sandbox(
    redis_sync: redis.Redis, redis_url: str, sandbox: SandboxProcess,
    stack: contextlib.ExitStack,
) -> None:
    user1, user2 = KcAuth(DEMO_KEY_1), KcAuth(DEMO_KEY_2)
    http = stack.enter_context(httpx.Client(base_url=sandbox.base_url, timeout=10))
    api(http.delete("/api/v1/orders", auth=user1))
    api(http.delete("/api/v1/orders", auth=user2))
    snap = http.get(f"/sandbox/snapshot/{SYM}").json()
    best_bid = max(Decimal(row[1]) for row in snap["bids"])
    best_ask = min(Decimal(row[1]) for row in snap["asks"])
    ask_size = sum(int(row[2]) for row in snap["asks"] if Decimal(row[1]) == best_ask)
    tag = uuid.uuid4().hex[:10]
    coid = {name: f"{name}-{tag}" for name in ("rest", "part", "mkt", "cxl", "wait", "lost",
                                               "late")}
    now = int(time.time() * 1000)
    register(redis_url, [(coid["wait"], 3, now), (coid["lost"], 3, now - 300_000)])
    redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "connected", "connectId": "x"})

    env = {"REDIS_URL": redis_url, "KUMEX_BASE_URL": sandbox.base_url,
           "KUMEX_API_KEY": DEMO_KEY_1.key, "KUMEX_API_SECRET": DEMO_KEY_1.secret,
           "KUMEX_API_PASSPHRASE": DEMO_KEY_1.passphrase, "MONITOR_UNSEEN_GRACE_MS": "60000",
           # Reconciliation from the records alone (the private channel would tell first).
           "MONITOR_PRIVATE_CHANNEL": "false"}
    with monitor(env) as mon:
        mon.wait_ready()
        wait_for(lambda: caught_up(redis_sync), "the first entries", proc=mon)
        ids = {
            "rest": place(http, user1, redis_url, clientOid=coid["rest"], side="buy", size=3,
                          price=str(best_bid - Decimal("5.0"))),
            # Takes the whole best ask level, the rest rests: partially filled, open.
            "part": place(http, user1, redis_url, clientOid=coid["part"], side="buy",
                          size=ask_size + 2, price=str(best_ask)),
            "mkt": place(http, user1, redis_url, clientOid=coid["mkt"], side="buy", size=1,
                         type="market"),
            "cxl": place(http, user1, redis_url, clientOid=coid["cxl"], side="buy", size=3,
                         price=str(best_bid - Decimal("6.0"))),
        }
        api(http.delete(f"/api/v1/orders/{ids['cxl']}", auth=user1))
        # None of their L3 messages reach the stream: the feed says it lost some.
        redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "gap", "reason": "test"})

        def reconciled() -> bool:
            return all(text_hash(redis_sync, coid[n]).get("orderId") == ids[n] and
                       text_hash(redis_sync, coid[n])["status"] != "received"
                       for n in ids) and \
                text_hash(redis_sync, coid["lost"])["status"] == "rejected"
        wait_for(reconciled, "reconciliation after ctl=gap", proc=mon)
        events = order_events(redis_sync)
        for name, order_id in ids.items():
            rec = api(http.get(f"/api/v1/orders/{order_id}", auth=user1))
            h = text_hash(redis_sync, coid[name])
            assert h["filledSize"] == str(rec["filledSize"]), (name, h, rec)
            assert h["status"] == expected_status(rec), (name, h, rec)
            assert int(h["corrected"]) >= 1
            assert "reconciled" in [e["change"] for e in events[coid[name]]]
            assert redis_sync.get(keys.order_id(SYM, order_id)) == coid[name].encode()
        # The synthetic flow may have filled its resting rest since; either way it took
        # the whole level first.
        part = text_hash(redis_sync, coid["part"])
        assert part["status"] in ("partially_filled", "filled"), part
        assert int(part["filledSize"]) >= ask_size
        assert text_hash(redis_sync, coid["mkt"])["status"] == "filled"
        assert text_hash(redis_sync, coid["cxl"])["status"] == "canceled"
        assert text_hash(redis_sync, coid["rest"])["status"] == "open"
        # Never sent: one waits (within its grace), one is rejected as unseen.
        assert text_hash(redis_sync, coid["wait"])["status"] == "pending"
        lost = text_hash(redis_sync, coid["lost"])
        assert (lost["status"], lost["reason"]) == ("rejected", "unseen")

        # A sequence jump between two consecutive messages also means loss.
        late_id = place(http, user1, redis_url, clientOid=coid["late"], side="buy", size=3,
                        price=str(best_bid - Decimal("7.0")))
        for seq in (10, 11, 15):  # foreign messages; 12..14 never arrive
            msg = envelope("received", orderId=f"ff{seq}", clientOid="", ts=time.time_ns())
            msg["data"]["sequence"] = seq
            redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: json.dumps(msg)})
        wait_for(lambda: text_hash(redis_sync, coid["late"]).get("orderId") == late_id,
                 "reconciliation after a sequence jump", proc=mon)
        assert text_hash(redis_sync, coid["late"])["status"] == "open"
        assert "kumex_order_monitor_corrections_total" in mon.metrics()
        assert 'cause="sequence"' in mon.metrics()
    api(http.delete("/api/v1/orders", auth=user1))


def test_a_fill_lost_just_before_the_cancel_is_corrected_from_the_final_record(
    redis_sync: redis.Redis, redis_url: str, stack: contextlib.ExitStack,
) -> None:
    """A gap swallows an own order's partial fill; the batch that shows the gap also
    carries its ``done canceled``. The order is finished when the loss is noticed: its
    filledSize still ends as the exchange's final record says.

    A sandbox of its own: the sell that reaches the order sweeps the bids above it.
    """
    with SandboxProcess(SANDBOX_TEST_ENV) as sandbox:
        _lost_fill_then_cancel(redis_sync, redis_url, sandbox, stack)


def _lost_fill_then_cancel(redis_sync: redis.Redis, redis_url: str,
                           sandbox: SandboxProcess, stack: contextlib.ExitStack) -> None:
    user1, user2 = KcAuth(DEMO_KEY_1), KcAuth(DEMO_KEY_2)
    http = stack.enter_context(httpx.Client(base_url=sandbox.base_url, timeout=10))
    api(http.delete("/api/v1/orders", auth=user1))
    api(http.delete("/api/v1/orders", auth=user2))
    snap = http.get(f"/sandbox/snapshot/{SYM}").json()
    price = max(Decimal(row[1]) for row in snap["bids"]) - Decimal("9.0")
    coid = f"cut-{uuid.uuid4().hex[:10]}"
    redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "connected", "connectId": "y"})
    env = {"REDIS_URL": redis_url, "KUMEX_BASE_URL": sandbox.base_url,
           "KUMEX_API_KEY": DEMO_KEY_1.key, "KUMEX_API_SECRET": DEMO_KEY_1.secret,
           "KUMEX_API_PASSPHRASE": DEMO_KEY_1.passphrase,
           "MONITOR_PRIVATE_CHANNEL": "false"}  # the final record alone corrects it
    with monitor(env) as mon:
        mon.wait_ready()
        oid = place(http, user1, redis_url, clientOid=coid, side="buy", size=5,
                    price=str(price))
        # What the stream carried of it: received and open (sequences of our own).
        seq = 1_000_000
        for subject, data in (("received", {"orderId": oid, "clientOid": coid}),
                              ("open", {"orderId": oid, "side": "buy", "price": str(price),
                                        "size": "5", "orderTime": time.time_ns()})):
            seq += 1
            msg = envelope(subject, ts=time.time_ns(), **data)
            msg["data"]["sequence"] = seq
            redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: json.dumps(msg)})
        wait_for(lambda: text_hash(redis_sync, coid).get("status") == "open", "open", proc=mon)
        # Another user sells through everything ahead of it and 2 of it; then it is canceled.
        ahead = sum(int(row[2]) for row in http.get(f"/sandbox/snapshot/{SYM}").json()["bids"]
                    if Decimal(row[1]) >= price and row[0] != oid)
        api(http.post("/api/v1/orders", auth=user2, headers={"Content-Type": "application/json"},
                      content=json.dumps({"symbol": SYM, "clientOid": uuid.uuid4().hex,
                                          "side": "sell", "type": "limit", "leverage": "5",
                                          "price": str(price), "size": ahead + 2,
                                          "timeInForce": "IOC"}).encode()))
        api(http.delete(f"/api/v1/orders/{oid}", auth=user1))
        rec = api(http.get(f"/api/v1/orders/{oid}", auth=user1))
        assert (rec["filledSize"], rec["cancelExist"]) == (2, True)
        # The match (seq + 1) never reaches the stream; the done does, in one batch.
        done = envelope("done", orderId=oid, reason="canceled", ts=time.time_ns())
        done["data"]["sequence"] = seq + 2
        redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: json.dumps(done)})

        def corrected() -> bool:
            h = text_hash(redis_sync, coid)
            return h.get("status") == "canceled" and h.get("filledSize") == "2"
        wait_for(corrected, "filledSize corrected after the cancel", proc=mon)
        h = text_hash(redis_sync, coid)
        assert int(h["corrected"]) == 1 and h["remaining"] == "0"
        changes = [e["change"] for e in order_events(redis_sync)[coid]]
        assert changes[-2:] == ["done", "reconciled"]
        assert 'cause="sequence"' in mon.metrics()


def _metric_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_an_implausible_sequence_never_silences_gap_detection(
    redis_sync: redis.Redis, redis_url: str,
) -> None:
    """A frame at 2**63-1 is skipped and counted; it does not become the highest sequence,
    so a real jump after it is still seen (and reconciled)."""
    env = {"REDIS_URL": redis_url, "KUMEX_BASE_URL": "http://127.0.0.1:9"}

    def add(seq: int) -> None:
        msg = envelope("received", orderId=f"ff{seq % 1000}", clientOid="", ts=time.time_ns())
        msg["data"]["sequence"] = seq
        redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: json.dumps(msg)})

    with monitor(env) as mon:
        mon.wait_ready()
        for seq in (100, 101, 102, 2**63 - 1, 103, 104):
            add(seq)
        wait_for(lambda: caught_up(redis_sync), "the first entries", proc=mon)
        metrics = mon.metrics()
        gaps = "kumex_order_monitor_gaps_total"
        assert _metric_value(metrics, gaps, cause="sequence") == 0
        assert _metric_value(metrics, "kumex_order_monitor_implausible_total", symbol=SYM) == 1
        add(110)  # 105..109 never arrive
        wait_for(lambda: caught_up(redis_sync), "the jump", proc=mon)
        wait_for(lambda: _metric_value(mon.metrics(), gaps, cause="sequence") == 1,
                 "the jump seen as a gap", proc=mon)


def test_entries_an_old_owner_read_after_its_lease_come_first(
    redis_sync: redis.Redis, redis_url: str,
) -> None:
    """A previous owner that reads once more (resumed from a pause, or its blocked read
    served after the lease moved) holds entries the owner's next batch starts after.
    The owner takes them first and applies everything in stream order: each fill once,
    none lost, with no exchange to reconcile against."""
    env = {"REDIS_URL": redis_url, "KUMEX_BASE_URL": "http://127.0.0.1:9",
           "MONITOR_RECONCILE_ON_START": "false"}
    oid = "ab" * 12
    register(redis_url, [("late-1", 10, int(time.time() * 1000))])

    def add(subject: str, seq: int, **data: Any) -> None:
        msg = envelope(subject, ts=time.time_ns(), **data)
        msg["data"]["sequence"] = seq
        redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: json.dumps(msg)})

    def fill(seq: int) -> None:
        add("match", seq, side="sell", price="30000.0", size="1", makerOrderId=oid,
            takerOrderId=f"t{seq}", tradeId=f"tr{seq}")

    with monitor(env) as mon:
        mon.wait_ready()
        add("received", 101, orderId=oid, clientOid="late-1")
        add("open", 102, side="buy", price="30000.0", size="10", orderId=oid, orderTime=1)
        wait_for(lambda: caught_up(redis_sync), "the order open", proc=mon)
        assert mon.process is not None
        os.kill(mon.process.pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)  # its blocking read (100 ms) ends: nothing is handed to it
            fill(103)
            # The old owner's read: 103 is pending for it, the group has moved past it.
            got = redis_sync.xreadgroup(GROUP, "old-owner", {keys.l3_stream(SYM): ">"})
            assert len(got[0][1]) == 1
            fill(104)
        finally:
            os.kill(mon.process.pid, signal.SIGCONT)
        wait_for(lambda: caught_up(redis_sync), "the fills", proc=mon)
        wait_for(lambda: text_hash(redis_sync, "late-1").get("filledSize") == "2",
                 "both fills applied", proc=mon)
        fills = [e for e in order_events(redis_sync)["late-1"]
                 if e["change"] == "fill"]
        assert len(fills) == 2
        metrics = mon.metrics()
        assert _metric_value(metrics, "kumex_order_monitor_gaps_total", cause="straggler") == 1
        assert _metric_value(metrics, "kumex_order_monitor_gaps_total", cause="sequence") == 0
