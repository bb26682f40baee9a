"""L3 snapshots: fetched within the venue's budget, validated, stored through the writer.

The feed is the one process that knows the snapshot budget (the real venue
allows 1 request a minute per client). Snapshots are wanted:

* for every symbol on start and after every reconnect (:meth:`Snapshotter.request`);
* when a consumer asks on the pub/sub channel ``keys.snapshot_requests(SYM)``,
  payload = the smallest ``sequence`` it can use (``0``: any fresh one)
  (:meth:`Snapshotter.listen`).

Requests are coalesced per symbol (one pending request per symbol, wanting the
largest sequence asked) and served in arrival order as the :class:`TokenBucket`
allows; a request whose minimum the last stored snapshot already meets is
answered at once with a new ``ctl=snapshot`` entry, without spending budget.
A ``429`` empties the bucket and backs off (at least its ``Retry-After``). A
snapshot whose ``sequence`` is below the request's minimum is stored anyway (it
is the newest) and the request stays pending, at most :data:`MAX_ATTEMPTS`
fetches.

Each valid snapshot is checked with :func:`~kumex_l3.parse_snapshot` and its
``data`` JSON, byte for byte as the exchange returned it, goes to the writer:
``SET kumex:{SYM}:snapshot``, then ``ctl=snapshot sequence=<n>`` on the stream.
A snapshot that does not parse (or is for another symbol) goes to
``kumex:{SYM}:dlq`` with its reason, and is retried after a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final

import httpx
import msgspec
import redis.asyncio
import redis.exceptions

from kumex_l3 import MessageError, keys, parse_snapshot
from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from services.feed.metrics import FeedMetrics
from services.feed.writer import StreamWriter

__all__ = ["MAX_ATTEMPTS", "SNAPSHOT_PATH", "Snapshotter", "TokenBucket", "parse_request"]

_log = logging.getLogger(__name__)

SNAPSHOT_PATH: Final = "/api/v2/level3/snapshot"
#: Fetches for one request whose snapshots stay below its minimum sequence.
MAX_ATTEMPTS: Final = 3
_OK_CODE: Final = "200000"
_PUBSUB_POLL_S: Final = 1.0
_RETRY_AFTER_MAX_S: Final = 300.0


class TokenBucket:
    """``per_min`` tokens a minute, at most ``burst`` saved up (pure: time is an argument).

    ``per_min == 0`` means unlimited. Starts full.
    """

    def __init__(self, per_min: float, now: float, burst: float | None = None) -> None:
        if per_min < 0:
            raise ValueError("per_min must be >= 0")
        self.per_min = per_min
        self.capacity = burst if burst is not None else max(1.0, per_min)
        self._tokens = self.capacity
        self._at = now

    @property
    def unlimited(self) -> bool:
        return self.per_min == 0

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.capacity,
                               self._tokens + (now - self._at) * self.per_min / 60.0)
        self._at = max(self._at, now)

    def take(self, now: float) -> float:
        """Take a token: ``0.0`` when taken, else the seconds until one is available."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) * 60.0 / self.per_min

    def empty(self, now: float) -> None:
        """Spend every saved token (the venue said 429: our idea of the budget was wrong)."""
        self._refill(now)
        self._tokens = 0.0


def parse_request(payload: bytes | str) -> int | None:
    """The minimum sequence of a request payload (``0`` = any); ``None`` when malformed."""
    text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
    text = text.strip()
    if text == "":
        return 0
    if text.isdigit() and text.isascii():
        return int(text)
    return None


def _retry_after(header: str | None) -> float:
    """Seconds of a ``Retry-After`` header (delta form), capped; 0 when absent or odd."""
    if header is None:
        return 0.0
    try:
        seconds = float(header)
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), _RETRY_AFTER_MAX_S)


class _Reply(msgspec.Struct):
    code: str | int
    data: msgspec.Raw = msgspec.Raw(b"null")
    msg: str | None = None


class _Pending:
    __slots__ = ("attempts", "min_sequence", "reason")

    def __init__(self, min_sequence: int, reason: str) -> None:
        self.min_sequence = min_sequence
        self.reason = reason
        self.attempts = 0


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
    ) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + SNAPSHOT_PATH
        self.symbols = tuple(symbols)
        self._writer = writer
        self._metrics = metrics
        self._clock = clock
        self.bucket = TokenBucket(per_min, clock())
        self._backoff = backoff()
        self._new_backoff = backoff
        self._pending: dict[str, _Pending] = {}  # insertion order = service order
        self._wake = asyncio.Event()
        self._retry_after = 0.0  # what the venue's last 429 asked for
        #: Sequence of the last snapshot handed to the writer, per symbol.
        self.stored: dict[str, int] = {}

    @property
    def pending(self) -> dict[str, int]:
        """Symbol -> minimum sequence of the requests waiting."""
        return {s: p.min_sequence for s, p in self._pending.items()}

    def request(self, symbol: str, min_sequence: int = 0, reason: str = "request") -> None:
        """Ask for a snapshot of ``symbol`` with ``sequence >= min_sequence`` (coalesced)."""
        if symbol not in self.symbols:
            return
        pending = self._pending.get(symbol)
        if pending is None:
            self._pending[symbol] = _Pending(min_sequence, reason)
        else:
            pending.min_sequence = max(pending.min_sequence, min_sequence)
            pending.attempts = 0
        self._wake.set()

    # -- the worker ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve pending requests forever (cancel to stop)."""
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            symbol, pending = next(iter(self._pending.items()))
            stored = self.stored.get(symbol)
            if pending.min_sequence > 0 and stored is not None and \
                    stored >= pending.min_sequence:
                # What we stored already answers it: say so again, spend nothing.
                del self._pending[symbol]
                self._writer.control(symbol, "snapshot", sequence=str(stored))
                continue
            # No point in fetching what cannot be stored: wait for Redis first.
            await self._writer.redis_ok.wait()
            wait = self.bucket.take(self._clock())
            if wait > 0:
                _log.debug("snapshot budget spent; waiting", extra=kv(symbol=symbol,
                                                                      wait=f"{wait:.1f}s"))
                await asyncio.sleep(wait)
                continue
            self._retry_after = 0.0
            if await self._fetch(symbol, pending):
                self._backoff.reset()
            else:
                await asyncio.sleep(max(self._backoff.next_delay(), self._retry_after))

    async def _fetch(self, symbol: str, pending: _Pending) -> bool:
        """One fetch for ``symbol``: whether it went well (no backoff needed)."""
        pending.attempts += 1
        try:
            reply = await self._http.get(self._url, params={"symbol": symbol})
        except httpx.HTTPError as exc:
            self._refused(symbol, "http_error", f"{type(exc).__name__}: {exc}")
            return False
        if reply.status_code == 429:
            self.bucket.empty(self._clock())
            self._retry_after = _retry_after(reply.headers.get("Retry-After"))
            self._refused(symbol, "rate_limited",
                          f"HTTP 429, retry after {self._retry_after:g}s")
            return False
        try:
            envelope = msgspec.json.decode(reply.content, type=_Reply)
        except (msgspec.DecodeError, RecursionError):
            envelope = None
        if reply.status_code != 200 or envelope is None or str(envelope.code) != _OK_CODE:
            detail = (f"code {envelope.code}: {(envelope.msg or '')[:200]}"
                      if envelope is not None else "not an API envelope")
            self._refused(symbol, "error_reply", f"HTTP {reply.status_code}: {detail}")
            if 400 <= reply.status_code < 500:
                # Asking again will not help (bad symbol...): drop the request.
                self._pending.pop(symbol, None)
            return False
        raw = bytes(envelope.data)
        try:
            snap = parse_snapshot(raw)
            if snap.symbol != symbol:
                raise MessageError(f"snapshot is for {snap.symbol!r}, asked {symbol!r}")
        except MessageError as exc:
            self._writer.dead_letter(symbol, f"snapshot: {exc.reason}", raw)
            self._refused(symbol, "invalid", exc.reason)
            return False
        self._writer.snapshot(symbol, raw, snap.sequence)
        self.stored[symbol] = snap.sequence
        self._metrics.snapshots_fetched.labels(symbol).inc()
        bids, asks = len(snap.bids), len(snap.asks)
        if snap.sequence >= pending.min_sequence:
            self._pending.pop(symbol, None)
            _log.info("snapshot stored", extra=kv(symbol=symbol, sequence=snap.sequence,
                                                  bids=bids, asks=asks, reason=pending.reason))
        elif pending.attempts >= MAX_ATTEMPTS:
            self._pending.pop(symbol, None)
            _log.warning("snapshot stays below the sequence asked; giving up",
                         extra=kv(symbol=symbol, sequence=snap.sequence,
                                  wanted=pending.min_sequence, attempts=pending.attempts))
        else:
            _log.info("snapshot stored, older than asked; will fetch again",
                      extra=kv(symbol=symbol, sequence=snap.sequence,
                               wanted=pending.min_sequence))
        return True

    def _refused(self, symbol: str, reason: str, detail: str) -> None:
        self._metrics.snapshots_refused.labels(symbol, reason).inc()
        _log.warning("snapshot fetch failed", extra=kv(symbol=symbol, reason=reason,
                                                       detail=detail[:300]))

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
        min_sequence = parse_request(payload)
        self._metrics.snapshot_requests.labels(symbol).inc()
        if min_sequence is None:
            _log.warning("snapshot request with a malformed payload: treated as 0",
                         extra=kv(symbol=symbol, payload=repr(payload)[:60]))
            min_sequence = 0
        _log.info("snapshot requested", extra=kv(symbol=symbol, min_sequence=min_sequence))
        self.request(symbol, min_sequence, reason="consumer")
