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

A Redis error on the read is retried with backoff (the books stay as they are;
they stop being served once no read has confirmed them for
``BOOK_MAX_AGE_SECONDS``). A Redis error while one consumer acts on its entries
(a snapshot fetch) is logged and left to that consumer's upkeep, which asks
again; any other error is a bug in that consumer: it is handed the error
(:meth:`Reading.fail`), and its supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio

from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from kumex_l3.tasks import cancel_and_wait
from services.book.settings import BookSettings

__all__ = ["Reading", "StreamReader"]

log = logging.getLogger(__name__)


class Reading(Protocol):
    """What the reader needs of a consumer."""

    symbol: str
    #: The last stream entry consumed (``XREAD`` goes on after it).
    read_id: str

    @property
    def stream(self) -> str: ...

    async def on_read(self, entries: list[Any], issued: float) -> None:
        """The stream's entries after :attr:`read_id` (maybe none), read at ``issued``."""

    def fail(self, exc: BaseException) -> None:
        """A bug while handling a read: end the consumer with ``exc``."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamReader:
    """The replica's one read loop (:meth:`start` / :meth:`stop`)."""

    def __init__(self, client: redis.asyncio.Redis, settings: BookSettings, *,
                 errors: tuple[type[BaseException], ...],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = client
        self._batch = settings.read_batch
        self._block_ms = max(1, int(settings.read_block_seconds * 1000))
        self._errors = errors
        self._clock = clock
        self._readers: dict[str, Reading] = {}
        self._joined = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, reader: Reading) -> None:
        """Read ``reader``'s stream from the next read on (replacing an older consumer)."""
        self._readers[reader.stream] = reader
        self._joined.set()

    def discard(self, reader: Reading) -> None:
        """Stop reading for ``reader`` (a newer consumer of its stream stays)."""
        if self._readers.get(reader.stream) is reader:
            del self._readers[reader.stream]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="book-reader")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def run(self) -> None:
        backoff = Backoff(initial=0.2, factor=2.0, max_delay=5.0)
        while True:
            if not self._readers:
                self._joined.clear()
                await self._joined.wait()
                continue
            readers = list(self._readers.values())
            # The read shows the streams as of some time after it was sent: count from the
            # send (a process paused before it handled the reply must not date it later).
            issued = self._clock()
            try:
                reply: Any = await self._redis.xread(
                    {r.stream: r.read_id for r in readers}, count=self._batch,
                    block=self._block_ms)
            except self._errors as exc:
                delay = backoff.next_delay()
                log.warning("redis error on the stream read, retrying in %.1f s: %s", delay,
                            exc, extra=kv(streams=len(readers)))
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            got = {_text(stream): entries for stream, entries in reply} if reply else {}
            for reader in readers:
                if self._readers.get(reader.stream) is not reader:
                    continue  # stopped while the read was out
                await self._hand(reader, got.get(reader.stream, []), issued)

    async def _hand(self, reader: Reading, entries: list[Any], issued: float) -> None:
        try:
            await reader.on_read(entries, issued)
        except self._errors as exc:
            log.warning("redis error while handling a read (its upkeep asks again): %s", exc,
                        extra=kv(symbol=reader.symbol))
        except Exception as exc:
            self.discard(reader)
            reader.fail(exc)
