"""Fencing: a paused process never acts for a symbol it no longer holds, never serves stale.

SIGSTOP, then SIGCONT, of the process that holds a symbol (a book replica, an
order monitor), as a long GC pause, a stalled VM or a debugger would do:

* **book**: two replicas over one stream (sandbox, feed). The owner is paused
  for 5 and 15 s (and 40 s under ``make chaos``: ``KUMEX_CHAOS_PAUSES``)
  while requests keep coming to it; every 200 it gave, before or after the
  pause, is checked against the sandbox's journal: the book it served must not
  be older than ``BOOK_MAX_AGE_SECONDS`` (plus a second of slack) at the time
  the answer arrived;
* **order monitor**: two monitors over one stream of own-order messages
  written by the test without pause. The owner is paused past its lease; the
  other takes over; after SIGCONT, not one order event was written by the
  paused one after the takeover (the lease is checked on the server, in the
  save script), and no message was lost (stragglers handed to the paused one
  are claimed by the new owner).

No time limit is asserted: the checks count what was served and written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Final

import httpx
import pytest
import redis

from kumex_l3 import keys, order_store
from kumex_l3.lease import LeaseOwner
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, metric, wait_for
from kumex_l3.testing.sandbox_proc import SandboxProcess

SYM: Final = "XBTUSDM"
START: Final = 4_000_000
#: Pauses of the owner, seconds (``make chaos`` adds 40).
PAUSES: Final = [float(p) for p in os.environ.get("KUMEX_CHAOS_PAUSES", "5,15").split(",")]
MAX_AGE_S: Final = 3.0
#: Slack over the bound: the answer's travel and the poller's own clock reading.
SLACK_S: Final = 1.0


# --------------------------------------------------------------------------- the book


class _Poller(threading.Thread):
    """Asks one replica for the book all along; keeps (sent at, received at, status,
    sequence)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.halt = threading.Event()
        self.answers: list[tuple[float, float, int, int]] = []

    def run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self.halt.wait(0.02):
                sent = time.time()
                try:
                    r = http.get(f"{self.url}/book/{SYM}", params={"depth": 5})
                except httpx.HTTPError:
                    continue
                seq = int(r.json()["sequence"]) if r.status_code == 200 else -1
                self.answers.append((sent, time.time(), r.status_code, seq))


def _owner(client: redis.Redis, role: str) -> str | None:
    raw: Any = client.get(keys.owner(SYM, role))
    return None if raw is None else LeaseOwner.from_json(raw).id


@pytest.fixture
def book_set(redis_url: str) -> Iterator[tuple[SandboxProcess, dict[str, ServiceProcess]]]:
    env = {"SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "9",
           "SANDBOX_START_SEQUENCE": str(START), "SANDBOX_JOURNAL_SIZE": "500000",
           "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0"}
    with SandboxProcess(env) as sandbox:
        common = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM,
                  "KUMEX_BASE_URL": sandbox.base_url}
        feed = ServiceProcess("services.feed", {**common, "FEED_SNAPSHOT_PER_MIN": "0"},
                              port_var="FEED_HTTP_PORT", name="feed")
        books = {name: ServiceProcess("services.book", {
            **common, "BOOK_REPLICA_ID": name, "BOOK_LEASE_TTL_SECONDS": "10",
            "BOOK_MAX_AGE_SECONDS": str(MAX_AGE_S), "BOOK_READ_BLOCK_SECONDS": "0.1"},
            port_var="BOOK_PORT", name=name) for name in ("book-a", "book-b")}
        with feed, books["book-a"], books["book-b"]:
            yield sandbox, books


def _stale_answers(answers: list[tuple[float, float, int, int]], journal: dict[int, int],
                   stopped: float, continued: float) -> list[str]:
    """The 200s whose book was older than the bound when the answer was made.

    That is when it arrived, except for a request sent before the SIGSTOP and answered
    after the SIGCONT: the replica may have made that answer just before it was stopped
    (the bytes then leave with the process), so it is judged at the stop. A request sent
    during the pause was answered after it, and is judged when it arrived.
    """
    bad = []
    for sent, received, status, seq in answers:
        if status != 200:
            continue
        made = stopped if sent < stopped and received >= continued else received
        after = journal.get(seq + 1)  # when the exchange moved past what was served
        if after is not None and made - after / 1e9 > MAX_AGE_S + SLACK_S:
            bad.append(f"sequence {seq}, {made - after / 1e9:.1f} s old")
    return bad


def test_a_paused_book_owner_never_serves_a_stale_book(
        redis_url: str, redis_sync: redis.Redis,
        book_set: tuple[SandboxProcess, dict[str, ServiceProcess]]) -> None:
    sandbox, books = book_set
    with httpx.Client(base_url=sandbox.base_url, timeout=30) as http:
        http.post("/sandbox/flow/resume", json={"rate": 100}).raise_for_status()
        stale: list[str] = []
        served = 0
        for pause in PAUSES:
            owner = wait_for(lambda: _owner(redis_sync, "book"), "a book owner")
            proc = books[owner]
            assert proc.process is not None
            wait_for(lambda p=proc: httpx.get(f"{p.url}/book/{SYM}").status_code == 200,
                     "the owner serving", proc=proc)
            pollers = [_Poller(proc.url) for _ in range(4)]
            for poller in pollers:
                poller.start()
            time.sleep(1.0)
            stopped = time.time()
            os.kill(proc.process.pid, signal.SIGSTOP)
            time.sleep(pause)
            os.kill(proc.process.pid, signal.SIGCONT)
            continued = time.time()
            time.sleep(4.0)
            for poller in pollers:
                poller.halt.set()
            for poller in pollers:
                poller.join(150)
            texts = http.get(f"/sandbox/journal/{SYM}",
                             params={"after": START, "limit": 500_000}).json()["messages"]
            journal = {m["data"]["sequence"]: m["data"]["ts"]
                       for m in map(json.loads, texts)}
            answers = [a for p in pollers for a in p.answers]
            stale += [f"{pause:g} s pause: {s}"
                      for s in _stale_answers(answers, journal, stopped, continued)]
            served += sum(1 for a in answers if a[2] == 200)
            print(f"\npause {pause:g} s of {owner}: {len(answers)} answers, "
                  f"{sum(1 for a in answers if a[2] == 200)} 200s, "
                  f"{sum(1 for a in answers if a[2] == 503)} 503s; owner now "
                  f"{_owner(redis_sync, 'book')}")
        http.post("/sandbox/flow/pause").raise_for_status()
    assert served > 0
    assert not stale, stale[:10]


# --------------------------------------------------------------------------- the monitor


def _envelope(subject: str, seq: int, **data: Any) -> str:
    return json.dumps({"type": "message", "topic": f"/contractMarket/level3v2:{SYM}",
                       "subject": subject, "data": {"symbol": SYM, "sequence": seq,
                                                    "ts": time.time_ns(), **data}})


class _Writer(threading.Thread):
    """Fills of the own orders, written to the stream all along, in sequence."""

    def __init__(self, client: redis.Redis, orders: dict[str, str], start: int) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.orders = orders
        self.seq = start
        self.halt = threading.Event()
        self.filled = dict.fromkeys(orders, 0)

    def run(self) -> None:
        coids = sorted(self.orders)
        i = 0
        while not self.halt.wait(0.02):
            coid = coids[i % len(coids)]
            i += 1
            if self.filled[coid] >= 900:
                continue
            self.seq += 1
            self.client.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: _envelope(
                "match", self.seq, side="sell", price="30000.0", size="1",
                makerOrderId=self.orders[coid], takerOrderId=f"t{self.seq}",
                tradeId=f"tr{self.seq}")})
            self.filled[coid] += 1


def test_a_paused_order_monitor_never_writes_after_its_lease(
        redis_server: RedisServer, redis_sync: redis.Redis) -> None:
    redis_sync.flushall()
    orders = {f"fence-{i}": f"{i:024x}" for i in range(1, 6)}
    client = redis.asyncio.Redis.from_url(redis_server.url)

    async def register() -> None:
        for coid in orders:
            await order_store.register(client, SYM, coid, side="buy", price="30000.0",
                                       size=1000, now_ms=int(time.time() * 1000))
        await client.aclose()

    import asyncio
    asyncio.run(register())
    seq = 100
    for coid, oid in orders.items():
        seq += 1
        redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: _envelope(
            "received", seq, orderId=oid, clientOid=coid)})
        seq += 1
        redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: _envelope(
            "open", seq, side="buy", price="30000.0", size="1000", orderId=oid,
            orderTime=1)})
    env = {"REDIS_URL": redis_server.url, "KUMEX_SYMBOLS": SYM,
           "KUMEX_BASE_URL": "http://127.0.0.1:9", "MONITOR_LEASE_TTL_S": "2",
           "MONITOR_BLOCK_MS": "100", "MONITOR_REFRESH_S": "0.5",
           "MONITOR_RECONCILE_ON_START": "false", "MONITOR_UNSEEN_GRACE_MS": "600000"}
    monitors = {name: ServiceProcess("services.order_monitor", {**env,
                                                                "MONITOR_REPLICA_ID": name},
                                     port_var="MONITOR_HTTP_PORT", name=name,
                                     prefix=("MONITOR_", "KUMEX_", "REDIS_"))
                for name in ("monitor-a", "monitor-b")}
    with monitors["monitor-a"], monitors["monitor-b"]:
        owner = wait_for(lambda: _owner(redis_sync, "order_monitor"), "a monitor owner")
        paused = monitors[owner]
        assert paused.process is not None
        paused_consumer = f"{socket.gethostname()}-{paused.process.pid}"
        writer = _Writer(redis_sync, orders, seq)
        writer.start()
        time.sleep(1.5)
        os.kill(paused.process.pid, signal.SIGSTOP)
        taken = wait_for(lambda: (o := _owner(redis_sync, "order_monitor")) != owner and o,
                         "the other monitor taking over")
        taken_ms = int(redis_sync.time()[0]) * 1000
        time.sleep(3.0)
        os.kill(paused.process.pid, signal.SIGCONT)
        time.sleep(3.0)
        writer.halt.set()
        writer.join(10)

        def settled() -> bool:
            hashes = {c: redis_sync.hget(keys.order(SYM, c), "filledSize") for c in orders}
            return all(int(v or b"-1") == writer.filled[c] for c, v in hashes.items())

        wait_for(settled, "every fill applied", proc=monitors[taken])
        # Entries the paused owner was handed (a blocked read is served at once) came
        # before the new owner's batches: claimed and handled first, or late.
        stragglers = metric(monitors[taken].url, "kumex_order_monitor_gaps_total",
                            cause="straggler")
        # Back in the membership, the paused monitor may be handed the symbol again (the
        # shares are by rank of id): from then on its writes are under a lease of its own.
        regained_ms = _gained_after(paused.log_text(), taken_ms)
    events = redis_sync.xrange(keys.order_events(SYM))
    late = [(eid, f) for eid, f in events
            if f.get(b"by") == paused_consumer.encode()
            and taken_ms + 500 < int(eid.split(b"-")[0]) < regained_ms]
    assert not late, f"{len(late)} events written by the paused monitor after its lease"
    fills = {}
    for _, f in events:
        if f.get(b"change") == b"fill":
            coid = f[b"clientOid"].decode()
            fills[coid] = fills.get(coid, 0) + int(f[b"fillSize"])
    assert fills == writer.filled, "each fill exactly once, none lost"
    print(f"\nmonitor {owner} paused past its lease, {taken} took over; "
          f"{sum(writer.filled.values())} fills, none written late; stragglers claimed "
          f"{stragglers:.0f} times")


def _gained_after(log: str, after_ms: int) -> float:
    """When the order monitor logged "symbol gained" first after ``after_ms`` (Unix ms),
    or infinity."""
    for line in log.splitlines():
        stamp, _, rest = line.partition(" ")
        if " symbol gained " in f" {rest} " and stamp.endswith("Z"):
            at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000
            if at > after_ms:
                return at
    return math.inf


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP): its state in /proc is ``T``."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_websocket_relayed_from_a_frozen_owner_follows_the_symbol(
        redis_sync: redis.Redis,
        book_set: tuple[SandboxProcess, dict[str, ServiceProcess]]) -> None:
    """A client of the replica that does not own the symbol gets the owner's pushes through
    it. The owner freezes (SIGSTOP): once the other replica owns the symbol, the client
    gets its pushes, while the old owner is still frozen (the relay pings, and watches
    who owns the symbol, instead of waiting on a silent socket)."""
    from websockets.sync.client import connect as ws_connect

    sandbox, books = book_set
    with httpx.Client(base_url=sandbox.base_url, timeout=30) as http:
        http.post("/sandbox/flow/resume", json={"rate": 100}).raise_for_status()
        owner = wait_for(lambda: _owner(redis_sync, "book"), "a book owner")
        other = next(name for name in books if name != owner)
        frozen = books[owner]
        assert frozen.process is not None
        wait_for(lambda: httpx.get(f"{frozen.url}/book/{SYM}").status_code == 200,
                 "the owner serving", proc=frozen)
        url = books[other].url.replace("http", "ws", 1) + f"/ws/book/{SYM}?depth=1"
        try:
            with ws_connect(url, open_timeout=30) as ws:
                first = json.loads(ws.recv(timeout=30))
                os.kill(frozen.process.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
                fresh = None
                while time.monotonic() - stopped_at < 60:  # a ceiling, never a measure
                    with contextlib.suppress(TimeoutError):
                        body = json.loads(ws.recv(timeout=1))
                        if body.get("sequence", 0) > first.get("sequence", 0) + 50:
                            fresh = body
                            break
                assert fresh is not None, "nothing new reached the relayed client"
                assert _stopped(frozen.process.pid), "it came only after the owner woke up"
                assert _owner(redis_sync, "book") == other
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
            http.post("/sandbox/flow/pause").raise_for_status()
