"""The writer task: drains the feed's buffer into Redis, one pipeline per batch.

The socket reader calls :meth:`StreamWriter.append` (synchronous, never waits
for Redis); :meth:`StreamWriter.run` takes up to ``batch_size`` entries at a
time and sends them in one non-transactional pipeline::

    EVAL <XADD each> kumex:{SYM}:l3 N <frame> <frame> ...          (data: one command
                                                                  for a run of frames)
    XADD kumex:{SYM}:l3 MAXLEN ~ N * ctl connected connectId <id>   (control; also
    XADD kumex:{SYM}:l3 MAXLEN ~ N * ctl disconnected reason <why>   ... when it ends)
    SET  kumex:{SYM}:snapshot <data JSON>                           (snapshot ...
    XADD kumex:{SYM}:l3 MAXLEN ~ N * ctl snapshot sequence <seq>     ... then its entry)
    XADD kumex:{SYM}:l3 MAXLEN ~ N * ctl gap reason buffer_overflow dropped <n>
    XADD kumex:{SYM}:dlq MAXLEN ~ 10000 * reason <why> raw <text>

Delivery is at least once: when Redis fails (down, timeout, ``OOM``,
``READONLY``...) the batch is kept and retried after a jittered backoff, and
a command that may have run before the failure can run twice. Consumers
dedupe by ``sequence``. A command Redis refuses for good (``WRONGTYPE``...)
is dropped, counted and logged, and recorded as a gap, so one bad key never
blocks the others. Nothing here ever raises a Redis error to its caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from typing import Final

import redis.asyncio
import redis.exceptions
from redis.typing import EncodableT, FieldT

from kumex_l3 import keys
from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from services.feed.buffer import Control, Entry, FeedBuffer
from services.feed.metrics import FeedMetrics

__all__ = ["DLQ_MAXLEN", "StreamWriter"]

_log = logging.getLogger(__name__)

#: ``MAXLEN ~`` of the dead-letter streams.
DLQ_MAXLEN: Final = 10_000
# Errors Redis answers for a while and then stops answering (retry the batch).
_TRANSIENT_PREFIXES: Final = ("OOM", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                              "LOADING", "BUSY", "NOREPLICAS")
#: ``EVAL`` body: XADD every argument as a ``msg`` entry of KEYS[1], ``MAXLEN ~ ARGV[1]``.
_XADD_MANY: Final = """
local maxlen = ARGV[1]
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'msg', ARGV[i])
end
return #ARGV - 1
"""
_CONNECTION_ERRORS: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                             OSError)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        _TRANSIENT_PREFIXES)


class StreamWriter:
    """Owns the buffer and the only Redis connection that writes streams and snapshots."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        metrics: FeedMetrics,
        *,
        buffer_max: int,
        batch_size: int,
        maxlen: int,
        backoff: Backoff,
    ) -> None:
        self._redis = client
        self._metrics = metrics
        self.buffer = FeedBuffer(buffer_max)
        self.batch_size = batch_size
        self.maxlen = maxlen
        self._backoff = backoff
        self._wake = asyncio.Event()
        self._closing = False
        self._dropping = False
        self._failures = 0
        #: Pipelines sent (successful or not): one per batch, never one per message.
        self.pipelines = 0
        #: Set while the last write succeeded (or none failed yet).
        self.redis_ok = asyncio.Event()
        self.redis_ok.set()
        self._stream_keys: dict[str, str] = {}
        metrics.buffer_depth.set_function(lambda: len(self.buffer))

    # -- the reader's side (synchronous, never waits) ----------------------------

    def append(self, symbol: str, text: str) -> bool:
        """Queue a raw data frame for ``symbol``'s stream; ``False`` if the buffer is full."""
        if self.buffer.put(symbol, text):
            self._wake.set()
            return True
        self._metrics.dropped.labels(symbol).inc()
        if not self._dropping:
            self._dropping = True
            _log.warning("buffer full: dropping messages until Redis catches up",
                         extra=kv(symbol=symbol, buffered=len(self.buffer),
                                  bound=self.buffer.bound))
        return False

    def control(self, symbol: str, ctl: str, **fields: str) -> None:
        """Queue a ``ctl=<ctl>`` entry (with ``fields``) for ``symbol``'s stream."""
        self._control(symbol, Control(self._stream(symbol), {keys.FIELD_CTL: ctl, **fields}))

    def snapshot(self, symbol: str, data: bytes, sequence: int) -> None:
        """Queue ``SET snapshot`` + ``ctl=snapshot sequence=<n>`` (in that order, one pipeline)."""
        self._control(symbol, Control(
            self._stream(symbol), {keys.FIELD_CTL: "snapshot", "sequence": str(sequence)},
            store=(keys.snapshot(symbol), data)))

    def dead_letter(self, symbol: str, reason: str, raw: str | bytes) -> None:
        """Queue an entry (``reason``, ``raw``) for ``symbol``'s dead-letter stream."""
        self._control(symbol, Control(keys.dlq(symbol), {"reason": reason, "raw": raw},
                                      maxlen=DLQ_MAXLEN))

    def _control(self, symbol: str, control: Control) -> None:
        self.buffer.put_control(symbol, control)
        self._wake.set()

    def _stream(self, symbol: str) -> str:
        key = self._stream_keys.get(symbol)
        if key is None:
            key = self._stream_keys[symbol] = keys.l3_stream(symbol)
        return key

    # -- the task -------------------------------------------------------------------

    def close(self) -> None:
        """Ask :meth:`run` to return once the buffer is empty (it keeps retrying until then)."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Write batches until :meth:`close` and an empty buffer; never raises a Redis error."""
        buffer = self.buffer
        try:
            while True:
                if not buffer:
                    self._settle()
                    if not buffer:
                        if self._closing:
                            return
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                batch = buffer.peek(self.batch_size)
                done, error = await self._write(batch)
                buffer.commit(done)
                if error is not None:
                    await self._failed(error)
                    continue
                self._recovered()
                self._settle()
        except asyncio.CancelledError:
            if buffer:
                _log.warning("stopped with entries not written",
                             extra=kv(entries=len(buffer), data=buffer.data_count))
            raise

    async def _write(self, batch: list[Entry]) -> tuple[int, BaseException | None]:
        """Send ``batch``: how many leading entries are done with, and the error to retry on.

        Consecutive data frames of one symbol go as ONE command (a Lua loop of
        ``XADD``): redis-py builds a pipelined ``XADD`` in Python at ~11 us a
        message, a single ``EVAL`` with the frames as arguments at under 1 us.
        """
        pipe = self._redis.pipeline(transaction=False)
        maxlen = self.maxlen
        groups: list[tuple[int, int]] = []  # (entries, commands) in batch order
        i, n = 0, len(batch)
        while i < n:
            symbol, payload = batch[i]
            if isinstance(payload, str):
                j = i + 1
                while j < n and batch[j][0] == symbol and isinstance(batch[j][1], str):
                    j += 1
                texts = [text for _, text in batch[i:j] if isinstance(text, str)]
                pipe.eval(_XADD_MANY, 1, self._stream(symbol), maxlen, *texts)
                groups.append((j - i, 1))
                i = j
                continue
            if payload.store is not None:
                pipe.set(*payload.store)
            fields: dict[FieldT, EncodableT] = {k: v for k, v in payload.fields.items()}
            pipe.xadd(payload.key, fields, maxlen=payload.maxlen or maxlen, approximate=True)
            groups.append((1, 2 if payload.store is not None else 1))
            i += 1
        self.pipelines += 1
        try:
            results = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError) as exc:
            return 0, exc
        return self._account(batch, groups, results)

    def _account(self, batch: list[Entry], groups: list[tuple[int, int]],
                 results: list[object]) -> tuple[int, BaseException | None]:
        written: Tally[str] = Tally()
        pos = 0
        done = 0
        try:
            for entries, count in groups:
                errors = [r for r in results[pos:pos + count] if isinstance(r, Exception)]
                pos += count
                symbol, payload = batch[done]
                if errors:
                    transient = next((e for e in errors if _transient(e)), None)
                    if transient is not None:
                        return done, transient
                    for k in range(done, done + entries):
                        self._refused(batch[k][0], batch[k][1], errors[0])
                elif isinstance(payload, str):
                    written[symbol] += entries
                elif payload.fields.get(keys.FIELD_CTL) == "gap":
                    self._metrics.gaps.labels(symbol).inc()
                    _log.warning("gap recorded in the stream",
                                 extra=kv(symbol=symbol, dropped=payload.fields.get("dropped"),
                                          reason=payload.fields.get("reason")))
                done += entries
        finally:
            for symbol, n in written.items():
                self._metrics.written.labels(symbol).inc(n)
        return done, None

    def _refused(self, symbol: str, payload: str | Control, exc: BaseException) -> None:
        """Redis refused one command for good: count, log, and mark a gap for data."""
        self._metrics.redis_errors.labels("write").inc()
        if isinstance(payload, str):
            self.buffer.lost(symbol)
            self._metrics.dropped.labels(symbol).inc()
            _log.error("Redis refused a message: dropped", extra=kv(symbol=symbol,
                                                                   error=str(exc)[:200]))
        else:
            _log.error("Redis refused a control entry: dropped",
                       extra=kv(symbol=symbol, key=payload.key, error=str(exc)[:200]))

    async def _failed(self, exc: BaseException) -> None:
        self._metrics.redis_errors.labels("write").inc()
        self._failures += 1
        self.redis_ok.clear()
        delay = self._backoff.next_delay()
        _log.warning("Redis write failed; retrying", extra=kv(
            error=f"{type(exc).__name__}: {str(exc)[:200]}", attempt=self._failures,
            retry_in=f"{delay:.2f}s", buffered=len(self.buffer)))
        await asyncio.sleep(delay)

    def _recovered(self) -> None:
        if self._failures:
            _log.info("Redis writes recovered", extra=kv(failures=self._failures,
                                                         buffered=len(self.buffer)))
            self._failures = 0
            self._backoff.reset()
        self.redis_ok.set()

    def _settle(self) -> None:
        if self.buffer.settle_gaps():
            self._dropping = False
            self._wake.set()
