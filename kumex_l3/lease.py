"""Symbol leases in Redis: which replica of a role serves which symbol.

A lease is the string key :func:`kumex_l3.keys.owner` ``(symbol, role)``
holding ``{"id": replica_id, "url": public_url}`` with a TTL. Its holder
renews it every period (``ttl / 3``, at most 2 s); when the holder dies the key
expires and another replica takes the symbol at its next step, so a takeover
takes at most ``ttl + period``. The operations are atomic on the server:

* :func:`acquire`: ``SET NX PX`` (a lease already holding exactly our value,
  left by a previous run of the same replica id, is taken back at once);
* :func:`renew`: compare-and-``PEXPIRE`` (only if the value is still ours);
* :func:`release`: compare-and-``DEL``.

:class:`LeaseManager` runs these for a list of symbols: it acquires free
symbols, renews held ones, and reports each transition to the service through
``on_gained`` / ``on_lost``.

**Even shares** (``members=True``: the book and the order monitor). Every
replica of the role keeps an entry in the sorted set :func:`kumex_l3.keys.members`
(scored by the Redis server's clock, so that no two hosts' clocks are compared),
and each works out its own share from the same list: with ``S`` symbols and
``R`` live replicas sorted by id, the replica of rank ``r`` holds
``S // R``, plus one when ``r < S % R``. The shares add up to ``S``, so the
replicas converge to an even split (within one symbol) whoever joins or leaves.
A replica over its share *hands off* the excess: ``on_handoff`` runs while the
lease is still held (the book writes its last checkpoint there), then the lease
is released and :func:`kumex_l3.keys.moves` is bumped. Every replica looks at
that counter every ``watch`` seconds and steps at once when it moved, so a
symbol handed off is taken within about ``watch`` seconds, not a period.
:meth:`LeaseManager.drain` hands everything off the same way (leaving the
membership first, so that the others' shares have grown when the symbols come
free): a replica stopped cleanly costs each of its symbols one handoff.

Without ``members`` (the feed's writer leases) balancing is first come, first
served with a cap: while other owners are visible a replica takes at most
``ceil(symbols / replicas)`` (replicas = distinct owners seen, itself
included); a replica alone takes everything, and leases move only when their
holder stops or dies.

Redis trouble never stops the manager: it keeps trying every period, and a
lease not renewed in time is reported lost a little *before* it can expire on
the server (``ttl / 10`` early), so that two replicas never both believe they
serve a symbol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio
import redis.exceptions

from kumex_l3 import keys
from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from kumex_l3.redis_adapter import LuaScript

__all__ = [
    "LeaseCallback",
    "LeaseManager",
    "LeaseOwner",
    "acquire",
    "read_owner",
    "read_owners",
    "release",
    "renew",
    "supervise",
]

log = logging.getLogger(__name__)

#: Called with the symbol when a lease is gained or lost.
LeaseCallback = Callable[[str], Awaitable[None]]

# Set when free, or when it already holds our value (a restart of the same replica id).
_ACQUIRE: Final = LuaScript("""
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
""")
_RENEW: Final = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")
_RELEASE: Final = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")

# Keep this replica's membership entry (or drop it: ARGV[3] = "1") and the live list; the
# counter of moves is bumped whenever the list changes. TIME: the server's clock only.
_MEMBERS: Final = LuaScript("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local changed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  changed = changed + redis.call('ZREM', KEYS[1], ARGV[1])
else
  changed = changed + redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
if changed > 0 then
  redis.call('INCR', KEYS[2])
end
return {redis.call('GET', KEYS[2]) or '0', redis.call('ZRANGE', KEYS[1], 0, -1)}
""")

_REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class LeaseOwner:
    """Who holds a lease: the replica ``id`` and the ``url`` it serves at (if any)."""

    id: str
    url: str | None = None

    def to_json(self) -> str:
        """The lease value (compact JSON, the same text on every call)."""
        return json.dumps({"id": self.id, "url": self.url}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> LeaseOwner:
        """Parse a lease value; a value that is not ours to parse becomes its own ``id``."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
        except ValueError:
            return cls(text)
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            return cls(text)
        url = data.get("url")
        return cls(data["id"], url if isinstance(url, str) else None)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


async def acquire(client: redis.asyncio.Redis, symbol: str, role: str, owner: LeaseOwner,
                  ttl: float) -> bool:
    """Take the lease of ``symbol`` for ``role`` if it is free (or already ours)."""
    done = await _ACQUIRE.run(client, [keys.owner(symbol, role)], [owner.to_json(), _ms(ttl)])
    return bool(done)


async def renew(client: redis.asyncio.Redis, symbol: str, role: str, owner: LeaseOwner,
                ttl: float) -> bool:
    """Extend the lease to ``ttl`` from now, only if ``owner`` still holds it."""
    done = await _RENEW.run(client, [keys.owner(symbol, role)], [owner.to_json(), _ms(ttl)])
    return bool(done)


async def release(client: redis.asyncio.Redis, symbol: str, role: str,
                  owner: LeaseOwner) -> bool:
    """Delete the lease, only if ``owner`` still holds it."""
    done = await _RELEASE.run(client, [keys.owner(symbol, role)], [owner.to_json()])
    return bool(done)


async def read_owner(client: redis.asyncio.Redis, symbol: str, role: str) -> LeaseOwner | None:
    """The current holder of ``symbol``'s lease for ``role``, or ``None`` when free."""
    raw = await client.get(keys.owner(symbol, role))
    return None if raw is None else LeaseOwner.from_json(raw)


async def read_owners(client: redis.asyncio.Redis, symbols: Sequence[str],
                      role: str) -> dict[str, LeaseOwner | None]:
    """The holder of each symbol's lease (one round trip per symbol, pipelined)."""
    async with client.pipeline(transaction=False) as pipe:
        for symbol in symbols:
            pipe.get(keys.owner(symbol, role))
        values: list[Any] = await pipe.execute()
    return {s: None if v is None else LeaseOwner.from_json(v) for s, v in zip(symbols, values,
                                                                               strict=True)}


async def _nothing(symbol: str) -> None:
    return None


class LeaseManager:
    """Acquires, renews and releases the leases of ``symbols`` for one replica of ``role``.

    Run :meth:`run` as a task (or call :meth:`step` yourself); :meth:`close`
    releases every held lease (and reports each as lost). ``on_gained`` and
    ``on_lost`` are awaited inside the step, so keep them short (start or stop
    a task); the gained ones of a step run concurrently. ``clock`` is monotonic
    seconds (injectable for tests).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        role: str,
        symbols: Iterable[str],
        owner: LeaseOwner,
        *,
        ttl: float = 10.0,
        period: float | None = None,
        on_gained: LeaseCallback = _nothing,
        on_lost: LeaseCallback = _nothing,
        on_handoff: LeaseCallback | None = None,
        balance: bool = True,
        members: bool = False,
        watch: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        key: Callable[[str], str] | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        self.client = client
        self.role = role
        self.symbols: tuple[str, ...] = tuple(dict.fromkeys(symbols))
        self.owner = owner
        self.ttl = ttl
        #: Seconds between two steps: renewals and attempts to take free symbols.
        self.period = period if period is not None else min(ttl / 3, 2.0)
        if not 0 < self.period < ttl:
            raise ValueError("period must be > 0 and below ttl")
        self.on_gained = on_gained
        self.on_lost = on_lost
        #: Awaited before a lease is given up to another replica (default ``on_lost``).
        self.on_handoff = on_handoff if on_handoff is not None else on_lost
        self.balance = balance or members
        #: Seconds between two looks at the moves counter (``members`` only).
        self.watch = watch
        self._members_key = keys.members(role) if members else None
        self._moves_key = keys.moves(role)
        #: Live replicas of the role at the last step, by id (``members`` only).
        self.members: tuple[str, ...] = ()
        self._moves: bytes = b""
        #: Set by :meth:`drain`: hold nothing, take nothing.
        self.draining = False
        #: Symbols given up to another replica by handoff since the start.
        self.handoffs = 0
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        #: The lease key of a symbol (default :func:`kumex_l3.keys.owner` of the role).
        self.key: Callable[[str], str] = key if key is not None else (
            lambda symbol: keys.owner(symbol, role))
        # symbol -> monotonic time by which the lease must be considered lost.
        self._held: dict[str, float] = {}
        self._owners: dict[str, LeaseOwner | None] = dict.fromkeys(self.symbols)
        self._lock = asyncio.Lock()
        self._closed = False
        #: Completed steps (a step that met a Redis error is not counted).
        self.rounds = 0
        #: Steps that met a Redis error.
        self.errors = 0

    # ------------------------------------------------------------------ reading

    @property
    def held(self) -> frozenset[str]:
        """Symbols whose lease this replica holds, by its own clock (deadline not passed)."""
        now = self._clock()
        return frozenset(s for s, deadline in self._held.items() if now < deadline)

    def holds(self, symbol: str) -> bool:
        """``True`` while this replica holds ``symbol``'s lease, by its own clock.

        The deadline is checked on every call, not only at the next step: a
        process paused past it (SIGSTOP, a long GC, a stalled VM) must not act
        for the symbol before it has renewed, whatever its last step said.
        """
        deadline = self._held.get(symbol)
        return deadline is not None and self._clock() < deadline

    def deadline(self, symbol: str) -> float | None:
        """Monotonic time until which the lease of ``symbol`` is ours, or ``None``."""
        return self._held.get(symbol)

    @property
    def owners(self) -> dict[str, LeaseOwner | None]:
        """Each symbol's holder as seen at the last step (``None``: free)."""
        owners = dict(self._owners)
        for symbol in self._held:
            owners[symbol] = self.owner
        return owners

    def limit(self) -> int:
        """How many symbols this replica may hold now: its share (see the module doc)."""
        if self.draining:
            return 0
        if not self.balance or not self.symbols:
            return len(self.symbols)
        if self._members_key is not None:
            ids = sorted({*self.members, self.owner.id})
            share, extra = divmod(len(self.symbols), len(ids))
            return share + (1 if ids.index(self.owner.id) < extra else 0)
        alive = {o.id for o in self._owners.values() if o is not None}
        alive.add(self.owner.id)
        return math.ceil(len(self.symbols) / len(alive))

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Step every :attr:`period` until cancelled (never raises on Redis errors)."""
        while not self._closed:
            started = self._clock()
            await self.step()
            await self._pause(self.period - (self._clock() - started))

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``; with ``members``, cut short when the moves counter moved."""
        if self._members_key is None:
            await asyncio.sleep(max(0.0, seconds))
            return
        end = self._clock() + seconds
        while not self._closed and (left := end - self._clock()) > 0:
            await asyncio.sleep(min(self.watch, left))
            try:
                async with asyncio.timeout(max(self.watch, 0.05)):
                    moves = await self.client.get(self._moves_key)
            except _REDIS_ERRORS:
                continue
            if (moves or b"0") != self._moves:
                return

    async def step(self) -> None:
        """One round: renew held leases, read owners, acquire free symbols, expire stale ones.

        The Redis part is bounded by the period (a hung connection cannot keep a
        lease "held" past its deadline); callbacks run after it, losses first.
        """
        async with self._lock:
            if self._closed:
                return
            gained: list[str] = []
            lost: list[str] = []
            try:
                async with asyncio.timeout(max(self.period, 0.05)):
                    await self._renew_all(lost)
                    await self._heartbeat()
                    self._owners = await self._read_owners()
                    await self._acquire_free(gained)
            except _REDIS_ERRORS as exc:
                self.errors += 1
                log.warning("lease round failed: %s", str(exc) or type(exc).__name__,
                            extra=kv(role=self.role))
            else:
                self.rounds += 1
            self._expire(lost)
            for symbol in lost:
                await self._report(self.on_lost, symbol)
            # Together: a hundred symbols gained at once, their callbacks one after the other
            # (the feed reads two keys for each), took longer than the lease's local
            # deadline, and the last ones found their lease already lapsed by this
            # process's clock, so the feed never wrote them.
            await asyncio.gather(*(self._report(self.on_gained, symbol)
                                   for symbol in gained if symbol in self._held))
            if self._members_key is not None:
                await self._shed()

    async def drain(self) -> None:
        """Leave the membership, then hand every held symbol off (each released as soon
        as its own handoff is done); the manager then holds and takes nothing."""
        async with self._lock:
            self.draining = True
            await self._heartbeat(leaving=True)
            for symbol in [s for s in self.symbols if s in self._held]:
                await self._hand_off(symbol)

    async def close(self, *, release_leases: bool = True) -> None:
        """Stop stepping and give the leases back (each reported through ``on_lost``)."""
        async with self._lock:
            self._closed = True
            if release_leases and not self.draining:  # a drained one has said it leaves
                await self._heartbeat(leaving=True)
            for symbol in list(self._held):
                del self._held[symbol]
                if release_leases:
                    # Bounded like a handoff's: a Redis gone silent must not hold a
                    # stopping process; the lease then lapses at its TTL.
                    with contextlib.suppress(*_REDIS_ERRORS):
                        async with asyncio.timeout(self.period):
                            await _RELEASE.run(self.client, [self.key(symbol)],
                                               [self.owner.to_json()])
                await self._report(self.on_lost, symbol)

    # ------------------------------------------------------------------ internals

    async def _heartbeat(self, *, leaving: bool = False) -> None:
        """Keep (or drop) this replica's membership entry and read the live list."""
        if self._members_key is None:
            return
        leaving = leaving or self.draining  # a drained replica never counts itself back in
        call = _MEMBERS.run(self.client, [self._members_key, self._moves_key],
                            [self.owner.id, _ms(self.ttl), "1" if leaving else "0"])
        if leaving:
            # Best effort: a replica that cannot say it leaves lapses after the TTL.
            with contextlib.suppress(*_REDIS_ERRORS):
                async with asyncio.timeout(self.period):
                    await call
            return
        moves, members = await call
        self._moves = moves
        self.members = tuple(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def _shed(self) -> None:
        """Hand off what this replica holds beyond its share, last configured first."""
        excess = len(self._held) - self.limit()
        if excess <= 0:
            return
        log.info("over its share: handing symbols off", extra=kv(
            role=self.role, held=len(self._held), share=self.limit(),
            replicas=len(self.members)))
        for symbol in [s for s in reversed(self.symbols) if s in self._held][:excess]:
            await self._hand_off(symbol)

    async def _hand_off(self, symbol: str) -> None:
        """``on_handoff`` while still held, then release and bump the moves counter."""
        await self._report(self.on_handoff, symbol)
        if self._held.pop(symbol, None) is None:
            return
        self._owners[symbol] = None
        self.handoffs += 1
        try:
            async with asyncio.timeout(self.period):
                await _RELEASE.run(self.client, [self.key(symbol)], [self.owner.to_json()])
                await self.client.incr(self._moves_key)
        except _REDIS_ERRORS as exc:
            log.warning("handoff release failed: the lease lapses at its TTL",
                        extra=kv(symbol=symbol, role=self.role, error=repr(exc)))
        else:
            log.info("lease given up after its handoff", extra=kv(symbol=symbol,
                                                                    role=self.role))

    async def _read_owners(self) -> dict[str, LeaseOwner | None]:
        async with self.client.pipeline(transaction=False) as pipe:
            for symbol in self.symbols:
                pipe.get(self.key(symbol))
            values: list[Any] = await pipe.execute()
        return {s: None if v is None else LeaseOwner.from_json(v)
                for s, v in zip(self.symbols, values, strict=True)}

    async def _renew_all(self, lost: list[str]) -> None:
        if not self._held:
            return
        symbols = list(self._held)
        value, ttl_ms = self.owner.to_json(), _ms(self.ttl)
        sent = self._clock()
        results = await _RENEW.run_many(
            self.client, [([self.key(symbol)], [value, ttl_ms]) for symbol in symbols],
            raise_on_error=True)
        for symbol, ok in zip(symbols, results, strict=True):
            if ok:
                self._held[symbol] = self._deadline(sent)
            else:
                log.warning("lease lost: held by someone else or expired",
                            extra=kv(symbol=symbol, role=self.role))
                del self._held[symbol]
                lost.append(symbol)

    async def _acquire_free(self, gained: list[str]) -> None:
        limit = self.limit()
        free = [s for s in self.symbols if s not in self._held and self._owners.get(s) is None]
        self._rng.shuffle(free)
        # A lease of ours left by a previous run of this replica id is taken back first.
        mine = [s for s in self.symbols
                if s not in self._held and self._owners.get(s) == self.owner]
        value, ttl_ms = self.owner.to_json(), _ms(self.ttl)
        # One pipeline per round of attempts (as many as there is room for); a symbol
        # someone else took meanwhile makes room for the next free one.
        while True:
            room = max(0, limit - len(self._held) - len(mine))
            batch, mine, free = mine + free[:room], [], free[room:]
            if not batch:
                return
            sent = self._clock()
            results = await _ACQUIRE.run_many(
                self.client, [([self.key(symbol)], [value, ttl_ms]) for symbol in batch],
                raise_on_error=True)
            for symbol, ok in zip(batch, results, strict=True):
                if ok:
                    self._held[symbol] = self._deadline(sent)
                    self._owners[symbol] = self.owner
                    gained.append(symbol)

    def _expire(self, lost: list[str]) -> None:
        now = self._clock()
        for symbol, deadline in list(self._held.items()):
            if now >= deadline:
                log.warning("lease not renewed in time: treated as lost",
                            extra=kv(symbol=symbol, role=self.role))
                del self._held[symbol]
                lost.append(symbol)

    def _deadline(self, sent: float) -> float:
        # The server set the TTL at or after `sent`; stop a little before it can lapse.
        return sent + self.ttl * 0.9

    async def _report(self, callback: LeaseCallback, symbol: str) -> None:
        try:
            await callback(symbol)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lease callback failed", extra=kv(symbol=symbol))


def _always() -> bool:
    return True


async def supervise(
    run: Callable[[], Awaitable[None]],
    *,
    what: str,
    symbol: str,
    backoff: Backoff,
    holds: Callable[[], bool] = _always,
    stop_on: tuple[type[Exception], ...] = (),
    on_failure: Callable[[Exception], None] | None = None,
    healthy_after_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run a symbol's worker while its lease is held; start it again after a failure.

    ``run()`` is awaited while ``holds()``; it returning, or raising one of
    ``stop_on`` (``LeaseLost``), ends the supervision; cancellation goes through.
    Any other error is counted (``on_failure``), logged (a traceback unless it is
    a connection or Redis error) and followed by a new run after
    ``backoff.next_delay()``. A run that lasted ``healthy_after_s`` (default: the
    backoff's longest delay) was a success: the next failure starts small again.
    """
    healthy = backoff.max_delay if healthy_after_s is None else healthy_after_s
    while holds():
        started = clock()
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except stop_on:
            return
        except Exception as exc:
            if clock() - started >= healthy:
                backoff.reset()
            if on_failure is not None:
                on_failure(exc)
            delay = backoff.next_delay()
            log.error(f"{what} failed; starting it again", extra=kv(
                symbol=symbol, error=repr(exc), retry_s=round(delay, 2)),
                exc_info=not isinstance(exc, OSError | redis.exceptions.RedisError))
            await asyncio.sleep(delay)
        else:
            return
