"""The feed: the exchange's L3 WebSocket on several lines in, one Redis stream per symbol out.

:class:`Feed` keeps ``FEED_LINES`` independent connections to the exchange
(:class:`~services.feed.lines.Line`: each its own token and ``connectId``,
each subscribed to every symbol, each reconnecting on its own) and merges
them per symbol by ``sequence`` (:class:`~services.feed.arbiter.Arbiter`): a
message lost on one line is taken from another, each sequence is written once
and in order, and a gap exists only when every line lost it.

For each data frame of a line:

* the symbol comes from the frame's ``topic`` (only the envelope is decoded);
  frames without a configured symbol are counted
  (``kumex_feed_messages_unrouted_total{reason}``) and logged, not stored;
* its ``sequence`` is read; a copy of a message already taken is dropped
  there (no further parsing);
* a new one is validated (:func:`~kumex_l3.parse_message`): a frame that is
  not a valid level3v2 message of its symbol is refused to ``kumex:{SYM}:dlq``
  and does not take the sequence's place, so a good copy from another line
  still can; frames over :data:`~kumex_l3.messages.MAX_MESSAGE_BYTES` are
  refused before anything is stored (the DLQ keeps their head only);
* the arbiter says what to write, in order.

**Roles.** Several feed processes may run (``--scale feed=2``): each keeps
its lines up, but a symbol's stream is written only by the holder of its
writer lease (``kumex:{SYM}:owner:feed``, :mod:`kumex_l3.lease`), and the
writes are fenced by it on the server (:mod:`services.feed.writer`). The
other feeds are standbys: they arbitrate the same messages and keep the last
``FEED_REPLAY_BUFFER`` of them. When the writer dies its lease expires
(``FEED_LEASE_TTL_SECONDS``) and a standby takes over: it reads the stream
head (``kumex:{SYM}:l3:last``) and writes, from its own memory, every message
after it, then goes on live, so that ``kill -9`` of the writer costs no gap
when the standby's lines saw the messages.

**Sessions.** A *session* is a span during which at least one line is
subscribed: for the symbols it writes, the feed appends ``ctl=connected``
(``connectId``: the session's id) when a session starts or when it takes a
symbol over, and ``ctl=disconnected`` when the last line is lost or the feed
stops. A single line's reconnection is not a session change: the other lines
cover it. While a session is up the writer keeps the heartbeat
``kumex:{SYM}:feed`` alive (fenced too) and, at each session start, asks the
snapshot scheduler (:mod:`services.feed.snapshots`) for a snapshot.

:func:`services.feed.run.run_feed` wires it all (writer, lines, leases,
snapshots, HTTP) and returns after a clean stop: it flushes the buffer to Redis
for up to ``FEED_SHUTDOWN_TIMEOUT`` seconds and gives its leases back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec
import redis.asyncio
import redis.exceptions
from prometheus_client.metrics import Counter as _Counter

from kumex_l3 import keys
from kumex_l3.backoff import Backoff
from kumex_l3.errors import MessageError
from kumex_l3.logs import kv
from kumex_l3.messages import MAX_MESSAGE_BYTES, Control, DataMessage, Message, parse_message
from kumex_l3.tasks import cancel_and_wait
from kumex_l3.wsclient import (
    Connection,
    DataFrame,
    FrameKind,
    WsClient,
    level3_topic,
    level3_topics,
)
from services.feed.arbiter import Arbiter, GapDeclared, Rebased, Refused, Released
from services.feed.capture import Capture
from services.feed.lines import Line
from services.feed.metrics import FeedMetrics, LineCollector
from services.feed.settings import FeedSettings
from services.feed.snapshots import request_payload
from services.feed.writer import ROLE, StreamWriter

__all__ = ["SCHEDULER_ROLE", "Feed", "make_backoff"]

_log = logging.getLogger(__name__)

#: Unrouted frames: the first ones are logged, then one in this many.
_LOG_EVERY: Final = 1000
_LOG_FIRST: Final = 10
#: Refused frames remembered, so that one sent on every line is dead-lettered once.
_REFUSED_MEMORY: Final = 256
#: Bytes of a refused frame kept in the dead-letter stream (the rest is counted).
_DLQ_RAW_MAX: Final = 4096
#: Lease role of the snapshot scheduler (one feed serves every symbol's requests).
SCHEDULER_ROLE: Final = "feed-snapshots"


def make_backoff(settings: FeedSettings) -> Callable[[], Backoff]:
    """A factory of fresh backoff policies with the configured limits."""
    def factory() -> Backoff:
        return Backoff(settings.backoff_initial, settings.backoff_factor, settings.backoff_max)
    return factory


class _SeqData(msgspec.Struct, gc=False):
    sequence: Any = None


class _SeqEnvelope(msgspec.Struct, gc=False):
    data: _SeqData | None = None


_SEQ: Final = msgspec.json.Decoder(_SeqEnvelope)


def frame_sequence(text: str) -> int | None:
    """The ``data.sequence`` of a data frame, or ``None`` when it has no integer one."""
    try:
        env = _SEQ.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    seq = None if env.data is None else env.data.sequence
    return seq if type(seq) is int and seq >= 0 else None


class _Symbol:
    """What the feed keeps per symbol: the arbiter, the recent messages, the writer role."""

    __slots__ = ("arbiter", "counter", "recent", "symbol", "token")

    def __init__(self, symbol: str, arbiter: Arbiter, replay_max: int, counter: _Counter) -> None:
        self.symbol = symbol
        self.arbiter = arbiter
        #: The last messages released, oldest first: the backlog written at a takeover.
        self.recent: deque[tuple[int, str]] = deque(maxlen=replay_max)
        #: This feed's lease value while it writes the symbol, else ``None``.
        self.token: str | None = None
        self.counter = counter


class Feed:
    """The lines, the arbitration and the writer role of each symbol (module docstring)."""

    def __init__(
        self,
        ws: WsClient,
        symbols: Sequence[str],
        writer: StreamWriter,
        metrics: FeedMetrics,
        *,
        lines: int,
        wait: float,
        backoff: Callable[[], Backoff],
        feed_id: str,
        replay_max: int = 20_000,
        positions: dict[str, int | None] | None = None,
        capture: Capture | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.symbols = tuple(symbols)
        self.feed_id = feed_id
        self._writer = writer
        self._metrics = metrics
        self._capture = capture
        self._clock = clock
        self._rng = rng or random.Random()
        positions = positions or {}
        shards = level3_topics(self.symbols)
        self._state: dict[str, _Symbol] = {
            s: _Symbol(s, Arbiter(s, lines, wait=wait, position=positions.get(s)), replay_max,
                       metrics.received.labels(s))
            for s in self.symbols}
        # Per-topic symbol state, looked up once a frame.
        self._routes: dict[str, _Symbol] = {level3_topic(s): st
                                            for s, st in self._state.items()}
        self.lines = [Line(i, ws, shards, self, backoff=backoff(), rng=self._rng, clock=clock)
                      for i in range(lines)]
        metrics.registry.register(LineCollector(self.lines, self._state_stats))
        #: The current session's id while at least one line is subscribed.
        self.session: str | None = None
        self._epoch = 0
        self._unrouted = 0
        self._refused: OrderedDict[str, None] = OrderedDict()
        self._timer = asyncio.Event()
        self._beat_now = asyncio.Event()
        #: Called with (symbol, payload) to ask the scheduler for a snapshot.
        self.ask_snapshot: Callable[[str, str], None] = lambda symbol, payload: None

    # ------------------------------------------------------------------ reading

    @property
    def ready(self) -> bool:
        """At least one line is connected and subscribed to every symbol."""
        return self.session is not None

    @property
    def written(self) -> list[str]:
        """Symbols whose stream this feed writes now."""
        return [s for s, st in self._state.items() if st.token is not None]

    def up(self) -> int:
        """Lines subscribed now."""
        return sum(1 for line in self.lines if line.subscribed)

    def arbiter(self, symbol: str) -> Arbiter:
        return self._state[symbol].arbiter

    def _state_stats(self) -> Iterable[tuple[str, Arbiter, bool]]:
        return ((s, st.arbiter, st.token is not None) for s, st in self._state.items())

    def status(self) -> dict[str, Any]:
        """For ``/readyz``."""
        return {
            "ready": self.ready,
            "connected": self.ready,
            "feed": self.feed_id,
            "session": self.session,
            "lines": [line.status() for line in self.lines],
            "symbols": list(self.symbols),
            "writes": self.written,
            "buffered": len(self._writer.buffer),
            "redis": self._writer.redis_ok.is_set(),
        }

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Run every line and the arbitration timer until cancelled. Raises only on a bug."""
        tasks = [asyncio.create_task(line.run(), name=f"feed-{line.name}")
                 for line in self.lines]
        tasks.append(asyncio.create_task(self._expire_loop(), name="feed-arbitration"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a line ends only on a bug: raise it
        finally:
            await cancel_and_wait(*tasks)

    async def _expire_loop(self) -> None:
        """Declare the holes no line filled in time (and refuse far frames never corroborated)."""
        while True:
            self._timer.clear()
            dues = [d for st in self._state.values() if (d := st.arbiter.due()) is not None]
            if not dues:
                await self._timer.wait()
                continue
            delay = min(dues) - self._clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._timer.wait()
                continue
            now = self._clock()
            for st in self._state.values():
                due = st.arbiter.due()
                if due is not None and due <= now:
                    self._emit(st, st.arbiter.expire(now))

    async def heartbeat(self, client: redis.asyncio.Redis, ttl: float) -> None:
        """Keep ``kumex:{SYM}:feed`` alive for the symbols this feed writes (cancel to stop).

        Set at each session start and takeover, and every ``ttl / 5`` seconds,
        with that ``ttl``, only while the lease is ours (checked on the server),
        on a client of its own so that a backlog of writes does not delay it.
        Not refreshed while no line is up: it lapses, and so it does when this
        process dies.
        """
        interval, ttl_ms = ttl / 5, max(1, int(ttl * 1000))
        failing = False
        while True:
            self._beat_now.clear()
            written = [(s, st.token) for s, st in self._state.items() if st.token is not None]
            if self.session is not None and written:
                value = msgspec.json.encode({
                    "connectId": self.session, "feed": self.feed_id,
                    "at": time.time_ns() // 1_000_000, "lines": self.up(),
                    "of": len(self.lines)})
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for symbol, token in written:
                            pipe.eval(_BEAT, 2, keys.feed_alive(symbol), keys.owner(symbol, ROLE),
                                      token, value, ttl_ms)
                        await pipe.execute()
                    failing = False
                except (redis.exceptions.RedisError, OSError) as exc:
                    self._metrics.redis_errors.labels("heartbeat").inc()
                    if not failing:
                        _log.warning("heartbeat not written", extra=kv(
                            error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                    failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._beat_now.wait()

    # ------------------------------------------------------------------ lines

    def line_up(self, line: Line, conn: Connection) -> None:
        self._metrics.connections.inc()
        _log.info("line connected and subscribed", extra=kv(
            line=line.index, connectId=conn.connect_id, endpoint=conn.server.endpoint,
            symbols=",".join(self.symbols), pingInterval=conn.server.ping_interval))
        if self.session is None:
            self._epoch += 1
            self.session = f"{self.feed_id}.{self._epoch}"
            self._metrics.connected.set(1)
            _log.info("session started", extra=kv(session=self.session, line=line.index))
            for st in self._state.values():
                if st.token is not None:
                    self._session_started(st)
        self._beat_now.set()

    def line_down(self, line: Line, reason: str) -> None:
        self._metrics.reconnects.inc()
        if self.session is None or self.up() > 0:
            return
        # The last line is gone: the exchange may move on without us.
        _log.warning("every line lost: session ended", extra=kv(
            session=self.session, reason=reason[:300]))
        self.end_session(reason)

    def end_session(self, reason: str) -> None:
        """``ctl=disconnected`` to every stream this feed writes; the session is over."""
        if self.session is None:
            return
        for st in self._state.values():
            if st.token is not None:
                self._writer.control(st.symbol, "disconnected", reason=reason[:300],
                                     connectId=self.session)
        self.session = None
        self._metrics.connected.set(0)

    def _session_started(self, st: _Symbol) -> None:
        assert self.session is not None
        self._writer.control(st.symbol, "connected", connectId=self.session)
        self.ask_snapshot(st.symbol, request_payload(0, "session"))

    def line_frame(self, line: Line, frame: DataFrame) -> None:
        st = self._routes.get(frame.topic) if frame.topic is not None else None
        if st is None or frame.kind is not FrameKind.DATA:
            self._unroutable(frame.kind, frame.topic, frame.text)
            return
        st.counter.inc()
        text = frame.text
        arbiter = st.arbiter
        index = line.index
        seq = frame_sequence(text) if len(text) <= MAX_MESSAGE_BYTES else None
        if seq is None:
            self._refuse(st, index, text, _invalid_reason(text))
            return
        if not arbiter.seen(index, seq):
            written = _written(st.recent, seq)
            if written is not None and written != text:
                self._dissent(st, index, seq, text, written)
            return
        try:
            _check(parse_message(text), st.symbol)
        except MessageError as exc:
            self._refuse(st, index, text, exc.reason)
            return
        self._emit(st, arbiter.offer(index, seq, text, self._clock()))
        if arbiter.held:
            self._timer.set()

    def _dissent(self, st: _Symbol, line: int, seq: int, text: str, written: str) -> None:
        """A copy of a written sequence whose text differs: the same message written
        otherwise, or a bad or forged frame (refused, and counted as a conflict)."""
        try:
            msg = _check(parse_message(text), st.symbol)
        except MessageError as exc:
            self._refuse(st, line, text, exc.reason)
            return
        if msg != parse_message(written):
            self._metrics.conflicts.labels(st.symbol).inc()
            self._refuse(st, line, text, f"conflicts with the message written at sequence "
                                         f"{seq}: two different messages claim it")

    # ------------------------------------------------------------------ output

    def _emit(self, st: _Symbol, outputs: list[Any]) -> None:
        writer, capture, recent = self._writer, self._capture, st.recent
        writing = st.token is not None
        for out in outputs:
            if type(out) is Released:
                recent.append((out.sequence, out.text))
                if capture is not None:
                    capture.write(out.text)
                if writing:
                    writer.append(st.symbol, out.sequence, out.text)
            elif type(out) is GapDeclared:
                log = _log.warning if writing else _log.info
                log("no line delivered these messages: a gap", extra=kv(
                    symbol=st.symbol, first=out.first, last=out.last, lost=out.size))
            elif type(out) is Refused:
                self._refuse(st, out.line, out.text, out.reason)
            elif type(out) is Rebased:
                _log.warning("the stream moved far from its position (corroborated)",
                             extra=kv(symbol=st.symbol, since=out.since, to=out.to))

    def _refuse(self, st: _Symbol, line: int, text: str, reason: str) -> None:
        """Dead-letter a frame (once, however many lines carried it) and count it."""
        self._metrics.invalid.labels(st.symbol).inc()
        if text in self._refused:
            return
        self._refused[text] = None
        if len(self._refused) > _REFUSED_MEMORY:
            self._refused.popitem(last=False)
        raw = text if len(text) <= _DLQ_RAW_MAX else (
            text[:_DLQ_RAW_MAX] + f"... ({len(text)} characters in all)")
        _log.warning("frame refused", extra=kv(symbol=st.symbol, line=line, reason=reason[:200],
                                               frame=text[:200]))
        self._writer.dead_letter(st.symbol, reason, raw, line=str(line))

    def _unroutable(self, kind: FrameKind, topic: str | None, text: str) -> None:
        if kind is FrameKind.INVALID:
            reason = "invalid"
        elif kind is not FrameKind.DATA:
            reason = "unknown_type"
        elif topic is None:
            reason = "no_topic"
        else:
            reason = "unknown_topic"
        self._metrics.unrouted.labels(reason).inc()
        self._unrouted += 1
        if self._unrouted <= _LOG_FIRST or self._unrouted % _LOG_EVERY == 0:
            _log.warning("frame with no configured symbol: not stored", extra=kv(
                reason=reason, topic=topic, count=self._unrouted, frame=text[:200]))

    # ------------------------------------------------------------------ roles

    async def take_over(self, symbol: str, token: str, head: int | None, *,
                        resume: bool = True) -> int:
        """Become the writer of ``symbol`` after the stream's last sequence ``head``.

        Writes, from memory, every message released after ``head``; from then on,
        everything live. With ``resume`` False (the stream ended with the previous
        writer's ``ctl=disconnected``, or has never been written), a session is
        started on it first: ``ctl=connected`` and a snapshot request, as after a
        reconnection. A writer that died mid-session (``kill -9``) is taken over
        seamlessly: the stream just goes on, and no snapshot is spent on it.
        Returns how many messages the backlog held.
        """
        st = self._state[symbol]
        self._writer.fence(symbol, token)
        st.token = token
        if self.session is not None and not resume:
            self._session_started(st)
        backlog = [(seq, text) for seq, text in st.recent if head is None or seq > head]
        for seq, text in backlog:
            self._writer.append(symbol, seq, text)
        first = backlog[0][0] if backlog else None
        if head is not None and first is not None and first > head + 1:
            _log.warning("took over with a gap: the standby had not seen every message",
                         extra=kv(symbol=symbol, head=head, first=first))
        self._metrics.writer.labels(symbol).set(1)
        self._metrics.takeovers.labels(symbol).inc()
        self._metrics.backlog.labels(symbol).inc(len(backlog))
        _log.info("writing the stream", extra=kv(symbol=symbol, head=head, backlog=len(backlog),
                                                 session=self.session))
        self._beat_now.set()
        return len(backlog)

    def stand_by(self, symbol: str) -> None:
        """Stop writing ``symbol`` (the lease is gone): keep arbitrating it, in memory."""
        st = self._state[symbol]
        if st.token is None:
            return
        st.token = None
        self._writer.fence(symbol, None)
        self._metrics.writer.labels(symbol).set(0)
        _log.info("standing by", extra=kv(symbol=symbol))


#: Set the heartbeat only while the writer lease is ours.
_BEAT: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def _check(msg: Message, symbol: str) -> DataMessage:
    """``msg`` if it is a level3v2 data message of ``symbol``, else :class:`MessageError`."""
    if isinstance(msg, Control):
        raise MessageError(f"{msg.type} is not a level3v2 data message")
    if msg.symbol != symbol:
        raise MessageError(f"message for {msg.symbol} on the {symbol} topic")
    return msg


def _written(recent: deque[tuple[int, str]], seq: int) -> str | None:
    """The text written at ``seq`` if it is among the recent messages (``None`` otherwise).

    The recent messages are in increasing sequence order and usually contiguous:
    the index is computed from the newest; each gap after ``seq`` makes that
    index land earlier, so a short scan towards the newest covers a few gaps.
    """
    size = len(recent)
    if not size:
        return None
    back = recent[-1][0] - seq
    if back < 0 or back >= size:
        return None
    for k in range(size - 1 - back, min(size, size + 63 - back)):
        found, text = recent[k]
        if found == seq:
            return text
        if found > seq:
            break
    return None


def _invalid_reason(text: str) -> str:
    if len(text) > MAX_MESSAGE_BYTES:
        return f"message of {len(text)} characters exceeds {MAX_MESSAGE_BYTES} bytes"
    try:
        parse_message(text)
    except MessageError as exc:
        return exc.reason
    return "data.sequence is missing or not a non-negative integer"
