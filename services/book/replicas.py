"""Several book replicas sharing the symbols: leases, local consumers, and the owners' URLs.

:class:`BookService` holds this replica's symbol leases (role ``book``) through
:class:`~kumex_l3.lease.LeaseManager`, in even shares with the other live
replicas: a replica over its share (another one joined) hands the excess off
(a last checkpoint at the book's sequence, then the lease released; the next
owner starts from that checkpoint), and a replica stopped cleanly hands off
everything it holds. For each symbol it gains it runs a
:class:`~services.book.consumer.SymbolConsumer` (restarted after a bug, with
backoff), and stops it at once when the lease is lost, so that a symbol is
never served by a replica that no longer owns it. Requests for symbols owned
elsewhere are forwarded by the HTTP layer to the owner's URL, read from the
lease (:meth:`BookService.owner_of`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from kumex_l3 import keys
from kumex_l3.backoff import Backoff
from kumex_l3.lease import LeaseManager, LeaseOwner, read_owner, supervise
from kumex_l3.logs import kv
from kumex_l3.tasks import cancel_and_wait
from services.book.consumer import REDIS_ERRORS, SymbolConsumer
from services.book.metrics import BookMetrics
from services.book.reader import StreamReader
from services.book.settings import ROLE, BookSettings
from services.book.upkeep import Upkeep

__all__ = ["BookService"]

log = logging.getLogger(__name__)


class BookService:
    """This replica's books: lease handling and one consumer per symbol it owns."""

    def __init__(self, settings: BookSettings, client: redis.asyncio.Redis,
                 metrics: BookMetrics) -> None:
        self.settings = settings
        self.redis = client
        self.metrics = metrics
        self.owner = LeaseOwner(settings.replica, settings.url)
        self.leases = LeaseManager(client, ROLE, settings.symbols, self.owner,
                                   ttl=settings.lease_ttl_seconds, on_gained=self._gained,
                                   on_lost=self._lost, on_handoff=self._handoff,
                                   members=True)
        self._consumers: dict[str, SymbolConsumer] = {}
        #: One XREAD for every book kept here (services.book.reader); on a Redis
        #: Cluster, one per hash slot, since one command reads keys of one slot only.
        self.readers: dict[int, StreamReader] = {}
        self._started = False
        #: One upkeep loop for every book kept here (services.book.upkeep).
        self.upkeep = Upkeep(client, errors=REDIS_ERRORS)
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._owner_reads: dict[str, asyncio.Future[LeaseOwner | None]] = {}
        self._lease_task: asyncio.Task[None] | None = None
        for symbol in settings.symbols:
            metrics.owned.labels(symbol).set(0)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start taking leases (returns at once; the first round runs in the background)."""
        self._started = True
        for reader in self.readers.values():
            reader.start()
        self.upkeep.start()
        if self._lease_task is None:
            self._lease_task = asyncio.create_task(self.leases.run(), name="book-leases")

    async def drain(self) -> int:
        """Hand every owned book off (a last checkpoint, then the lease given back, one
        symbol after the other) so that the other replicas take them at once, and take
        nothing any more; this replica still answers (by proxy). The books handed off."""
        task, self._lease_task = self._lease_task, None
        await cancel_and_wait(task)
        before = self.leases.handoffs
        await self.leases.drain()
        return self.leases.handoffs - before

    async def stop(self) -> None:
        """Drain (if not done yet), then stop reading and close the leases."""
        if not self.leases.draining:
            await self.drain()
        for symbol in list(self._supervisors):
            await self._stop_symbol(symbol, checkpoint=True)
        for reader in self.readers.values():
            await reader.stop()
        await self.upkeep.stop()
        await self.leases.close()

    def reader_of(self, symbol: str) -> StreamReader:
        """The reader of ``symbol``'s stream (made, and started with the service, the
        first time a symbol of its slot asks)."""
        slot = key_slot(keys.l3_stream(symbol).encode()) if self.settings.redis_cluster else 0
        reader = self.readers.get(slot)
        if reader is None:
            reader = self.readers[slot] = StreamReader(
                self.redis, self.settings, errors=REDIS_ERRORS,
                reads=self.metrics.stream_reads)
            if self._started:
                reader.start()
        return reader

    # ------------------------------------------------------------------ reading

    def local(self, symbol: str) -> SymbolConsumer | None:
        """The running consumer of ``symbol`` if this replica owns it, else ``None``."""
        consumer = self._consumers.get(symbol)
        if consumer is None or not consumer.active or not self.leases.holds(symbol):
            return None
        return consumer

    @property
    def owned(self) -> list[str]:
        """Symbols whose lease this replica holds, in configuration order."""
        held = self.leases.held
        return [s for s in self.settings.symbols if s in held]

    async def owner_of(self, symbol: str) -> LeaseOwner | None:
        """The replica holding ``symbol`` now (from Redis), or ``None``.

        Concurrent asks for one symbol share one read: a flood of requests for a
        symbol owned elsewhere costs Redis one ``GET`` at a time, not one connection
        per request (which starved the reads for other symbols).
        """
        if self.leases.holds(symbol):
            return self.owner
        read = self._owner_reads.get(symbol)
        if read is None:
            read = asyncio.ensure_future(read_owner(self.redis, symbol, ROLE))
            self._owner_reads[symbol] = read
            read.add_done_callback(functools.partial(self._owner_read_done, symbol))
        # Shielded: one caller cancelled (its client gone) does not cancel the others' read.
        return await asyncio.shield(read)

    def _owner_read_done(self, symbol: str, read: asyncio.Future[LeaseOwner | None]) -> None:
        if self._owner_reads.get(symbol) is read:
            del self._owner_reads[symbol]
        if not read.cancelled():
            read.exception()  # retrieved: every waiter left may have been cancelled

    def ready(self) -> tuple[bool, str]:
        """Ready when a lease round went through and every owned book has been served, and
        none has gone unserved for longer than ``BOOK_READY_MAX_UNSERVED_SECONDS`` since.

        A resync of a few seconds keeps the replica ready (it still serves its
        other books and proxies); a book wedged for longer makes it not ready.
        """
        if self.leases.rounds == 0:
            return False, "leases not taken yet"
        now = time.monotonic()
        bound = self.settings.ready_max_unserved_seconds
        never: list[str] = []
        stuck: list[str] = []
        resyncing: list[str] = []
        for symbol in self.owned:
            consumer = self.local(symbol)
            if consumer is None or not consumer.served_once:
                never.append(symbol)
            elif not consumer.serving:
                waited = consumer.unserved_for(now)
                (stuck if waited > bound else resyncing).append(f"{symbol} ({waited:.0f} s)")
        if never:
            return False, "not synced yet: " + ",".join(never)
        if stuck:
            return False, f"not served for more than {bound:g} s: " + ", ".join(stuck)
        if resyncing:
            return True, "ok; resyncing: " + ", ".join(resyncing)
        return True, "ok"

    async def books(self) -> list[dict[str, Any]]:
        """Every configured symbol: sequence, synced, owner (local state or Redis)."""
        remote = [s for s in self.settings.symbols if self.local(s) is None]
        found: dict[str, tuple[Any, Any]] = {}
        if remote:
            async with self.redis.pipeline(transaction=False) as pipe:
                for symbol in remote:
                    pipe.get(keys.owner(symbol, ROLE))
                    pipe.hgetall(keys.top(symbol))
                values: list[Any] = await pipe.execute()
            for i, symbol in enumerate(remote):
                found[symbol] = (values[2 * i], values[2 * i + 1])
        rows: list[dict[str, Any]] = []
        for symbol in self.settings.symbols:
            consumer = self.local(symbol)
            if consumer is not None:
                book = consumer.book
                rows.append({"symbol": symbol,
                             "sequence": book.sequence if book is not None else None,
                             "synced": consumer.serving, "owner": self.owner.id,
                             "ownerUrl": self.owner.url, "local": True})
                continue
            raw_owner, top = found[symbol]
            owner = None if raw_owner is None else LeaseOwner.from_json(raw_owner)
            sequence = top.get(b"sequence")
            rows.append({"symbol": symbol,
                         "sequence": int(sequence) if sequence and sequence.isdigit() else None,
                         "synced": owner is not None and top.get(b"synced") == b"1",
                         "owner": owner.id if owner is not None else None,
                         "ownerUrl": owner.url if owner is not None else None,
                         "local": False})
        return rows

    # ------------------------------------------------------------------ leases

    async def _gained(self, symbol: str) -> None:
        log.info("symbol taken", extra=kv(symbol=symbol, replica=self.owner.id))
        self.metrics.owned.labels(symbol).set(1)
        if symbol not in self._supervisors:
            self._supervisors[symbol] = asyncio.create_task(self._supervise(symbol),
                                                            name=f"book-supervisor-{symbol}")

    async def _lost(self, symbol: str) -> None:
        log.info("symbol released", extra=kv(symbol=symbol, replica=self.owner.id))
        self.metrics.owned.labels(symbol).set(0)
        # Another replica may own it already: no last checkpoint from here.
        await self._stop_symbol(symbol, checkpoint=False)

    async def _handoff(self, symbol: str) -> None:
        # The lease is still ours: the last checkpoint is where the next owner starts.
        log.info("symbol handed off", extra=kv(symbol=symbol, replica=self.owner.id))
        self.metrics.owned.labels(symbol).set(0)
        await self._stop_symbol(symbol, checkpoint=True)

    async def _stop_symbol(self, symbol: str, *, checkpoint: bool) -> None:
        await cancel_and_wait(self._supervisors.pop(symbol, None))
        consumer = self._consumers.pop(symbol, None)
        if consumer is not None:
            await consumer.stop(checkpoint=checkpoint)

    async def _supervise(self, symbol: str) -> None:
        async def run() -> None:
            consumer = SymbolConsumer(symbol, self.redis, self.settings, self.metrics,
                                      self.reader_of(symbol), self.upkeep)
            self._consumers[symbol] = consumer
            await consumer.run()

        await supervise(run, what="book consumer", symbol=symbol,
                        backoff=Backoff(initial=1.0, factor=2.0, max_delay=30.0))
