"""Symbol leases on a real Redis: ownership rules, takeover, balancing, lost renewals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kumex_l3 import keys
from kumex_l3.lease import (
    LeaseManager,
    LeaseOwner,
    acquire,
    read_owner,
    read_owners,
    release,
    renew,
)
from kumex_l3.testing.devredis import free_port
from kumex_l3.testing.procs import async_client

ROLE = "book"
SYMBOLS = ("XBTUSDM", "XBTUSDTM", "ETHUSDTM")
SAFETY_S = 15.0  # a ceiling against a hang, never a measurement
A = LeaseOwner("replica-a", "http://127.0.0.1:1")
B = LeaseOwner("replica-b", "http://127.0.0.1:2")


class Recorder:
    """Collects gained/lost callbacks of one manager."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def gained(self, symbol: str) -> None:
        self.events.append(("gained", symbol))

    async def lost(self, symbol: str) -> None:
        self.events.append(("lost", symbol))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """Every lease test runs on one Redis, then on the Redis Cluster (the leases of many
    symbols in one pipeline go node by node there)."""
    return any_redis_url


@pytest.fixture
async def managers(redis_url: str) -> AsyncIterator[list[LeaseManager]]:
    made: list[LeaseManager] = []
    yield made
    for m in made:
        await m.close(release_leases=False)
        await m.client.aclose()


def make(redis_url: str, made: list[LeaseManager], owner: LeaseOwner, rec: Recorder,
         symbols: tuple[str, ...] = SYMBOLS, **kwargs: object) -> LeaseManager:
    client = async_client(redis_url)
    m = LeaseManager(client, ROLE, symbols, owner, on_gained=rec.gained, on_lost=rec.lost,
                     **kwargs)  # type: ignore[arg-type]
    made.append(m)
    return m


async def test_only_the_owner_renews_or_releases(redis_client: redis.asyncio.Redis) -> None:
    sym = SYMBOLS[0]
    assert await acquire(redis_client, sym, ROLE, A, 10.0)
    assert not await acquire(redis_client, sym, ROLE, B, 10.0)
    assert await read_owner(redis_client, sym, ROLE) == A
    raw = await redis_client.get(keys.owner(sym, ROLE))
    assert raw == b'{"id":"replica-a","url":"http://127.0.0.1:1"}'
    assert 0 < await redis_client.pttl(keys.owner(sym, ROLE)) <= 10_000
    assert not await renew(redis_client, sym, ROLE, B, 60.0)
    assert not await release(redis_client, sym, ROLE, B)
    assert await read_owner(redis_client, sym, ROLE) == A
    assert await redis_client.pttl(keys.owner(sym, ROLE)) <= 10_000
    assert await renew(redis_client, sym, ROLE, A, 60.0)
    assert await redis_client.pttl(keys.owner(sym, ROLE)) > 10_000
    # The same replica id (a restart) takes its own lease back at once.
    assert await acquire(redis_client, sym, ROLE, A, 5.0)
    assert await release(redis_client, sym, ROLE, A)
    assert await read_owner(redis_client, sym, ROLE) is None
    assert not await renew(redis_client, sym, ROLE, A, 5.0)
    assert await acquire(redis_client, sym, ROLE, B, 5.0)
    owners = await read_owners(redis_client, SYMBOLS, ROLE)
    assert owners == {SYMBOLS[0]: B, SYMBOLS[1]: None, SYMBOLS[2]: None}


async def test_foreign_value_is_an_owner(redis_client: redis.asyncio.Redis) -> None:
    await redis_client.set(keys.owner("XBTUSDM", ROLE), "someone")
    assert await read_owner(redis_client, "XBTUSDM", ROLE) == LeaseOwner("someone")
    assert not await acquire(redis_client, "XBTUSDM", ROLE, A, 1.0)


async def test_alone_takes_all_then_the_other_takes_over(
    redis_url: str, managers: list[LeaseManager]
) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    a = make(redis_url, managers, A, rec_a, ttl=0.6)
    b = make(redis_url, managers, B, rec_b, ttl=0.6)
    await a.step()
    assert a.held == frozenset(SYMBOLS)
    assert sorted(rec_a.events) == sorted(("gained", s) for s in SYMBOLS)
    task_a = asyncio.create_task(a.run())
    task_b = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(1.0)  # several periods: renewals keep A's leases
        assert a.held == frozenset(SYMBOLS) and b.held == frozenset()
        assert all(o == A for o in b.owners.values())
        # A dies without releasing anything: B takes over once the leases lapse.
        task_a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task_a
        async with asyncio.timeout(SAFETY_S):
            while b.held != frozenset(SYMBOLS):
                await asyncio.sleep(0.05)
        assert sorted(rec_b.events) == sorted(("gained", s) for s in SYMBOLS)
        owners = await read_owners(b.client, SYMBOLS, ROLE)
        assert all(o == B for o in owners.values())
        # A, back from the dead, finds its leases gone and says so.
        await a.step()
        assert a.held == frozenset()
        assert sorted(e for e in rec_a.events if e[0] == "lost") == sorted(
            ("lost", s) for s in SYMBOLS)
    finally:
        task_b.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task_b


async def test_close_releases_for_an_immediate_takeover(
    redis_url: str, managers: list[LeaseManager]
) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    a = make(redis_url, managers, A, rec_a, ttl=30.0)
    b = make(redis_url, managers, B, rec_b, ttl=30.0)
    await a.step()
    await b.step()
    assert b.held == frozenset()
    await a.close()
    assert a.held == frozenset() and ("lost", SYMBOLS[0]) in rec_a.events
    await b.step()
    assert b.held == frozenset(SYMBOLS)


async def test_cap_while_others_are_alive(
    redis_url: str, redis_client: redis.asyncio.Redis, managers: list[LeaseManager]
) -> None:
    symbols = ("S1", "S2", "S3", "S4", "S5")
    other = LeaseOwner("replica-c")
    assert await acquire(redis_client, "S1", ROLE, other, 30.0)
    a = make(redis_url, managers, A, Recorder(), symbols=symbols, ttl=30.0)
    await a.step()
    # Two replicas visible: at most ceil(5 / 2) = 3 for A, one symbol stays free.
    assert len(a.held) == 3 and "S1" not in a.held
    b = make(redis_url, managers, B, Recorder(), symbols=symbols, ttl=30.0)
    await b.step()
    assert len(b.held) == 1
    # Without balancing a replica takes whatever is free.
    await release(redis_client, "S1", ROLE, other)
    greedy = make(redis_url, managers, LeaseOwner("replica-d"), Recorder(), symbols=symbols,
                  ttl=30.0, balance=False)
    await greedy.step()
    assert greedy.held == frozenset({"S1"})


async def test_taken_lease_is_reported_lost(
    redis_url: str, redis_client: redis.asyncio.Redis, managers: list[LeaseManager]
) -> None:
    rec = Recorder()
    a = make(redis_url, managers, A, rec, ttl=30.0)
    await a.step()
    # Someone else now holds XBTUSDM (say A's lease lapsed during a long pause).
    await redis_client.set(keys.owner("XBTUSDM", ROLE), B.to_json(), px=30_000)
    await a.step()
    assert "XBTUSDM" not in a.held and ("lost", "XBTUSDM") in rec.events
    assert await read_owner(redis_client, "XBTUSDM", ROLE) == B


async def test_redis_down_means_lost_before_expiry(
    redis_url: str, managers: list[LeaseManager]
) -> None:
    clock = FakeClock()
    rec = Recorder()
    a = make(redis_url, managers, A, rec, ttl=10.0, clock=clock)
    await a.step()
    assert a.held == frozenset(SYMBOLS)
    healthy = a.client
    # Nothing listens there; no client-side retries, so each step fails at once.
    a.client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.5,
                                   retry=Retry(NoBackoff(), 0))
    try:
        clock.now += 5.0
        await a.step()  # fails, but the leases are still valid on the server
        assert a.errors == 1 and a.held == frozenset(SYMBOLS)
        clock.now += 4.5  # 9.5 s after the last renewal: too close to the 10 s TTL
        await a.step()
        assert a.held == frozenset()
        assert sorted(e for e in rec.events if e[0] == "lost") == sorted(
            ("lost", s) for s in SYMBOLS)
    finally:
        await a.client.aclose()
        a.client = healthy
    # Redis is back and the keys (real TTL 10 s) are still ours: taken back at once.
    await a.step()
    assert a.held == frozenset(SYMBOLS)


class Handoffs(Recorder):
    """Also records handoffs, with whether the lease was still ours in Redis then."""

    def __init__(self, client: redis.asyncio.Redis, owner: LeaseOwner) -> None:
        super().__init__()
        self.client = client
        self.owner = owner

    async def handoff(self, symbol: str) -> None:
        self.events.append(("handoff", symbol))
        assert await read_owner(self.client, symbol, ROLE) == self.owner


def held_counts(ms: list[LeaseManager]) -> list[int]:
    return [len(m.held) for m in ms]


async def test_even_shares_as_replicas_join_and_leave(
    redis_url: str, redis_client: redis.asyncio.Redis, managers: list[LeaseManager]
) -> None:
    symbols = tuple(f"S{i}" for i in range(31))
    owners = [LeaseOwner(f"replica-{c}", f"http://127.0.0.1:{i}") for i, c in enumerate("abc")]
    recs = [Handoffs(redis_client, o) for o in owners]
    ms = [make(redis_url, managers, o, r, symbols=symbols, ttl=30.0, members=True,
               on_handoff=r.handoff) for o, r in zip(owners, recs, strict=True)]
    a, b, c = ms
    await a.step()
    assert held_counts(ms) == [31, 0, 0] and a.members == ("replica-a",)
    await b.step()  # joins: its share is 15, nothing is free yet
    assert held_counts(ms) == [31, 0, 0] and a.limit() == 31 and b.limit() == 15
    await a.step()  # sees B: hands off 15, each while still holding it
    assert held_counts(ms) == [16, 0, 0] and a.handoffs == 15
    handed = [s for kind, s in recs[0].events if kind == "handoff"]
    assert len(handed) == 15 and not any(s in a.held for s in handed)
    assert set((await read_owners(redis_client, handed, ROLE)).values()) == {None}
    await b.step()
    assert held_counts(ms) == [16, 15, 0] and set(b.held) == set(handed)
    await c.step()
    for m in (a, b, c):
        await m.step()
    # 31 = 11 + 10 + 10, by rank of id.
    assert held_counts(ms) == [11, 10, 10]
    assert a.held | b.held | c.held == frozenset(symbols)
    # A leaves cleanly: each symbol handed off, and the others' shares grow to take it.
    await a.drain()
    assert a.held == frozenset() and a.limit() == 0
    assert await redis_client.zrange(keys.members(ROLE), 0, -1) == [b"replica-b", b"replica-c"]
    await b.step()
    await c.step()
    assert held_counts(ms) == [0, 16, 15]
    assert b.held | c.held == frozenset(symbols)


async def test_handoff_wakes_the_others_within_the_watch(
    redis_url: str, redis_client: redis.asyncio.Redis, managers: list[LeaseManager]
) -> None:
    symbols = tuple(f"S{i}" for i in range(6))
    # A long period: without the moves counter, B would take nothing for 10 s.
    a = make(redis_url, managers, A, Recorder(), symbols=symbols, ttl=30.0, period=10.0,
             members=True)
    b = make(redis_url, managers, B, Recorder(), symbols=symbols, ttl=30.0, period=10.0,
             members=True, watch=0.05)
    await a.step()
    task_a = asyncio.create_task(a.run(), name="a")
    task_b = asyncio.create_task(b.run(), name="b")
    try:
        async with asyncio.timeout(SAFETY_S):
            while len(b.held) < 3:  # B joined, A was woken and handed off, B was woken
                await asyncio.sleep(0.02)
        assert len(a.held) == 3 and a.held.isdisjoint(b.held)
        task_a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task_a
        await a.drain()
        async with asyncio.timeout(SAFETY_S):
            while len(b.held) < 6:
                await asyncio.sleep(0.02)
    finally:
        for t in (task_a, task_b):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def test_a_dead_member_lapses_and_its_share_returns(
    redis_url: str, redis_client: redis.asyncio.Redis, managers: list[LeaseManager]
) -> None:
    symbols = tuple(f"S{i}" for i in range(4))
    a = make(redis_url, managers, A, Recorder(), symbols=symbols, ttl=0.6, members=True)
    b = make(redis_url, managers, B, Recorder(), symbols=symbols, ttl=0.6, members=True)
    await a.step()
    await b.step()
    await a.step()
    await b.step()
    assert held_counts([a, b]) == [2, 2]
    # B dies (no drain, no release): its membership and its leases lapse by Redis's clock.
    await asyncio.sleep(0.7)
    await a.step()
    assert a.members == ("replica-a",) and a.held == frozenset(symbols)


async def test_many_symbols_gained_at_once_are_all_still_held_in_their_callbacks(
    redis_url: str, managers: list[LeaseManager]
) -> None:
    """Thirty callbacks of 0.2 s each, one after the other, would outlast the lease's local
    deadline (0.9 x 3 s): the last ones would find their lease lapsed and, as the feed
    did, not act. They run together."""
    symbols = tuple(f"S{i}" for i in range(30))
    seen: dict[str, bool] = {}
    a: LeaseManager

    async def gained(symbol: str) -> None:
        await asyncio.sleep(0.2)
        seen[symbol] = a.holds(symbol)

    rec = Recorder()
    rec.gained = gained  # type: ignore[method-assign]
    a = make(redis_url, managers, A, rec, symbols=symbols, ttl=3.0)
    await a.step()
    assert seen == dict.fromkeys(symbols, True)
