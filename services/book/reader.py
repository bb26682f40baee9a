"""One stream reader per book replica: a single ``XREAD BLOCK`` over every book it keeps.

Each :class:`~services.book.consumer.SymbolConsumer` registers here once it has
started (from its checkpoint or a snapshot) and leaves when it stops. The
reader asks Redis for every registered stream at once, from each one's own
read position, and hands each consumer its entries (none, when its stream had
nothing new: the read still shows that book current as of when it was sent).

Why one: a wake-up costs the same whatever it brings (the round trip, redis-py's
timeouts, the loop's scheduling), so one read loop per symbol made every symbol
pay it on its own; one read for all of them shares it (docs/BENCHMARKS.md,
"Read path"). The consumers' upkeep (checkpoints, the ``top`` hash, the feed's
heartbeat, lag) runs in their own tasks, never between a read and the next.

The read has a connection of its own, used through redis-py's ``Connection``
(connect, authenticate, send, parse) without the client's pool and retry layers:
half of a wake-up's cost in the client was those layers, and a wake-up is what
the book pays most often. The reply is awaited for the block time plus
:data:`READ_GRACE_S` at most: a connection that went silent (a partition, a
paused Redis) is dropped and made again, instead of waiting on TCP for hours.

A connection error on the read is retried with backoff (the books stay as they
are; they stop being served once no read has confirmed them for
``BOOK_MAX_AGE_SECONDS``). An error Redis answers about one key (its stream
holds a string: ``WRONGTYPE``) fails the whole multi-stream read, so the reader
asks each stream alone which ones Redis refuses, leaves those out for
:data:`REFUSED_RETRY_S` (their consumers are told why: :meth:`Reading.refused`,
and answer 503 saying so) and reads the others at once: one bad key never stops
the other books. A Redis error while one consumer acts on its entries (a
snapshot fetch) is logged and left to that consumer's upkeep, which asks again;
any other error is a bug in that consumer: it is handed the error
(:meth:`Reading.fail`), and its supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import redis.asyncio
import redis.exceptions
from prometheus_client import Counter
from redis.asyncio.connection import AbstractConnection

from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from kumex_l3.redis_adapter import is_transient
from kumex_l3.tasks import cancel_and_wait
from services.book.settings import BookSettings

__all__ = ["Reading", "StreamReader"]

log = logging.getLogger(__name__)

#: How long past the block time a read's reply may take before the connection is
#: dropped and made again.
READ_GRACE_S: Final = 5.0
#: How long a stream Redis refused to read is left out before it is tried again.
REFUSED_RETRY_S: Final = 1.0


class Reading(Protocol):
    """What the reader needs of a consumer."""

    symbol: str
    #: The last stream entry consumed (``XREAD`` goes on after it).
    read_id: str
    #: Set once a read showed the stream's end.
    caught_up: bool

    @property
    def stream(self) -> str: ...

    async def on_read(self, entries: list[Any], issued: float) -> None:
        """The stream's entries after :attr:`read_id` (at least one), read at ``issued``."""

    def on_nothing_new(self, issued: float) -> None:
        """A read sent at ``issued`` found nothing after :attr:`read_id` (called until the
        consumer is caught up; after that, :attr:`StreamReader.last_issued` says it)."""

    def fail(self, exc: BaseException) -> None:
        """A bug while handling a read: end the consumer with ``exc``."""

    def refused(self, reason: str | None) -> None:
        """Redis refuses to read the stream (``reason``), or reads it again (``None``)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bulk(value: str) -> bytes:
    """One RESP bulk string."""
    raw = value.encode()
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def _pairs(reply: Any) -> Any:
    """``XREAD``'s raw reply (a RESP3 map or RESP2 pairs) as (stream, entries) pairs."""
    if not reply:
        return ()
    return reply.items() if isinstance(reply, dict) else reply


def _by_stream(reply: Any, more: Any = None) -> dict[str, list[tuple[Any, dict[Any, Any]]]]:
    """``XREAD``'s raw reply as {stream: [(id, fields)]}; with ``more``, the reply of a read
    sent just after it from the same positions (:meth:`_Plan.command`), whose entries past
    the first reply's are added to it."""
    got: dict[str, list[Any]] = {_text(stream): entries for stream, entries in _pairs(reply)}
    for stream, entries in _pairs(more):
        name = _text(stream)
        first = got.get(name)
        if not first:
            got[name] = entries
        elif len(entries) > len(first) and entries[len(first) - 1][0] == first[-1][0]:
            # The same start, so the first reply is a prefix of this one. Anything else
            # (the stream trimmed between the two) keeps the first alone: the next read
            # goes on from its end.
            got[name] = [*first, *entries[len(first):]]
    return {stream: [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                     for entry_id, flat in entries]
            for stream, entries in got.items()}


@dataclass(slots=True)
class _Plan:
    """The read of a set of streams: its command's parts, cached between reads."""

    readers: list[Reading]
    #: ``*N XREAD COUNT n BLOCK ms STREAMS k1 .. kn`` in RESP.
    prefix: bytes
    #: ``*N XREAD COUNT n STREAMS k1 .. kn``: the follow-up read, when there are several.
    follow: bytes | None
    #: Each stream's read position in RESP, in the order of ``readers``.
    ids: list[bytes]
    #: Stream -> its place in ``readers``.
    place: dict[str, int]

    @classmethod
    def of(cls, readers: list[Reading], batch: int, block_ms: int) -> _Plan:
        def packed(*head: bytes) -> bytes:
            return b"*%d\r\n" % (len(head) + 2 * len(readers)) + b"".join(
                b"$%d\r\n%s\r\n" % (len(a), a) for a in head) + streams

        streams = b"".join(_bulk(r.stream) for r in readers)
        count = (b"XREAD", b"COUNT", str(batch).encode())
        return cls(readers, packed(*count, b"BLOCK", str(block_ms).encode(), b"STREAMS"),
                   packed(*count, b"STREAMS") if len(readers) > 1 else None,
                   [_bulk(r.read_id) for r in readers],
                   {r.stream: i for i, r in enumerate(readers)})

    def command(self) -> bytes:
        """The blocking read and, over several streams, a follow-up read from the same
        positions without blocking, sent together.

        Why the follow-up: Redis (7.0) answers a blocked ``XREAD`` with the one stream
        whose write woke it, at that write. The feed appends a batch to several streams
        in one pipeline, so the read woken by its first stream would miss the others,
        and a second round trip would fetch them. Redis runs the follow-up once it has
        handled the rest of that pipeline, and both replies come in one write: one round
        trip a flush, as with one stream (docs/BENCHMARKS.md, "Many symbols").
        """
        ids = b"".join(self.ids)
        if self.follow is None:
            return self.prefix + ids
        return self.prefix + ids + self.follow + ids

    def args(self, batch: int, block_ms: int) -> list[str | int]:
        """The same read as the arguments of a command (for a Redis Cluster client)."""
        return ["XREAD", "COUNT", batch, "BLOCK", block_ms, "STREAMS",
                *(r.stream for r in self.readers), *(r.read_id for r in self.readers)]


def _parsed_by_stream(reply: Any) -> dict[str, list[tuple[Any, dict[Any, Any]]]]:
    """``XREAD``'s reply as redis-py's client parsed it, as {stream: [(id, fields)]}."""
    if not reply:
        return {}
    pairs = reply.items() if isinstance(reply, dict) else reply
    return {_text(stream): list(entries) for stream, entries in pairs}


class StreamReader:
    """The replica's one read loop (:meth:`start` / :meth:`stop`)."""

    def __init__(self, client: redis.asyncio.Redis, settings: BookSettings, *,
                 errors: tuple[type[BaseException], ...],
                 reads: Counter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = client
        #: Counts the round trips (every read sent, answered or not).
        self._reads = reads
        self._batch = settings.read_batch
        self._block_ms = max(1, int(settings.read_block_seconds * 1000))
        self._deadline = settings.read_block_seconds + READ_GRACE_S
        self._errors = errors
        self._clock = clock
        self._readers: dict[str, Reading] = {}
        #: Streams Redis refused to read: until when they are left out.
        self._refused: dict[str, float] = {}
        self._joined = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        if not settings.redis_cluster:
            pool = client.connection_pool
            self._conn = pool.connection_class(**pool.connection_kwargs)
            # The reply has its own deadline (below); a socket timeout would wrap every
            # send in asyncio.wait_for, a task each, for nothing.
            self._conn.socket_timeout = None
        # The read's command, packed by hand from cached parts: with a hundred streams,
        # redis-py packing 200 arguments on every read was a tenth of the book's CPU.
        # Rebuilt when the streams change (``_plan`` None); an id's part when it moves.
        self._plan: _Plan | None = None
        #: Consumers added and not caught up yet, with when they were added.
        self._fresh: dict[Reading, float] = {}
        #: Streams whose last read filled the batch: more may wait behind it, so the
        #: read does not show them current (:meth:`confirms`).
        self._behind: set[str] = set()
        #: When the last read was sent whose reply has been handled in full: every stream
        #: read then (not left out, not added since) is known current as of that time.
        self.last_issued = float("-inf")

    def add(self, reader: Reading) -> None:
        """Read ``reader``'s stream from the next read on (replacing an older consumer)."""
        self._readers[reader.stream] = reader
        self._fresh[reader] = self._clock()
        self._plan = None
        self._joined.set()

    def discard(self, reader: Reading) -> None:
        """Stop reading for ``reader`` (a newer consumer of its stream stays)."""
        self._fresh.pop(reader, None)
        if self._readers.get(reader.stream) is reader:
            del self._readers[reader.stream]
            self._refused.pop(reader.stream, None)
            self._behind.discard(reader.stream)
            self._plan = None

    def confirms(self, reader: Reading) -> bool:
        """Whether :attr:`last_issued` covers ``reader``: it is read (not left out) and was
        caught up before that read."""
        return (reader.caught_up and reader not in self._fresh
                and self._readers.get(reader.stream) is reader
                and reader.stream not in self._refused and reader.stream not in self._behind)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="book-reader")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._conn is not None:
            await self._conn.disconnect()

    async def run(self) -> None:
        backoff = Backoff(initial=0.2, factor=2.0, max_delay=5.0)
        while True:
            readers = self._due()
            if not readers:
                await self._idle()
                continue
            # The read shows the streams as of some time after it was sent: count from the
            # send (a process paused before it handled the reply must not date it later).
            issued = self._clock()
            plan = self._plan
            if plan is None or plan.readers != readers:
                plan = self._plan = _Plan.of(readers, self._batch, self._block_ms)
            if self._reads is not None:
                self._reads.inc()
            try:
                got = await self._read(plan)
            except redis.exceptions.ResponseError as exc:
                # A reply Redis gives only for a while (a cluster electing a master,
                # loading) is waited out; only a refusal of one stream is left out.
                if is_transient(exc) or not await self._leave_out_refused(readers, exc):
                    await self._retry(backoff, exc, readers)
                continue
            except self._errors as exc:
                await self._retry(backoff, exc, readers)
                continue
            backoff.reset()
            if self._refused:
                for reader in readers:
                    if self._refused.pop(reader.stream, None) is not None:
                        log.info("stream readable again", extra=kv(symbol=reader.symbol))
                        reader.refused(None)
                        self._plan = None
            for stream, entries in got.items():
                place = plan.place.get(stream)
                if place is None or not entries:
                    continue
                consumer = plan.readers[place]
                if self._readers.get(stream) is not consumer:
                    continue  # stopped while the read was out
                await self._hand(consumer, entries, issued)
                plan.ids[place] = _bulk(consumer.read_id)
            # A full batch may have more behind it; a stream this read found nothing new
            # in, or fewer entries than a batch, is at its end.
            self._behind = {stream for stream, entries in got.items()
                            if len(entries) >= self._batch}
            for reader, added in list(self._fresh.items()):
                if reader.caught_up:
                    del self._fresh[reader]
                elif added <= issued and reader.stream not in got:
                    reader.on_nothing_new(issued)
            self.last_issued = issued

    def _due(self) -> list[Reading]:
        """The consumers to read for now (those Redis refused wait out their delay)."""
        if not self._refused:
            return list(self._readers.values())
        now = self._clock()
        return [r for r in self._readers.values() if self._refused.get(r.stream, now) <= now]

    async def _idle(self) -> None:
        """Wait for a consumer to join, or for a refused stream's retry time."""
        self._joined.clear()
        if self._refused:
            wait = min(self._refused.values()) - self._clock()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait)):
                    await self._joined.wait()
        else:
            await self._joined.wait()

    async def _read(self, plan: _Plan) -> dict[str, list[tuple[Any, dict[Any, Any]]]]:
        if self._conn is None:
            # A Redis Cluster: through the client, which knows which node serves the
            # slot now (this reader's streams are of one slot: BookService).
            return _parsed_by_stream(await self._redis.execute_command(  # type: ignore[no-untyped-call]
                *plan.args(self._batch, self._block_ms)))
        return await self._xread(self._conn, plan)

    async def _xread(self, conn: AbstractConnection,
                     plan: _Plan) -> dict[str, list[tuple[Any, dict[Any, Any]]]]:
        await conn.send_packed_command(plan.command(), check_health=False)
        # Not read_response(timeout=...): it answers None at the deadline, as XREAD does
        # when nothing came, and keeps the connection with the reply still owed on it.
        try:
            async with asyncio.timeout(self._deadline):
                try:
                    reply = await conn.read_response()
                except redis.exceptions.ResponseError:
                    if plan.follow is not None:  # its reply is owed too: read it first
                        with contextlib.suppress(redis.exceptions.ResponseError):
                            await conn.read_response()
                    raise
                more = None if plan.follow is None else await conn.read_response()
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError(
                f"no reply to the stream read in {self._deadline:g} s: connection dropped"
            ) from None
        return _by_stream(reply, more)

    async def _retry(self, backoff: Backoff, exc: BaseException, readers: list[Reading]) -> None:
        delay = backoff.next_delay()
        log.warning("redis error on the stream read, retrying in %.1f s: %s", delay, exc,
                    extra=kv(streams=len(readers)))
        await asyncio.sleep(delay)

    async def _leave_out_refused(self, readers: list[Reading],
                                 exc: redis.exceptions.ResponseError) -> bool:
        """Ask each stream alone; leave out those Redis refuses. ``False``: none was."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for r in readers:
                    pipe.xread({r.stream: r.read_id}, count=1)
                answers = await pipe.execute(raise_on_error=False)
        except self._errors:
            return False
        until = self._clock() + REFUSED_RETRY_S
        found = False
        for reader, answer in zip(readers, answers, strict=True):
            if not isinstance(answer, redis.exceptions.ResponseError) or is_transient(answer):
                continue
            found = True
            reason = f"Redis refuses to read its stream: {answer}"
            if reader.stream not in self._refused:
                log.error("stream left out of the read: %s", reason,
                          extra=kv(symbol=reader.symbol, stream=reader.stream))
            self._refused[reader.stream] = until
            reader.refused(reason)
        if not found:
            log.warning("the stream read was refused, but no stream alone is: %s", exc,
                        extra=kv(streams=len(readers)))
        return found

    async def _hand(self, reader: Reading, entries: list[Any], issued: float) -> None:
        try:
            await reader.on_read(entries, issued)
        except self._errors as exc:
            log.warning("redis error while handling a read (its upkeep asks again): %s", exc,
                        extra=kv(symbol=reader.symbol))
        except Exception as exc:
            self.discard(reader)
            reader.fail(exc)
