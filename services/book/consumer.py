"""One symbol's book kept from its Redis stream: the I/O shell around the synchroniser.

:class:`SymbolConsumer` starts from the newer of the book's own checkpoint and
the feed's stored snapshot, then takes its stream's entries from the replica's
one :class:`~services.book.reader.StreamReader` (``XREAD BLOCK`` in batches),
feeds :class:`~kumex_l3.sync.Synchronizer` and acts on its outputs: asks the
feed for snapshots (``PUBLISH``, repeated while waiting), fetches announced
ones, dead-letters refused input. The replica's one
:class:`~services.book.upkeep.Upkeep` keeps it, apart from the reads so that no
round trip of it delays a batch: checkpoints while synced, the ``top`` hash, the
feed's heartbeat, lag, and the metrics. HTTP handlers read the book
through :meth:`SymbolConsumer.book_body` and friends, which build each JSON
body once per book version.

Where reading starts:

* checkpoint (at least as new as the snapshot): right after its ``streamId``,
  unless entries after that id were trimmed from the stream;
* stored snapshot at sequence ``S``: after the newest entry whose message
  sequence is ``<= S`` (found by scanning the stream backwards), so that
  ``S + 1`` is read; older entries are stale anyway;
* neither: ``lookback_entries`` before the stream's end, buffered while the
  feed is asked for a snapshot.

Everything runs on the service's event loop: the book is never read while a
batch is being applied. Whatever changes the synchroniser's state across an
await (a read's snapshot fetch, the upkeep's asking again, the feed's
heartbeat) holds the consumer's lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

import msgspec
import redis.asyncio
import redis.exceptions

from kumex_l3 import keys
from kumex_l3.backoff import Backoff
from kumex_l3.book import OrderBook
from kumex_l3.logs import kv
from kumex_l3.messages import format_qty
from kumex_l3.redis_adapter import CONNECTION_ERRORS, parse_stream_id
from kumex_l3.sync import (
    Applied,
    BecameStale,
    BecameSynced,
    BecameUnsynced,
    DeadLetter,
    FetchSnapshot,
    NeedSnapshot,
    Output,
    Synchronizer,
    SyncStats,
)
from kumex_l3.tasks import cancel_and_wait
from services.book.metrics import BookMetrics
from services.book.reader import StreamReader
from services.book.settings import BookSettings
from services.book.upkeep import Handler, Upkeep

__all__ = ["REDIS_ERRORS", "SymbolConsumer", "peek_message_sequence", "peek_snapshot_sequence"]

log = logging.getLogger(__name__)

#: Errors of the Redis connection: retried with backoff, state kept.
REDIS_ERRORS: Final = CONNECTION_ERRORS

_TOP_MIN_INTERVAL: Final = 0.1  # at most 10 writes a second
_TOP_HEARTBEAT: Final = 1.0
_LAG_INTERVAL: Final = 1.0
#: How often the user's own order ids are re-read for the WebSocket body.
_OWN_INTERVAL: Final = 1.0
#: How often the feed's snapshot schedule is read while the book waits for a snapshot.
_DUE_INTERVAL: Final = 1.0
_SCAN_CHUNK: Final = 1000
_CACHE_MAX: Final = 256
#: Apply delays observed per batch at most: a bigger batch is sampled systematically.
_DELAY_SAMPLES: Final = 200


class _Seq(msgspec.Struct, gc=False):
    sequence: int | None = None


class _Envelope(msgspec.Struct, gc=False):
    data: _Seq | None = None


_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)
_SEQ_DECODER: Final = msgspec.json.Decoder(_Seq)
_ENCODER: Final = msgspec.json.Encoder()

#: What the ``top`` hash says: served, sequence, best bid, best ask.
_TopState = tuple[bool, int, str, str]


def _top_mapping(state: _TopState) -> Mapping[Any, Any]:
    served, sequence, bid, ask = state
    return {"sequence": str(sequence), "bestBid": bid, "bestAsk": ask,
            "synced": "1" if served else "0", "updatedAt": str(_now_ms())}


def peek_message_sequence(raw: bytes | str) -> int | None:
    """The ``data.sequence`` of a raw level3v2 message, without a full parse (``None``: bad)."""
    try:
        env = _ENVELOPE_DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return None if env.data is None else env.data.sequence


def _json_object(raw: Any) -> dict[str, Any] | None:
    """A JSON object read from Redis (``None`` when absent or not an object)."""
    if raw is None:
        return None
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _heartbeat_connection(raw: Any) -> str | None:
    """The ``connectId`` of a heartbeat value (``None`` when absent or unreadable)."""
    value = _json_object(raw)
    connection = value.get("connectId") if value is not None else None
    return connection if isinstance(connection, str) and connection else None


def _due_of(raw: Any) -> dict[str, Any] | None:
    """The feed's snapshot schedule of a symbol (:func:`kumex_l3.keys.snapshot_due`)."""
    value = _json_object(raw)
    if value is None or not all(
            isinstance(value.get(k), int) for k in ("dueInMs", "at", "position", "queued")):
        return None
    return value


def peek_snapshot_sequence(raw: bytes | str) -> int | None:
    """The ``sequence`` of a stored snapshot's JSON, without a full parse (``None``: bad)."""
    try:
        return _SEQ_DECODER.decode(raw).sequence
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _trimmed_after(info: Mapping[str, Any], stream_id: str) -> bool:
    """Whether entries after ``stream_id`` may be gone (XINFO STREAM of the stream).

    Conservative: the checkpoint's own entry must still be there (the first
    entry at or before it), and nothing after it deleted.
    """
    at = parse_stream_id(stream_id)
    deleted = info.get("max-deleted-entry-id")
    if deleted is not None and parse_stream_id(_text(deleted)) > at:
        return True
    first = info.get("first-entry")
    if not info.get("length") or first is None:
        last = info.get("last-generated-id")
        return last is not None and parse_stream_id(_text(last)) > at
    return parse_stream_id(_text(first[0])) > at


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SymbolConsumer:
    """Keeps ``symbol``'s book from its stream while this replica holds the lease.

    :meth:`start` runs it as a task, :meth:`stop` ends it (optionally writing a
    last checkpoint). ``serving`` says whether the book may be served.
    """

    def __init__(self, symbol: str, client: redis.asyncio.Redis, settings: BookSettings,
                 metrics: BookMetrics, reader: StreamReader, upkeep: Upkeep, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.symbol = symbol
        self._redis = client
        self._reader = reader
        self._upkeep = upkeep
        self._lock = asyncio.Lock()
        self._dlq_lock = asyncio.Lock()
        #: A bug met while handling a read or in the upkeep (:meth:`fail`): raised by
        #: :meth:`run`.
        self._fault: BaseException | None = None
        self._faulted = asyncio.Event()
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self.sync = Synchronizer(symbol, max_buffer=settings.buffer_max, collect_ts=True)
        self._apply_delay = metrics.apply_delay.labels(symbol)
        self._receipt_delay = metrics.receipt_delay.labels(symbol)
        self._add_stats = metrics.sync_stats_adder(symbol)
        self._synced_gauge = metrics.synced.labels(symbol)
        self._sequence_gauge = metrics.sequence.labels(symbol)
        self._stream = keys.l3_stream(symbol)
        #: Read position: the last stream entry consumed.
        self.read_id = "0-0"
        #: Set once a read came back short: the book has reached the stream's end.
        self.caught_up = False
        #: When (this process's monotonic clock) a stream read last completed: the book
        #: is known current as of then (served only while recent: ``BOOK_MAX_AGE_SECONDS``).
        self._confirmed_at = float("-inf")
        self.active = False
        #: Incremented whenever what the book serves may have changed.
        self.version = 0
        #: Why the book is not served (``None`` while serving).
        self.reason: str | None = "starting"
        #: Why Redis refuses to read this book's stream, while it does (the reader says).
        self.read_refusal: str | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._cache: dict[tuple[str, int], bytes] = {}
        self._cache_version = -1
        self._reported = SyncStats()
        self._gauges: tuple[int, int] = (-1, -1)
        self._pending_dlq: deque[tuple[bytes | str, str, str]] = deque(maxlen=10_000)
        self._request_at = float("-inf")
        self._feed_checked_at = float("-inf")
        # The feed's connection seen in its heartbeat while the book was served, and
        # whether the heartbeat was already missing at the check before.
        self._feed_connection: str | None = None
        self._feed_missing = False
        self._request_min = -1
        self._tried_sequence = -1
        self._cp_at = clock()
        self._cp_applied = 0
        self._cp_mark: tuple[int, str] | None = None
        self._top_at = float("-inf")
        self._top_state: _TopState | None = None
        self._top_version = -1
        self._last_sequence = 0
        self._lag_at = float("-inf")
        #: Exchange orderIds of the user's own active orders (from the order monitor's keys).
        self.own_ids: frozenset[str] = frozenset()
        self._own_at = float("-inf")
        #: Whether the book has been served at least once, and since when it is not.
        self.served_once = False
        self.unserved_since: float | None = clock()
        #: The feed's snapshot schedule for this symbol while the book waits for one.
        self._due: dict[str, Any] | None = None
        self._due_at = float("-inf")
        metrics.synced.labels(symbol).set(0)

    # ------------------------------------------------------------------ serving

    @property
    def serving(self) -> bool:
        """``True`` when the book is synced, fresh (the feed has the exchange), has caught
        up with the stream once, and a stream read confirmed it current less than
        ``BOOK_MAX_AGE_SECONDS`` ago by this process's own clock (a paused process
        answers 503 until its consumer has read again)."""
        return (self.active and self.sync.fresh and self.caught_up
                and self._clock() - self.confirmed_at <= self._settings.max_age_seconds)

    @property
    def book(self) -> OrderBook | None:
        """The book, only while :attr:`serving`."""
        return self.sync.book if self.serving else None

    @property
    def changed(self) -> asyncio.Event:
        """Set (and replaced) at the next change of :attr:`version` or of ``serving``."""
        return self._changed

    def unserved_for(self, now: float) -> float:
        """Seconds since the book was last served (0 while it is)."""
        since = self.unserved_since
        return 0.0 if since is None else max(0.0, now - since)

    def detail(self) -> str:
        """Why the book is not served, for a 503."""
        if not self.active:
            return f"{self.symbol} book is not running on this replica"
        if self.read_refusal is not None:
            return f"{self.symbol} book cannot be kept current: {self.read_refusal}"
        if self.sync.synced and self.sync.stale_reason is not None:
            return f"{self.symbol} book may be stale: {self.sync.stale_reason}"
        if self.sync.synced and not self.caught_up:
            return f"{self.symbol} book is catching up with the stream"
        age = self._clock() - self.confirmed_at
        if self.sync.fresh and age > self._settings.max_age_seconds:
            return (f"{self.symbol} book was last confirmed current {age:.1f} s ago (more than "
                    f"{self._settings.max_age_seconds:g} s): this replica was paused or "
                    "cannot read the stream")
        return (f"{self.symbol} book is not synced ({self.reason or self.sync.state.value}); "
                + self._due_text())

    def _due_text(self) -> str:
        """When the feed expects to fetch the snapshot this book waits for."""
        due = self._due
        if due is None:
            return "no snapshot of it is queued at the feed yet"
        left = max(0, int(due.get("dueInMs", 0)) - (_now_ms() - int(due.get("at", 0))))
        at = time.strftime("%H:%M:%S", time.gmtime((_now_ms() + left) / 1000))
        position, queued = int(due.get("position", 0)), int(due.get("queued", 1))
        budget = due.get("perMin")
        limit = f"; the venue allows {budget:g} a minute" if isinstance(
            budget, int | float) and budget > 0 else ""
        when = f"due in {left / 1000:.0f} s" if left >= 1000 else "due now"
        return (f"the feed's next snapshot of it is {when} (at {at} UTC, "
                f"{position + 1} of {queued} in the queue{limit})")

    def book_body(self, depth: int) -> bytes:
        """``GET /book`` JSON at ``depth`` (call only while :attr:`serving`)."""
        return self._cached("book", depth, self._build_book)

    def ws_body(self, depth: int, *, own: bool = True) -> bytes:
        """The WebSocket push: the ``GET /book`` body plus ``trades`` (recent matches,
        oldest first) and, with ``own``, ``own`` (the user's resting orders with their
        queue position; for the clients :mod:`kumex_l3.access` allows only)."""
        if own:
            return self._cached("ws", depth, self._build_ws)
        return self._cached("ws-public", depth, self._build_ws_public)

    def l3_body(self, depth: int) -> bytes:
        """``GET /book/{symbol}/l3`` JSON at ``depth`` (call only while :attr:`serving`)."""
        return self._cached("l3", depth, self._build_l3)

    def order_body(self, order_id: str) -> bytes | None:
        """``GET /book/{symbol}/orders/{orderId}`` JSON, ``None`` if the order does not rest."""
        book = self.sync.book
        assert book is not None
        pos = book.queue_position(order_id)
        if pos is None:
            return None
        return _ENCODER.encode({
            "orderId": pos.order_id, "side": pos.side, "price": pos.price_text,
            "size": format_qty(pos.size), "ts": pos.ts, "position": pos.position,
            "sizeAhead": format_qty(pos.size_ahead),
        })

    def status_body(self) -> bytes:
        """What WebSocket clients get while the book is not served."""
        return _ENCODER.encode({"symbol": self.symbol, "synced": False, "detail": self.detail()})

    def _cached(self, kind: str, depth: int, build: Callable[[OrderBook, int], bytes]) -> bytes:
        if self._cache_version != self.version:
            self._cache.clear()
            self._cache_version = self.version
        key = (kind, depth)
        body = self._cache.get(key)
        if body is None:
            book = self.sync.book
            assert book is not None
            body = build(book, depth)
            if len(self._cache) < _CACHE_MAX:
                self._cache[key] = body
        return body

    def _build_book(self, book: OrderBook, depth: int) -> bytes:
        bids, asks = book.depth_rows(depth)
        return _ENCODER.encode({"symbol": self.symbol, "sequence": book.sequence, "ts": book.ts,
                                "bids": bids, "asks": asks})

    def _build_ws_public(self, book: OrderBook, depth: int) -> bytes:
        return self._build_ws(book, depth, own=False)

    def _build_ws(self, book: OrderBook, depth: int, *, own: bool = True) -> bytes:
        bids, asks = book.depth_rows(depth)
        mine = []
        for order_id in sorted(self.own_ids) if own else ():
            pos = book.queue_position(order_id)
            if pos is not None:
                mine.append({"orderId": pos.order_id, "side": pos.side, "price": pos.price_text,
                             "size": format_qty(pos.size), "position": pos.position,
                             "sizeAhead": format_qty(pos.size_ahead)})
        trades = [{"price": t.price, "size": t.size, "side": t.side, "ts": t.ts}
                  for t in book.trades]
        body: dict[str, Any] = {"symbol": self.symbol, "sequence": book.sequence, "ts": book.ts,
                                "bids": bids, "asks": asks, "trades": trades}
        if own:
            body["own"] = mine
        return _ENCODER.encode(body)

    def _build_l3(self, book: OrderBook, depth: int) -> bytes:
        bids, asks = book.l3(depth)

        def levels(side: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"price": lv.text, "size": format_qty(lv.size),
                     "orders": [{"orderId": o.order_id, "size": format_qty(o.size), "ts": o.ts}
                                for o in lv.orders]}
                    for lv in side]

        return _ENCODER.encode({"symbol": self.symbol, "sequence": book.sequence, "ts": book.ts,
                                "bids": levels(bids), "asks": levels(asks)})

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """Run the consumer as a task (returned; it ends only when stopped or on a bug)."""
        if self._task is None:
            self.active = True
            self._task = asyncio.create_task(self.run(), name=f"book-{self.symbol}")
        return self._task

    async def stop(self, *, checkpoint: bool = False) -> None:
        """Stop reading; with ``checkpoint``, save a last one if the book is synced."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.active = False
        self._notify()
        if checkpoint:
            # A clean stop, lease still held: save the book and say it is not served here.
            try:
                await self._write_checkpoint()
                await self._write_top(float("inf"))
            except (*REDIS_ERRORS, redis.exceptions.RedisError) as exc:
                log.warning("last checkpoint failed: %s", exc, extra=kv(symbol=self.symbol))
        self._synced_gauge.set(0)

    async def run(self) -> None:
        """Start, then keep the book from the reader's reads and do the upkeep until
        cancelled (or until a read meets a bug: raised here). Redis errors are retried
        with backoff."""
        backoff = Backoff(initial=0.2, factor=2.0, max_delay=5.0)
        self.active = True
        try:
            while not self._started:
                try:
                    await self._start()
                    self._started = True
                except REDIS_ERRORS as exc:
                    await self._retry(backoff, exc)
                except redis.exceptions.ResponseError as exc:
                    # A key of this symbol Redis refuses to work on (a stream key that
                    # holds a string...): say so in the 503s and try again, as for an outage.
                    self.reason = f"Redis refuses an operation on its keys: {exc}"
                    await self._retry(backoff, exc)
            self._reader.add(self)
            self._upkeep.add(self)
            try:
                await self._faulted.wait()
                assert self._fault is not None
                raise self._fault
            finally:
                self._reader.discard(self)
                self._upkeep.discard(self)
        finally:
            self.active = False
            self._notify()

    async def _retry(self, backoff: Backoff, exc: BaseException) -> None:
        delay = backoff.next_delay()
        log.warning("redis error, retrying in %.1f s: %s", delay, exc,
                    extra=kv(symbol=self.symbol))
        await asyncio.sleep(delay)

    def fail(self, exc: BaseException) -> None:
        """The reader or the upkeep met a bug in this consumer: :meth:`run` raises it."""
        self._fault = exc
        self._faulted.set()

    def refused(self, reason: str | None) -> None:
        """The reader says Redis refuses to read the stream (``reason``), or reads it again.

        The book is not confirmed current meanwhile, so it stops being served after
        ``BOOK_MAX_AGE_SECONDS``; its 503 then says why.
        """
        if reason is not None and self.read_refusal is None:
            self._metrics.stream_read_refusals.labels(self.symbol).inc()
        self.read_refusal = reason
        self._notify()

    @property
    def stream(self) -> str:
        """The Redis stream this book is kept from."""
        return self._stream

    # ------------------------------------------------------------------ start

    async def _start(self) -> None:
        # A retried start begins from scratch.
        self.sync = Synchronizer(self.symbol, max_buffer=self._settings.buffer_max,
                                 collect_ts=True)
        self._reported = SyncStats()
        r = self._redis
        settings = self._settings
        async with r.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.checkpoint(self.symbol))
            pipe.get(keys.snapshot(self.symbol))
            checkpoint, snapshot = await pipe.execute()
        info = await self._stream_info()
        snap_seq = None if snapshot is None else peek_snapshot_sequence(snapshot)
        if checkpoint:
            outs = await self._try_checkpoint(checkpoint, snap_seq, info)
            if outs is not None:
                await self._handle(outs)
                return
        if snapshot is not None and snap_seq is not None:
            self.read_id = await self._find_start(snap_seq, settings.scan_max_entries)
            log.info("starting from the stored snapshot",
                     extra=kv(symbol=self.symbol, sequence=snap_seq, streamId=self.read_id))
            outs = self.sync.on_snapshot(snapshot)
            if not self.sync.synced:
                outs += self.sync.start()
            await self._handle(outs)
            return
        self.read_id = await self._lookback_id(settings.lookback_entries)
        log.info("no snapshot or checkpoint: asking the feed",
                 extra=kv(symbol=self.symbol, streamId=self.read_id))
        await self._handle(self.sync.start())

    async def _stream_info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self._redis.xinfo_stream(self._stream)
        except redis.exceptions.ResponseError:
            return None  # no stream yet
        return info

    async def _try_checkpoint(self, checkpoint: Mapping[bytes, bytes], snap_seq: int | None,
                              info: dict[str, Any] | None) -> list[Output] | None:
        try:
            sequence = int(checkpoint[b"sequence"])
            stream_id = _text(checkpoint[b"streamId"])
            parse_stream_id(stream_id)
            state = msgspec.json.decode(checkpoint[b"state"])
        except (KeyError, ValueError, msgspec.DecodeError) as exc:
            log.warning("checkpoint unreadable: %s", exc, extra=kv(symbol=self.symbol))
            return None
        if snap_seq is not None and snap_seq > sequence:
            log.info("stored snapshot is newer than the checkpoint",
                     extra=kv(symbol=self.symbol, checkpoint=sequence, snapshot=snap_seq))
            return None
        if info is not None and _trimmed_after(info, stream_id):
            log.info("checkpoint too old: the stream was trimmed past it",
                     extra=kv(symbol=self.symbol, streamId=stream_id))
            return None
        outs = self.sync.on_checkpoint(state, stream_id)
        if not self.sync.synced:
            return None
        self.read_id = stream_id
        self._cp_mark = (sequence, stream_id)
        self._metrics.checkpoint_restores.labels(self.symbol).inc()
        log.info("starting from the checkpoint",
                 extra=kv(symbol=self.symbol, sequence=sequence, streamId=stream_id))
        return outs

    async def _find_start(self, sequence: int, budget: int) -> str:
        """Id after which reading finds ``sequence + 1``: the newest entry at or below it."""
        end = "+"
        scanned = 0
        oldest: str | None = None
        while scanned < budget:
            chunk: Any = await self._redis.xrevrange(self._stream, end, "-", count=_SCAN_CHUNK)
            if not chunk:
                return "0-0"
            for entry_id, fields in chunk:
                oldest = _text(entry_id)
                raw = fields.get(keys.FIELD_MSG.encode())
                if raw is None:
                    continue
                seq = peek_message_sequence(raw)
                if seq is not None and seq <= sequence:
                    return oldest
            scanned += len(chunk)
            if len(chunk) < _SCAN_CHUNK:
                return "0-0"
            end = f"({oldest}"
        return oldest or "0-0"

    async def _lookback_id(self, entries: int) -> str:
        if entries <= 0:
            newest: Any = await self._redis.xrevrange(self._stream, "+", "-", count=1)
            return _text(newest[0][0]) if newest else "0-0"
        chunk: Any = await self._redis.xrevrange(self._stream, "+", "-", count=entries + 1)
        return _text(chunk[-1][0]) if len(chunk) == entries + 1 else "0-0"

    # ------------------------------------------------------------------ reading

    async def on_read(self, entries: list[Any], issued: float) -> None:
        """The entries after :attr:`read_id` of a read sent at ``issued``."""
        async with self._lock:
            outs = self.sync.on_entries(entries)
            self.read_id = _text(entries[-1][0])
            await self._handle(outs)
        self._observe_receipt(entries)
        # A full batch may have more behind it (a backlog after a pause): only a read that
        # reached the stream's end shows the book current as of when it was sent.
        if len(entries) < self._settings.read_batch:
            self._confirmed_at = issued
            if not self.caught_up:
                self._reached_the_end()

    @property
    def confirmed_at(self) -> float:
        """When (this process's monotonic clock) a stream read last showed the book current:
        its own last read with entries, or the reader's last read of every stream."""
        if self._reader.confirms(self):
            return max(self._confirmed_at, self._reader.last_issued)
        return self._confirmed_at

    def on_nothing_new(self, issued: float) -> None:
        """A read sent at ``issued`` found nothing new: the book is current as of then."""
        self._confirmed_at = issued
        if not self.caught_up:
            self._reached_the_end()

    def _reached_the_end(self) -> None:
        self.caught_up = True
        self._bump()
        if self.sync.synced:
            log.info("book served", extra=kv(symbol=self.symbol, sequence=self._sequence()))

    async def _handle(self, outs: list[Output]) -> None:
        queue = deque(self._absorb(outs))
        while queue:
            out = queue.popleft()
            if isinstance(out, NeedSnapshot):
                more = await self._ask(out.min_sequence, out.reason)
            else:
                more = await self._fetch_snapshot()
            queue.extend(self._absorb(more))
        if self._pending_dlq:
            await self._flush_dlq()

    def _absorb(self, outs: list[Output]) -> list[NeedSnapshot | FetchSnapshot]:
        """Take in what the synchroniser said, without awaiting; return the I/O to do.

        The book changed in the same step as the outputs were made: the version
        is bumped here, before any await, so no body cached for the old version
        is served for the new book.
        """
        self._observe_delays()
        work: list[NeedSnapshot | FetchSnapshot] = []
        changed = False
        # Counters of a batch that only applied messages wait for the upkeep's tick (at
        # most upkeep.UPKEEP_S); anything else is reported at once.
        report = False
        for out in outs:
            if isinstance(out, Applied):
                changed = True
                continue
            report = True
            if isinstance(out, DeadLetter):
                self._pending_dlq.append((out.raw, out.reason, out.stream_id))
                log.warning("message refused: %s", out.reason,
                            extra=kv(symbol=self.symbol, streamId=out.stream_id))
            elif isinstance(out, BecameSynced):
                changed = True
                self.reason = None
                log.info("book synced", extra=kv(symbol=self.symbol, sequence=out.sequence))
            elif isinstance(out, BecameStale):
                changed = True
                self.reason = out.reason
                log.warning("book not served: %s", out.reason, extra=kv(symbol=self.symbol))
            elif isinstance(out, BecameUnsynced):
                changed = True
                self.reason = out.reason
                log.warning("book not synced: %s", out.reason, extra=kv(symbol=self.symbol))
            else:
                if isinstance(out, NeedSnapshot) and not self.sync.synced:
                    self.reason = out.reason
                work.append(out)
        if changed:
            self._bump()
        if report:
            self.report_stats()
        return work

    def _observe_delays(self) -> None:
        """Exchange ``ts`` to now, for the messages the synchroniser just applied.

        All of them when few; of a big batch (a backlog being read), every
        k-th, so that at most ``_DELAY_SAMPLES`` are observed: the histogram
        then under-weights big batches, which is fine for a steady flow.
        """
        stamps = self.sync.applied_ts
        if not stamps:
            return
        now = time.time_ns()
        step = -(-len(stamps) // _DELAY_SAMPLES)
        observe = self._apply_delay.observe
        for ts in stamps[::step] if step > 1 else stamps:
            observe(max(0, now - ts) / 1e9)
        stamps.clear()

    def _observe_receipt(self, entries: list[Any]) -> None:
        """Stream entry id (the feed's append, Redis's clock in ms) to now, sampled as
        :meth:`_observe_delays` does."""
        now_ms = time.time_ns() / 1e6
        step = -(-len(entries) // _DELAY_SAMPLES)
        observe = self._receipt_delay.observe
        for entry_id, _ in entries[::step] if step > 1 else entries:
            raw = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
            observe(max(0.0, now_ms - int(raw[:raw.index(b"-")])) / 1000)

    async def _ask(self, min_sequence: int, reason: str, *, force: bool = False) -> list[Output]:
        now = self._clock()
        if not force and min_sequence <= self._request_min and (
                now - self._request_at < self._settings.snapshot_retry_seconds):
            return []
        # The stored one may already do (another consumer asked, or the feed refreshed).
        outs = await self._fetch_snapshot()
        if outs:
            return outs
        await self._redis.publish(keys.snapshot_requests(self.symbol), str(min_sequence))
        self._metrics.snapshot_requests.labels(self.symbol).inc()
        self._request_at = now
        self._request_min = max(self._request_min, min_sequence)
        log.info("asked the feed for a snapshot: %s", reason,
                 extra=kv(symbol=self.symbol, minSequence=min_sequence))
        return []

    async def _fetch_snapshot(self) -> list[Output]:
        needed = self.sync.needed_sequence
        if needed is None:
            return []
        raw = await self._redis.get(keys.snapshot(self.symbol))
        if raw is None:
            return []
        seq = peek_snapshot_sequence(raw)
        if seq is None:
            log.warning("stored snapshot is unreadable", extra=kv(symbol=self.symbol))
            return []
        # Too old, or already tried and refused (what we need only grows while waiting).
        if seq < needed or seq <= self._tried_sequence:
            return []
        log.info("rebuilding from the stored snapshot",
                 extra=kv(symbol=self.symbol, sequence=seq, needed=needed))
        outs = self.sync.on_snapshot(raw)
        if not self.sync.synced:
            self._tried_sequence = seq
        return outs

    async def _heard(self, key: str, connection: str | None) -> None:
        sync = self.sync
        if sync.fresh:
            if connection is not None:
                if connection != self._feed_connection:
                    log.info("following the feed's connection", extra=kv(
                        symbol=self.symbol, connectId=connection))
                self._feed_connection, self._feed_missing = connection, False
            elif self._feed_missing:
                await self._handle(sync.on_feed_silent(
                    f"no heartbeat from the feed ({key} lapsed): it is stopped, or cut off "
                    "from the exchange or from Redis"))
            else:
                self._feed_missing = True
        else:
            self._feed_missing = False
            if connection is None or connection != self._feed_connection:
                return
            log.info("the feed's heartbeat is back, same connection",
                     extra=kv(symbol=self.symbol, connectId=connection))
            await self._handle(sync.on_feed_heard())

    async def _flush_dlq(self) -> None:
        # The read path and the upkeep both flush: one at a time (stream order), and
        # each entry taken out before the await so that it is written once. Put back
        # (first) if the write fails.
        async with self._dlq_lock:
            taken = list(self._pending_dlq)
            self._pending_dlq.clear()
            if not taken:
                return
            key = keys.dlq(self.symbol)
            maxlen = self._settings.dlq_maxlen
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for raw, reason, stream_id in taken:
                        pipe.xadd(key, {"reason": reason, "raw": raw, "streamId": stream_id},
                                  maxlen=maxlen, approximate=True)
                    await pipe.execute()
            except BaseException:
                self._pending_dlq.extendleft(reversed(taken))
                raise

    # ------------------------------------------------------------------ housekeeping

    # The replica's one Upkeep (services.book.upkeep) calls the next four every tick.

    def needs_attention(self, now: float) -> bool:
        """Whether this book's own, rare upkeep is due: a dead letter left over by a failed
        write, a snapshot awaited, a checkpoint."""
        sync = self.sync
        if self._pending_dlq:
            return True
        if not sync.synced:
            return (now - self._due_at >= _DUE_INTERVAL
                    or now - self._request_at >= self._settings.snapshot_retry_seconds)
        return self._checkpoint_due(now)

    async def attend(self, now: float) -> None:
        """This book's own, rare upkeep (see :meth:`needs_attention`)."""
        sync = self.sync
        if self._pending_dlq:
            await self._flush_dlq()
        if not sync.synced and now - self._due_at >= _DUE_INTERVAL:
            self._due_at = now
            self._due = _due_of(await self._redis.get(keys.snapshot_due(self.symbol)))
        if not sync.synced and now - self._request_at >= self._settings.snapshot_retry_seconds:
            async with self._lock:
                needed = self.sync.needed_sequence
                if needed is not None and not self.sync.synced:
                    await self._handle(await self._ask(needed, "still waiting for a snapshot",
                                                       force=True))
        if sync.synced and self._checkpoint_due(now):
            await self._write_checkpoint()

    def queue_upkeep(self, now: float, pipe: Any, handlers: list[Handler]) -> None:
        """Queue the routine reads and writes that are due on the replica's pipeline: the
        feed's heartbeat, the ``top`` hash, the lag, the user's active orders."""
        sync = self.sync
        check = self._settings.feed_check_seconds
        if (check > 0 and (sync.fresh or sync.feed_silent)
                and now - self._feed_checked_at >= check):
            self._feed_checked_at = now
            pipe.get(keys.feed_alive(self.symbol))
            handlers.append(self._feed_reply)
        top = self._top_due(now)
        if top is not None:
            pipe.hset(keys.top(self.symbol), mapping=_top_mapping(top))
            handlers.append(functools.partial(self._top_written, top, self.version, now))
        if now - self._lag_at >= _LAG_INTERVAL:
            self._lag_at = now
            # The newest entry only: 20 of them for 100 books was 600 KB a second to parse.
            # When it is a control entry, the lag in messages waits for the next second.
            pipe.xrevrange(self._stream, "+", "-", count=1)
            handlers.append(self._lag_reply)
        if now - self._own_at >= _OWN_INTERVAL:
            self._own_at = now
            pipe.smembers(keys.orders_active(self.symbol))
            handlers.append(self._own_reply)

    async def _feed_reply(self, raw: Any) -> None:
        """Watch the feed's heartbeat: a feed gone without a word makes the book stale.

        Missing at two checks in a row (one could fall between a feed's start and
        its first heartbeat): the book stops serving as fresh. Back with the
        connection it had while the book was served: that connection never
        broke, so the book is current again without waiting for a message.
        """
        async with self._lock:
            await self._heard(keys.feed_alive(self.symbol), _heartbeat_connection(raw))

    async def _own_reply(self, coids: Any) -> None:
        """Which resting orders are the user's: active clientOids -> their orderIds."""
        ids: set[str] = set()
        if coids:
            async with self._redis.pipeline(transaction=False) as pipe:
                for coid in coids:
                    pipe.hget(keys.order(self.symbol, _text(coid)), "orderId")
                ids = {_text(v) for v in await pipe.execute() if v}
        own = frozenset(ids)
        if own != self.own_ids:
            self.own_ids = own
            self._bump()

    def _sequence(self) -> int:
        book = self.sync.book
        if book is not None and self.sync.synced:
            self._last_sequence = book.sequence
        return self._last_sequence

    def _checkpoint_due(self, now: float) -> bool:
        book = self.sync.book
        # Not while stale: a restart must read the ctl=disconnected entry again.
        if book is None or not self.sync.fresh or (book.sequence, self.read_id) == self._cp_mark:
            return False
        return (self.sync.stats.applied - self._cp_applied >= self._settings.checkpoint_messages
                or now - self._cp_at >= self._settings.checkpoint_seconds)

    async def _write_checkpoint(self) -> None:
        book = self.sync.book
        if book is None or not self.sync.fresh:
            return
        mark = (book.sequence, self.read_id)
        state = _ENCODER.encode(book.to_state())
        await self._redis.hset(keys.checkpoint(self.symbol), mapping={
            "state": state, "sequence": str(book.sequence), "streamId": self.read_id,
            "updatedAt": str(_now_ms()),
        })
        self._cp_mark = mark
        self._cp_at = self._clock()
        self._cp_applied = self.sync.stats.applied
        self._metrics.checkpoints.labels(self.symbol).inc()

    def _top_due(self, now: float) -> _TopState | None:
        """The ``top`` state to write now, if any: when the best prices or the served state
        changed (at most 10 times a second), and once a second whatever changed (the
        sequence alone moves on every message: writing it at 10 Hz for each of a hundred
        books was most of a replica's upkeep)."""
        since = now - self._top_at
        if since < _TOP_MIN_INTERVAL or (self.version == self._top_version
                                         and since < _TOP_HEARTBEAT):
            return None
        book = self.book
        state = (book is not None, self._sequence(),
                 (book.best_bid_text() or "") if book is not None else "",
                 (book.best_ask_text() or "") if book is not None else "")
        last = self._top_state
        if since < _TOP_HEARTBEAT and last is not None and (
                state[0], state[2], state[3]) == (last[0], last[2], last[3]):
            return None
        return state

    async def _top_written(self, state: _TopState, version: int, now: float, _: Any) -> None:
        self._top_state, self._top_version, self._top_at = state, version, now

    async def _write_top(self, now: float) -> None:
        """Write the ``top`` hash at once (a stopping consumer says it is not served)."""
        state = self._top_due(now)
        if state is not None:
            await self._redis.hset(keys.top(self.symbol), mapping=_top_mapping(state))
            await self._top_written(state, self.version, now, None)

    async def _lag_reply(self, newest: Any) -> None:
        lag_ms = 0
        if newest and parse_stream_id(_text(newest[0][0])) > parse_stream_id(self.read_id):
            lag_ms = max(0, _now_ms() - parse_stream_id(self.read_id)[0])
        self._metrics.lag_ms.labels(self.symbol).set(lag_ms)
        for _, fields in newest:
            raw = fields.get(keys.FIELD_MSG.encode())
            seq = None if raw is None else peek_message_sequence(raw)
            if seq is not None:
                base = self.sync.book.sequence if (
                    self.sync.synced and self.sync.book is not None) else self.sync.max_sequence
                self._metrics.lag_messages.labels(self.symbol).set(max(0, seq - base))
                break

    def report_stats(self) -> None:
        now = self.sync.stats
        if now != self._reported:
            self._add_stats(now, self._reported)
            self._reported = replace(now)
        gauges = (1 if self.serving else 0, self._sequence())
        if gauges != self._gauges:  # most books of a replica are quiet most ticks
            self._gauges = gauges
            self._synced_gauge.set(gauges[0])
            self._sequence_gauge.set(gauges[1])

    def _bump(self) -> None:
        self.version += 1
        self._notify()

    def _notify(self) -> None:
        if self.serving:
            self.served_once = True
            self.unserved_since = None
        elif self.unserved_since is None:
            self.unserved_since = self._clock()
        event, self._changed = self._changed, asyncio.Event()
        event.set()
