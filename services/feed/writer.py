"""The writer task: drains the feed's buffer into Redis, one pipeline per batch.

The line readers call :meth:`StreamWriter.append` (synchronous, never waits
for Redis); :meth:`StreamWriter.run` takes up to ``batch_size`` entries at a
time and sends them in one non-transactional pipeline of Lua scripts, each
touching the keys of one symbol only (one Redis Cluster slot)::

    EVAL write   kumex:{SYM}:l3 kumex:{SYM}:owner:feed kumex:{SYM}:l3:last
                 <token> <maxlen> <max jump> <seq> <frame> <seq> <frame> ...
    EVAL control kumex:{SYM}:l3 kumex:{SYM}:owner:feed <token> <maxlen> ctl connected ...
    EVAL snapshot kumex:{SYM}:snapshot kumex:{SYM}:l3 <data> <seq> <maxlen> ctl snapshot ...
    XADD kumex:{SYM}:dlq MAXLEN ~ 10000 * reason <why> raw <text>

**Fencing.** The symbol's stream is written only by the feed holding its
writer lease (``kumex:{SYM}:owner:feed``): the scripts compare the lease with
this feed's token (:meth:`StreamWriter.fence`) on the server, so a feed that
was paused past its lease, or lost it, writes nothing; its entries are dropped
(the new writer has them from its own lines) and ``on_fenced`` is told.

**Exactly once.** The write script appends a frame only if its sequence is
above ``kumex:{SYM}:l3:last`` (the last sequence written, kept by the same
script), so a retried batch or a takeover that starts a little early never
writes a sequence twice. A head implausibly far above a frame (more than
:data:`~kumex_l3.sequence.MAX_SEQUENCE_JUMP`) cannot be right and is not
obeyed.

**Snapshots** are stored only if not older than the one stored already (the
scheduler may run in another feed than the symbol's writer; a late one never
replaces a newer snapshot).

When Redis fails (down, timeout, ``OOM``, ``READONLY``...) the batch is kept
and retried after a jittered backoff. A command Redis refuses for good
(``WRONGTYPE``...) is dropped, counted and logged, and recorded as a gap, so
one bad key never blocks the others. Nothing here ever raises a Redis error
to its caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from collections.abc import Callable
from typing import Final

import redis.asyncio
import redis.exceptions
from redis.typing import EncodableT, FieldT

from kumex_l3 import keys
from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from kumex_l3.redis_adapter import is_transient
from kumex_l3.sequence import MAX_SEQUENCE_JUMP
from services.feed.buffer import Control, Entry, FeedBuffer
from services.feed.metrics import FeedMetrics

__all__ = ["DLQ_MAXLEN", "ROLE", "StreamWriter"]

_log = logging.getLogger(__name__)

#: The lease role of the symbol's stream writer (``kumex:{SYM}:owner:feed``).
ROLE: Final = "feed"
#: ``MAXLEN ~`` of the dead-letter streams.
DLQ_MAXLEN: Final = 10_000
#: Lua helper: is the decimal string ``a`` above ``b`` (no leading zeros, exact)?
_ABOVE: Final = """
local function above(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
"""
#: Append each (sequence, frame) above the head while the lease is ours (module doc).
_WRITE: Final = _ABOVE + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local head = redis.call('GET', KEYS[3])
local jump = tonumber(ARGV[3])
local written = 0
for i = 4, #ARGV, 2 do
  local seq = ARGV[i]
  if (not head) or above(seq, head) or (tonumber(head) - tonumber(seq) > jump) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'msg', ARGV[i + 1])
    head = seq
    written = written + 1
  end
end
if written > 0 then redis.call('SET', KEYS[3], head) end
return written
"""
#: Append one control entry while the lease is ours.
_CONTROL: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
#: Store a snapshot unless the stored one is newer, then announce it on the stream.
_SNAPSHOT: Final = _ABOVE + """
local old = redis.call('GET', KEYS[1])
if old then
  local stored = string.match(old, '"sequence"%s*:%s*(%d+)')
  if stored and above(stored, ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return 1
"""
def _nothing(symbol: str) -> None:
    return None


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
        on_fenced: Callable[[str], None] = _nothing,
        max_jump: int = MAX_SEQUENCE_JUMP,
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
        self._stream_keys: dict[str, tuple[str, str, str]] = {}
        #: Symbol -> this feed's lease value while it writes the symbol (module doc).
        self.fences: dict[str, str] = {}
        self.on_fenced = on_fenced
        self.max_jump = max_jump
        metrics.buffer_depth.set_function(lambda: len(self.buffer))

    # -- the reader's side (synchronous, never waits) ----------------------------

    def fence(self, symbol: str, token: str | None) -> None:
        """Write ``symbol``'s stream under lease value ``token`` (``None``: not the writer)."""
        if token is None:
            self.fences.pop(symbol, None)
        else:
            self.fences[symbol] = token

    def append(self, symbol: str, sequence: int, text: str) -> bool:
        """Queue a raw data frame for ``symbol``'s stream; ``False`` if the buffer is full."""
        if self.buffer.put(symbol, sequence, text):
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
        """Queue a ``ctl=<ctl>`` entry (with ``fields``) for ``symbol``'s stream (fenced)."""
        self._control(symbol, Control(self._stream(symbol), {keys.FIELD_CTL: ctl, **fields},
                                      fenced=True))

    @property
    def client(self) -> redis.asyncio.Redis:
        """The Redis client the writer writes with."""
        return self._redis

    def announce(self, symbol: str, sequence: int) -> None:
        """Queue ``ctl=snapshot sequence=<n>`` alone: the stored snapshot answers a request."""
        self._control(symbol, Control(self._stream(symbol), {keys.FIELD_CTL: "snapshot",
                                                             "sequence": str(sequence)}))

    def snapshot(self, symbol: str, data: bytes, sequence: int) -> None:
        """Queue ``SET snapshot`` + ``ctl=snapshot sequence=<n>`` (one script; not if older)."""
        self._control(symbol, Control(
            self._stream(symbol), {keys.FIELD_CTL: "snapshot", "sequence": str(sequence)},
            store=(keys.snapshot(symbol), data, sequence)))

    def dead_letter(self, symbol: str, reason: str, raw: str | bytes, **fields: str) -> None:
        """Queue an entry (``reason``, ``raw``, ``fields``) for ``symbol``'s dead-letter stream."""
        self._control(symbol, Control(keys.dlq(symbol), {"reason": reason, "raw": raw, **fields},
                                      maxlen=DLQ_MAXLEN))

    def _control(self, symbol: str, control: Control) -> None:
        self.buffer.put_control(symbol, control)
        self._wake.set()

    def _keys(self, symbol: str) -> tuple[str, str, str]:
        """The symbol's stream, writer lease and stream head keys (looked up once)."""
        found = self._stream_keys.get(symbol)
        if found is None:
            found = self._stream_keys[symbol] = (keys.l3_stream(symbol),
                                                 keys.owner(symbol, ROLE),
                                                 keys.stream_head(symbol))
        return found

    def _stream(self, symbol: str) -> str:
        return self._keys(symbol)[0]

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

        Consecutive data frames of one symbol go as ONE command (the write
        script's loop of ``XADD``): redis-py builds a pipelined ``XADD`` in
        Python at ~11 us a message, a single ``EVAL`` with the frames as
        arguments at under 1 us.
        """
        pipe = self._redis.pipeline(transaction=False)
        maxlen = self.maxlen
        fences = self.fences
        # (entries, commands, kind) in batch order; kind: "data", "control", "fenced", "skip"
        groups: list[tuple[int, int, str]] = []
        i, n = 0, len(batch)
        while i < n:
            symbol, payload = batch[i]
            if type(payload) is tuple:
                j = i + 1
                while j < n and batch[j][0] == symbol and type(batch[j][1]) is tuple:
                    j += 1
                token = fences.get(symbol)
                if token is None:
                    groups.append((j - i, 0, "skip"))
                    i = j
                    continue
                args: list[EncodableT] = [token, maxlen, self.max_jump]
                for _, data in batch[i:j]:
                    if type(data) is tuple:
                        args += data
                stream, lease, head = self._keys(symbol)
                pipe.eval(_WRITE, 3, stream, lease, head, *args)
                groups.append((j - i, 1, "data"))
                i = j
                continue
            assert isinstance(payload, Control)
            flat: list[EncodableT] = [v for kv_pair in payload.fields.items() for v in kv_pair]
            limit = payload.maxlen or maxlen
            if payload.store is not None:
                key, value, sequence = payload.store
                pipe.eval(_SNAPSHOT, 2, key, payload.key, value, sequence, limit, *flat)
                groups.append((1, 1, "control"))
            elif payload.fenced:
                token = fences.get(symbol)
                if token is None:
                    groups.append((1, 0, "skip"))
                else:
                    pipe.eval(_CONTROL, 2, payload.key, self._keys(symbol)[1], token, limit,
                              *flat)
                    groups.append((1, 1, "fenced"))
            else:
                fields: dict[FieldT, EncodableT] = {k: v for k, v in payload.fields.items()}
                pipe.xadd(payload.key, fields, maxlen=limit, approximate=True)
                groups.append((1, 1, "control"))
            i += 1
        self.pipelines += 1
        if not any(count for _, count, _ in groups):
            return len(batch), None
        try:
            results = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError) as exc:
            return 0, exc
        return self._account(batch, groups, results)

    def _account(self, batch: list[Entry], groups: list[tuple[int, int, str]],
                 results: list[object]) -> tuple[int, BaseException | None]:
        written: Tally[str] = Tally()
        pos = 0
        done = 0
        fenced: set[str] = set()
        try:
            for entries, count, kind in groups:
                symbol, payload = batch[done]
                if kind == "skip":
                    self._metrics.fenced.labels(symbol).inc(entries)
                    done += entries
                    continue
                result = results[pos]
                pos += count
                if isinstance(result, Exception):
                    if is_transient(result):
                        return done, result
                    for k in range(done, done + entries):
                        self._refused(batch[k][0], batch[k][1], result)
                elif result == -1:  # not (or no longer) the writer of this symbol
                    self._metrics.fenced.labels(symbol).inc(entries)
                    fenced.add(symbol)
                elif kind == "data":
                    written[symbol] += int(result)  # type: ignore[call-overload]
                    self._metrics.repeated.labels(symbol).inc(
                        entries - int(result))  # type: ignore[call-overload]
                elif isinstance(payload, Control) and payload.fields.get(keys.FIELD_CTL) == "gap":
                    self._metrics.gaps.labels(symbol).inc()
                    _log.warning("gap recorded in the stream",
                                 extra=kv(symbol=symbol, dropped=payload.fields.get("dropped"),
                                          reason=payload.fields.get("reason")))
                done += entries
        finally:
            for symbol, count in written.items():
                self._metrics.written.labels(symbol).inc(count)
            for symbol in fenced:
                if self.fences.get(symbol) is not None:
                    _log.warning("not the writer of this symbol any more: entries dropped",
                                 extra=kv(symbol=symbol))
                    self.on_fenced(symbol)
        return done, None

    def _refused(self, symbol: str, payload: tuple[int, str] | Control,
                 exc: BaseException) -> None:
        """Redis refused one command for good: count, log, and mark a gap for data."""
        self._metrics.redis_errors.labels("write").inc()
        if type(payload) is tuple:
            self.buffer.lost(symbol)
            self._metrics.dropped.labels(symbol).inc()
            _log.error("Redis refused a message: dropped", extra=kv(symbol=symbol,
                                                                   error=str(exc)[:200]))
        elif isinstance(payload, Control):
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
