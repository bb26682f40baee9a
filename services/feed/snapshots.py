"""L3 snapshots: one scheduler for the venue's shared budget, validated, stored through the writer.

The venue allows few L3 snapshots (the real one: 1 a minute per IP, all
symbols together), so exactly one feed process fetches them: the holder of
the scheduler lease (:func:`kumex_l3.keys.feed_scheduler`;
:meth:`Snapshotter.activate` / :meth:`Snapshotter.deactivate`). Every feed
listens to the requests, so a standby taking the lease over already knows
what is waiting.

Requests come on each symbol's pub/sub channel
(:func:`kumex_l3.keys.snapshot_requests`; payload: the smallest ``sequence``
the requester can use, ``0`` for any fresh one, optionally followed by a
space and a one-word reason, :func:`request_payload`), from the book after a
gap and from the feed at each session start. The decisions are
:class:`~services.feed.schedule.SnapshotQueue`'s: one queue for all symbols,
coalesced per symbol, the longest-waiting first, a ``429`` retried after the
venue's ``Retry-After`` (not a whole budget period). A request whose minimum
the last stored snapshot already meets is answered at once with a new
``ctl=snapshot`` entry, without spending budget. A snapshot whose
``sequence`` is below the request's minimum is stored anyway (it is the
newest) and the request goes to the back of the queue, at most
:data:`~services.feed.schedule.MAX_ATTEMPTS` fetches.

The wait is visible: ``kumex_feed_snapshot_due_seconds{symbol}`` and the key
:func:`kumex_l3.keys.snapshot_due` (the book quotes it in its 503 ``detail``),
refreshed every second while a symbol waits.

Each valid snapshot is checked with :func:`~kumex_l3.parse_snapshot` and its
``data`` JSON, byte for byte as the exchange returned it, goes to the writer:
``SET kumex:{SYM}:snapshot`` (unless a newer one is stored), then
``ctl=snapshot sequence=<n>`` on the stream. A snapshot that does not parse
(or is for another symbol) goes to ``kumex:{SYM}:dlq`` with its reason, and is
retried after a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import httpx
import msgspec
import redis.asyncio
import redis.exceptions

from kumex_l3 import MessageError, keys, parse_snapshot
from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from services.feed.metrics import FeedMetrics
from services.feed.schedule import MAX_ATTEMPTS, Request, SnapshotQueue, TokenBucket
from services.feed.writer import StreamWriter

__all__ = ["MAX_ATTEMPTS", "SNAPSHOT_PATH", "Snapshotter", "TokenBucket", "parse_request",
           "request_payload"]

_log = logging.getLogger(__name__)

SNAPSHOT_PATH: Final = "/api/v2/level3/snapshot"
_OK_CODE: Final = "200000"
_PUBSUB_POLL_S: Final = 1.0
_RETRY_AFTER_MAX_S: Final = 300.0
#: A 429 without a usable ``Retry-After``: wait this long (the budget's own clock decides
#: after it).
_RETRY_AFTER_DEFAULT_S: Final = 1.0
#: How often the due times are published while symbols wait.
_DUE_EVERY_S: Final = 1.0
#: Longest sleep of the worker before it looks at the queue again.
_TICK_S: Final = 1.0
_REASON: Final = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_STORED_SEQUENCE: Final = re.compile(rb'"sequence"\s*:\s*(\d{1,20})')


def _stored_sequence(head: Any) -> int | None:
    """The ``sequence`` of a stored snapshot, from the head of its key (``GETRANGE``)."""
    raw = head if isinstance(head, bytes) else str(head or "").encode()
    found = _STORED_SEQUENCE.search(raw)
    return int(found.group(1)) if found is not None else None


def request_payload(min_sequence: int, reason: str = "") -> str:
    """The channel payload asking for a snapshot at ``min_sequence`` or later."""
    return f"{min_sequence} {reason}" if reason else str(min_sequence)


def parse_request(payload: bytes | str) -> tuple[int, str] | None:
    """``(minimum sequence, reason)`` of a request payload; ``None`` when malformed.

    ``""`` is ``(0, "")``; ``"123"`` is ``(123, "")``; ``"123 gap"`` is ``(123, "gap")``.
    """
    text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
    number, _, reason = text.strip().partition(" ")
    if number == "":
        return 0, ""
    if not (number.isdigit() and number.isascii() and len(number) <= 20):
        return None
    reason = reason.strip()
    if reason and not _REASON.fullmatch(reason):
        return None
    return int(number), reason


def _retry_after(header: str | None) -> float:
    """Seconds of a ``Retry-After`` header (delta form), capped; a default when absent or odd."""
    if header is None:
        return _RETRY_AFTER_DEFAULT_S
    try:
        seconds = float(header)
    except ValueError:
        return _RETRY_AFTER_DEFAULT_S
    if seconds != seconds:  # NaN
        return _RETRY_AFTER_DEFAULT_S
    return min(max(seconds, 0.0), _RETRY_AFTER_MAX_S)


class _Reply(msgspec.Struct):
    code: str | int
    data: msgspec.Raw = msgspec.Raw(b"null")
    msg: str | None = None


class Snapshotter:
    """Serves snapshot requests for ``symbols`` within ``per_min`` (see the module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        symbols: Sequence[str],
        writer: StreamWriter,
        metrics: FeedMetrics,
        *,
        per_min: float,
        backoff: Callable[[], Backoff],
        clock: Callable[[], float] = time.monotonic,
        active: bool = False,
        burst: float | None = None,
    ) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + SNAPSHOT_PATH
        self.symbols = tuple(symbols)
        self._writer = writer
        self._metrics = metrics
        self._clock = clock
        self.queue = SnapshotQueue(per_min, clock(), burst)
        self._backoff = backoff()
        self._new_backoff = backoff
        self._wake = asyncio.Event()
        #: Set while this feed is the scheduler (holds the lease).
        self.active = asyncio.Event()
        if active:
            self.active.set()
        #: Sequence of the last snapshot stored, per symbol (as far as this feed knows).
        self.stored: dict[str, int] = {}
        self._published: set[str] = set()

    @property
    def bucket(self) -> TokenBucket:
        return self.queue.bucket

    @property
    def pending(self) -> dict[str, int]:
        """Symbol -> minimum sequence of the requests waiting."""
        return {r.symbol: r.min_sequence for r in self.queue.requests}

    def request(self, symbol: str, min_sequence: int = 0, reason: str = "request") -> None:
        """Ask for a snapshot of ``symbol`` with ``sequence >= min_sequence`` (coalesced)."""
        if symbol not in self.symbols:
            return
        self.queue.request(symbol, min_sequence, reason or "request", self._clock())
        self._wake.set()

    async def activate(self, client: redis.asyncio.Redis) -> None:
        """This feed is the scheduler now: learn what is stored, then serve the queue."""
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            async with client.pipeline(transaction=False) as pipe:
                for symbol in self.symbols:
                    pipe.getrange(keys.snapshot(symbol), 0, 4095)
                heads: list[Any] = await pipe.execute()
            for symbol, head in zip(self.symbols, heads, strict=True):
                sequence = _stored_sequence(head)
                if sequence is not None:
                    self.stored[symbol] = max(self.stored.get(symbol, 0), sequence)
        self.active.set()
        self._metrics.scheduler.set(1)
        self._wake.set()
        _log.info("scheduling the snapshots of every symbol",
                  extra=kv(symbols=",".join(self.symbols), queued=len(self.queue),
                           per_min=self.bucket.per_min))

    def deactivate(self) -> None:
        """Another feed is the scheduler now: keep listening, fetch nothing."""
        if self.active.is_set():
            _log.info("not scheduling snapshots any more")
        self.active.clear()
        self._metrics.scheduler.set(0)

    # -- the worker ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve pending requests forever, while active (cancel to stop)."""
        queue = self.queue
        while True:
            if not self.active.is_set():
                await self.active.wait()
                continue
            if not len(queue):
                await self._sleep(None)
                continue
            first = queue.requests[0]
            stored = self.stored.get(first.symbol)
            if first.min_sequence > 0 and stored is not None and stored >= first.min_sequence:
                held = await self._held(first.symbol)
                if held is not None and held >= first.min_sequence:
                    # What we stored already answers it: say so again, spend nothing.
                    queue.drop(first.symbol)
                    self._writer.announce(first.symbol, held)
                    continue
                # Our memory outlived Redis's copy (a restart without persistence, the
                # key deleted): answering from memory would announce a snapshot nobody
                # can read, again and again. Fetch it.
                _log.info("the snapshot stored earlier is not in Redis: fetching again",
                          extra=kv(symbol=first.symbol, remembered=stored, held=held))
                del self.stored[first.symbol]
            # No point in fetching what cannot be stored: wait for Redis first.
            if not self._writer.redis_ok.is_set():
                await self._writer.redis_ok.wait()
                continue
            request, wait = queue.next(self._clock())
            if request is None:
                continue
            if wait > 0:
                _log.debug("snapshot budget spent; waiting", extra=kv(
                    symbol=request.symbol, wait=f"{wait:.1f}s", queued=len(queue)))
                await self._sleep(wait)
                continue
            await self._fetch(request)
            queue.bucket.settle(self._clock())

    async def _held(self, symbol: str) -> int | None:
        """The sequence of ``symbol``'s snapshot in Redis now (``None``: none there, or
        Redis did not answer)."""
        try:
            head = await self._writer.client.getrange(keys.snapshot(symbol), 0, 4095)
        except (redis.exceptions.RedisError, OSError):
            return None
        return _stored_sequence(head)

    async def _sleep(self, seconds: float | None) -> None:
        """Until woken (a new request) or ``seconds`` (at most a tick) have passed."""
        self._wake.clear()
        timeout = _TICK_S if seconds is None else min(seconds, _TICK_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _fetch(self, request: Request) -> None:
        """One fetch for ``request``; the queue learns how it went."""
        symbol, queue = request.symbol, self.queue
        try:
            reply = await self._http.get(self._url, params={"symbol": symbol})
        except httpx.HTTPError as exc:
            self._failed(request, "http_error", f"{type(exc).__name__}: {exc}")
            return
        if reply.status_code == 429:
            retry = _retry_after(reply.headers.get("Retry-After"))
            queue.rate_limited(self._clock(), retry)
            self._refused(symbol, "rate_limited", f"HTTP 429, retry after {retry:g}s")
            return
        try:
            envelope = msgspec.json.decode(reply.content, type=_Reply)
        except (msgspec.DecodeError, RecursionError):
            envelope = None
        if reply.status_code != 200 or envelope is None or str(envelope.code) != _OK_CODE:
            detail = (f"code {envelope.code}: {(envelope.msg or '')[:200]}"
                      if envelope is not None else "not an API envelope")
            if 400 <= reply.status_code < 500:
                # Asking again will not help (bad symbol...): drop the request.
                queue.drop(symbol)
                self._refused(symbol, "error_reply", f"HTTP {reply.status_code}: {detail}")
                return
            self._failed(request, "error_reply", f"HTTP {reply.status_code}: {detail}")
            return
        raw = bytes(envelope.data)
        try:
            snap = parse_snapshot(raw)
            if snap.symbol != symbol:
                raise MessageError(f"snapshot is for {snap.symbol!r}, asked {symbol!r}")
        except MessageError as exc:
            self._writer.dead_letter(symbol, f"snapshot: {exc.reason}", raw)
            self._failed(request, "invalid", exc.reason)
            return
        self._backoff.reset()
        self._writer.snapshot(symbol, raw, snap.sequence)
        self.stored[symbol] = max(self.stored.get(symbol, 0), snap.sequence)
        self._metrics.snapshots_fetched.labels(symbol).inc()
        bids, asks = len(snap.bids), len(snap.asks)
        waited = self._clock() - request.since
        if snap.sequence >= request.min_sequence:
            queue.drop(symbol)
            _log.info("snapshot stored", extra=kv(
                symbol=symbol, sequence=snap.sequence, bids=bids, asks=asks,
                reason=request.reason, waited=f"{waited:.1f}s", queued=len(queue)))
        elif request.attempts >= MAX_ATTEMPTS:
            queue.drop(symbol)
            _log.warning("snapshot stays below the sequence asked; giving up",
                         extra=kv(symbol=symbol, sequence=snap.sequence,
                                  wanted=request.min_sequence, attempts=request.attempts))
        else:
            queue.requeue(symbol, self._clock())
            _log.info("snapshot stored, older than asked; will fetch again",
                      extra=kv(symbol=symbol, sequence=snap.sequence,
                               wanted=request.min_sequence))

    def _failed(self, request: Request, reason: str, detail: str) -> None:
        self._refused(request.symbol, reason, detail)
        now = self._clock()
        self.queue.back_off(now, self._backoff.next_delay())
        self.queue.requeue(request.symbol, now)

    def _refused(self, symbol: str, reason: str, detail: str) -> None:
        self._metrics.snapshots_refused.labels(symbol, reason).inc()
        _log.warning("snapshot fetch failed", extra=kv(symbol=symbol, reason=reason,
                                                       detail=detail[:300]))

    # -- the wait, made visible ----------------------------------------------------------

    async def publish_due(self, connect: Callable[[], redis.asyncio.Redis]) -> None:
        """Every second while active: each waiting symbol's due time to Redis and metrics."""
        client = connect()
        try:
            while True:
                await asyncio.sleep(_DUE_EVERY_S)
                try:
                    await self._publish_due(client)
                except (redis.exceptions.RedisError, OSError) as exc:
                    self._metrics.redis_errors.labels("due").inc()
                    _log.debug("snapshot due times not published: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _publish_due(self, client: redis.asyncio.Redis) -> None:
        now = self._clock()
        metrics = self._metrics
        due = self.queue.due(now) if self.active.is_set() else {}
        metrics.snapshot_queue.set(len(due))
        for symbol in self.symbols:
            request = self.queue.get(symbol)
            metrics.snapshot_waiting.labels(symbol).set(
                now - request.since if request is not None and symbol in due else 0.0)
            metrics.snapshot_due.labels(symbol).set(due.get(symbol, 0.0))
        gone = self._published - due.keys()
        if not due and not gone:
            return
        wall = time.time_ns() // 1_000_000
        queued = len(due)
        async with client.pipeline(transaction=False) as pipe:
            for position, (symbol, seconds) in enumerate(sorted(due.items(),
                                                                key=lambda kv_: kv_[1])):
                pipe.set(keys.snapshot_due(symbol), msgspec.json.encode({
                    "dueInMs": int(seconds * 1000), "at": wall, "position": position,
                    "queued": queued, "perMin": self.bucket.per_min}),
                    px=int(_DUE_EVERY_S * 3000))
            for symbol in gone:
                pipe.delete(keys.snapshot_due(symbol))
            await pipe.execute()
        self._published = set(due)

    # -- the pub/sub listener ------------------------------------------------------------

    async def listen(self, connect: Callable[[], redis.asyncio.Redis]) -> None:
        """Read requests from every symbol's pub/sub channel forever, reconnecting on errors.

        ``connect`` makes a fresh client (one connection, closed here).
        """
        channels = {keys.snapshot_requests(s): s for s in self.symbols}
        backoff = self._new_backoff()
        while True:
            client = connect()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(*channels)
                _log.info("listening for snapshot requests", extra=kv(channels=len(channels)))
                backoff.reset()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=_PUBSUB_POLL_S)
                    if message is not None and message.get("type") == "message":
                        self._on_request(channels, message.get("channel"), message.get("data"))
            except (redis.exceptions.RedisError, OSError) as exc:
                self._metrics.redis_errors.labels("pubsub").inc()
                delay = backoff.next_delay()
                _log.warning("snapshot request channel lost; resubscribing", extra=kv(
                    error=f"{type(exc).__name__}: {str(exc)[:200]}", retry_in=f"{delay:.2f}s"))
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.reset()
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _on_request(self, channels: dict[str, str], channel: object, data: object) -> None:
        name = channel.decode(errors="replace") if isinstance(channel, bytes) else str(channel)
        symbol = channels.get(name)
        if symbol is None:
            return
        payload = data if isinstance(data, bytes | str) else b""
        parsed = parse_request(payload)
        self._metrics.snapshot_requests.labels(symbol).inc()
        if parsed is None:
            _log.warning("snapshot request with a malformed payload: treated as 0",
                         extra=kv(symbol=symbol, payload=repr(payload)[:60]))
            parsed = (0, "")
        min_sequence, reason = parsed
        log = _log.info if self.active.is_set() else _log.debug
        log("snapshot requested", extra=kv(symbol=symbol, min_sequence=min_sequence,
                                           reason=reason or "consumer"))
        self.request(symbol, min_sequence, reason=reason or "consumer")
