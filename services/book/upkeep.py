"""One upkeep loop per book replica: the routine Redis work of every book it keeps, batched.

Every :data:`UPKEEP_S` (0.1 s) the loop asks each book (a
:class:`~services.book.consumer.SymbolConsumer`) for its routine work and sends
all of it in **one pipeline**: the ``top`` hash of each book that changed (at
most 10 writes a second each), the feed's heartbeat (every
``BOOK_FEED_CHECK_SECONDS``), the stream's newest entries for the lag (every
second) and the user's active orders (every second); each reply goes back to
its book's handler. Work that is rare and belongs to one book (a dead letter
left over, a snapshot awaited, a checkpoint) is awaited for that book alone.
The counters of each book are reported at every tick.

Why one loop: a hundred books each with its own 20 Hz task and its own round
trips cost the replica 0.39 of a core with no message flowing at all (a task
wake-up, a timeout and a few commands per book and tick); the loop pays one
wake-up and one round trip a tick for all of them (docs/BENCHMARKS.md, "Many
symbols"), as the one :class:`~services.book.reader.StreamReader` does for the
reads.

Errors: a connection error (the pipeline, or a book's own work) ends the tick
and the next one waits with backoff, logged once; an error Redis answers about
one book's key is logged for that book at most every :data:`QUIET_S`; any other
error is a bug in that book: it is handed the error (``fail``), and its
supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import redis.asyncio
import redis.exceptions

from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from kumex_l3.tasks import cancel_and_wait

__all__ = ["QUIET_S", "UPKEEP_S", "YIELD_EVERY", "Handler", "Kept", "Upkeep"]

log = logging.getLogger(__name__)

#: The upkeep's tick (each job has its own interval, none shorter: the ``top`` hash is
#: written at most 10 times a second).
UPKEEP_S: Final = 0.1
#: The upkeep lets the event loop go (the stream reader, HTTP) every this many books.
YIELD_EVERY: Final = 16
#: One book's Redis refusals are logged at most this often.
QUIET_S: Final = 10.0

#: Takes a pipelined command's reply.
Handler = Callable[[Any], Awaitable[None]]


class Kept(Protocol):
    """What the upkeep needs of a book."""

    symbol: str

    def needs_attention(self, now: float) -> bool:
        """Whether its rare, own work is due (then :meth:`attend` is awaited)."""

    async def attend(self, now: float) -> None:
        """Its rare, own work (dead letters, snapshot requests, checkpoint)."""

    def queue_upkeep(self, now: float, pipe: Any, handlers: list[Handler]) -> None:
        """Queue its routine commands on ``pipe``, one handler each in ``handlers``."""

    def report_stats(self) -> None:
        """Report its counters and gauges."""

    def fail(self, exc: BaseException) -> None:
        """A bug in its upkeep: end it with ``exc``."""


class Upkeep:
    """The replica's one upkeep loop (:meth:`start` / :meth:`stop`)."""

    def __init__(self, client: redis.asyncio.Redis, *,
                 errors: tuple[type[BaseException], ...],
                 clock: Callable[[], float] = time.monotonic,
                 interval: float = UPKEEP_S) -> None:
        self._redis = client
        self._errors = errors
        self._clock = clock
        self.interval = interval
        self._kept: dict[str, Kept] = {}
        self._quiet_until: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, kept: Kept) -> None:
        """Keep ``kept`` from the next tick on (replacing an older book of its symbol)."""
        self._kept[kept.symbol] = kept

    def discard(self, kept: Kept) -> None:
        """Stop keeping ``kept`` (a newer book of its symbol stays)."""
        if self._kept.get(kept.symbol) is kept:
            del self._kept[kept.symbol]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="book-upkeep")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def run(self) -> None:
        backoff = Backoff(initial=0.2, factor=2.0, max_delay=5.0)
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.step()
            except self._errors as exc:
                delay = backoff.next_delay()
                if not failing:
                    log.warning("book upkeep: Redis unreachable, trying again with backoff: %s",
                                exc, extra=kv(books=len(self._kept), retry_s=round(delay, 2)))
                failing = True
                await asyncio.sleep(delay)
            else:
                if failing:
                    log.info("book upkeep: Redis reachable again")
                failing = False
                backoff.reset()

    async def step(self) -> None:
        """One tick: each book's own work where due, then everyone's routine in one pipeline,
        then the counters. Raises connection errors (the caller backs off).

        The loop is let go every :data:`YIELD_EVERY` books: a tick over a hundred books is
        a few milliseconds of work, and the stream reader must not wait behind it.
        """
        now = self._clock()
        kept = list(self._kept.values())
        for i, book in enumerate(kept, 1):
            if book.needs_attention(now):
                await self._guard(book, book.attend(now))
            elif i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        calls: list[tuple[Kept, Handler]] = []
        handlers: list[Handler] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for book in kept:
                book.queue_upkeep(now, pipe, handlers)
                calls.extend((book, h) for h in handlers)
                handlers.clear()
            replies: list[Any] = await pipe.execute(raise_on_error=False) if calls else []
        for i, ((book, handler), reply) in enumerate(zip(calls, replies, strict=True), 1):
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if self._kept.get(book.symbol) is not book:
                continue  # stopped meanwhile
            if isinstance(reply, redis.exceptions.ResponseError):
                self._refused(book, reply)
                continue
            await self._guard(book, handler(reply))
        for i, book in enumerate(kept, 1):
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if self._kept.get(book.symbol) is book:
                book.report_stats()

    async def _guard(self, book: Kept, work: Awaitable[None]) -> None:
        try:
            await work
        except redis.exceptions.ResponseError as exc:
            self._refused(book, exc)
        except self._errors:
            raise
        except Exception as exc:
            self.discard(book)
            book.fail(exc)

    def _refused(self, book: Kept, exc: Exception) -> None:
        now = self._clock()
        if now >= self._quiet_until.get(book.symbol, float("-inf")):
            self._quiet_until[book.symbol] = now + QUIET_S
            log.warning("book upkeep: Redis refuses an operation on its keys: %s", exc,
                        extra=kv(symbol=book.symbol))
