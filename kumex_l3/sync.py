"""The per-symbol synchroniser around :class:`~kumex_l3.book.OrderBook` (pure, no I/O).

It turns the feed's stream (raw level3v2 messages and control entries, in
arrival order, duplicates and gaps possible) plus snapshots and checkpoints into
a book that is either known to be right (*synced*) or marked as not known. It
follows the exchange's sync procedure (kumex-api.md, section 5):

* while not synced, messages are buffered (bounded: the oldest are dropped
  and counted when it overflows, which only asks for a newer snapshot);
* a snapshot older than ``first buffered sequence - 1`` (or than the lowest
  sequence the synchroniser said it needs) cannot be used: ask again;
* a usable snapshot becomes the book, buffered messages at or below its
  sequence are dropped, the rest applied in sequence order; a hole among them
  leaves the book unsynced and asks for a snapshot newer than the hole;
* once synced, each message must carry ``book.sequence + 1``: a lower one is
  ignored (counted as stale), a higher one is a gap; a gap, an
  :class:`~kumex_l3.errors.IntegrityError` or ``ctl=gap`` make the book
  unsynced, ask for a snapshot and start buffering again. ``ctl=connected``
  (the feed reconnected) only says a gap *may* follow: a contiguous next
  message keeps the book synced, a non-contiguous one is a gap as usual;
* ``ctl=disconnected`` (the feed lost the exchange) keeps the book, which is
  still right at its sequence, but no longer *fresh*: nothing says the
  exchange has not moved on. It is fresh again at the next contiguous message,
  or at a ``ctl=snapshot`` at exactly its sequence once the feed is back
  (a quiet market); a gap resyncs as usual. Serve only a fresh book.
  :meth:`Synchronizer.on_feed_silent` does the same for a feed that died
  without a word (the service watches the feed's heartbeat key);
* a message that cannot be parsed (or belongs to another symbol) is refused:
  a :class:`DeadLetter` output, counted, the book untouched;
* so is a message whose sequence is implausibly far from the stream's position
  (:mod:`kumex_l3.sequence`: a corrupt or forged ``2**63 - 1``): it never enters
  the buffer, never moves the highest sequence seen, and so can neither wedge a
  resync ("a hole in the buffered stream" forever) nor raise the snapshot it
  asks for out of reach. If the stream really moved that far (the next
  message corroborates it), the position follows and the old buffer is dropped;
  a snapshot far from the position is trusted, and the buffered messages far
  from it are refused.

Like python-websockets' protocol objects it never awaits and never reads the
clock: the service calls ``on_*`` with what it read and acts on the outputs
each call returns (:class:`Applied`, :class:`NeedSnapshot`,
:class:`FetchSnapshot`, :class:`BecameSynced`, :class:`BecameUnsynced`,
:class:`DeadLetter`). Consecutive applied messages are coalesced into one
:class:`Applied`.

Checkpoints: while :attr:`Synchronizer.synced`, every entry consumed so far is
reflected in the book, so ``(book.to_state(), book.sequence,
last_stream_id)`` is a consistent checkpoint; :meth:`Synchronizer.on_checkpoint`
restores one and the caller resumes reading the stream after its stream id.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from kumex_l3.book import OrderBook
from kumex_l3.errors import IntegrityError, MessageError, SequenceGap
from kumex_l3.keys import FIELD_CTL, FIELD_MSG
from kumex_l3.messages import Control, DataMessage, Snapshot, parse_message, parse_snapshot
from kumex_l3.sequence import MAX_SEQUENCE_JUMP, SequenceGuard, Verdict

#: The ``msg`` field's name as Redis clients without decoding give it.
_FIELD_MSG_BYTES: Final = FIELD_MSG.encode()

__all__ = [
    "CTL_CONNECTED",
    "CTL_DISCONNECTED",
    "CTL_GAP",
    "CTL_SNAPSHOT",
    "Applied",
    "BecameStale",
    "BecameSynced",
    "BecameUnsynced",
    "DeadLetter",
    "FetchSnapshot",
    "NeedSnapshot",
    "Output",
    "SyncState",
    "SyncStats",
    "Synchronizer",
]

#: ``ctl`` values written by the feed.
CTL_CONNECTED: Final = "connected"
CTL_SNAPSHOT: Final = "snapshot"
CTL_GAP: Final = "gap"
CTL_DISCONNECTED: Final = "disconnected"

#: Default bound of the buffer kept while not synced.
DEFAULT_MAX_BUFFER: Final = 100_000


class SyncState(enum.Enum):
    """Where a synchroniser stands."""

    #: No book yet: waiting for a checkpoint or a snapshot.
    STARTING = "starting"
    #: Had a book, lost it (gap, integrity error, feed gap): waiting for a snapshot.
    SYNCING = "syncing"
    #: The book is known to be right up to ``book.sequence``.
    SYNCED = "synced"


# --------------------------------------------------------------------------- outputs


@dataclass(slots=True)
class Applied:
    """``count`` messages were applied; the last one has ``sequence``, from ``stream_id``."""

    count: int
    sequence: int
    stream_id: str


@dataclass(frozen=True, slots=True)
class NeedSnapshot:
    """Ask the feed for a snapshot whose sequence is at least ``min_sequence``; ``reason`` why."""

    min_sequence: int
    reason: str


@dataclass(frozen=True, slots=True)
class FetchSnapshot:
    """The feed announced a stored snapshot (``ctl=snapshot``) that may be usable: read it.

    ``sequence`` is the announced sequence (``None`` when the entry did not say).
    """

    sequence: int | None


@dataclass(frozen=True, slots=True)
class BecameSynced:
    """The book is now known to be right at ``sequence``."""

    sequence: int


@dataclass(frozen=True, slots=True)
class BecameStale:
    """The book is still right at its sequence, but the feed lost the exchange: ``reason``.

    Followed by :class:`BecameSynced` once it is known to be current again.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class BecameUnsynced:
    """The book is no longer known; ``reason`` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input was refused: store ``raw`` with ``reason`` (and the stream id) aside."""

    raw: bytes | str
    reason: str
    stream_id: str


Output: TypeAlias = (
    Applied | NeedSnapshot | FetchSnapshot | BecameSynced | BecameStale | BecameUnsynced
    | DeadLetter
)


@dataclass(slots=True)
class SyncStats:
    """Counters since the synchroniser was created."""

    #: Stream entries with a ``msg`` field.
    messages: int = 0
    applied: int = 0
    #: Messages at or below the book's sequence (duplicates, replays).
    stale: int = 0
    #: Messages refused (dead-lettered).
    refused: int = 0
    #: Of those, messages with an implausible sequence.
    implausible: int = 0
    #: ``ctl=connected`` entries (the feed reconnected).
    reconnects: int = 0
    #: ``ctl=disconnected`` entries (the feed lost the exchange).
    disconnects: int = 0
    #: Times the feed was reported silent (:meth:`Synchronizer.on_feed_silent`).
    silences: int = 0
    #: Sequence gaps detected (in the stream, while replaying, or announced by the feed).
    gaps: int = 0
    integrity_errors: int = 0
    #: Times the book went from synced to unsynced.
    resyncs: int = 0
    #: Times a snapshot was asked for.
    snapshot_requests: int = 0
    snapshots_used: int = 0
    snapshots_rejected: int = 0
    checkpoints_used: int = 0
    #: Buffered messages dropped because the buffer was full.
    overflow: int = 0
    #: Buffered messages dropped because the snapshot already holds them.
    dropped: int = 0


class _Buffered:
    __slots__ = ("msg", "stream_id")

    def __init__(self, msg: DataMessage, stream_id: str) -> None:
        self.msg = msg
        self.stream_id = stream_id


class Synchronizer:
    """Keeps one symbol's :class:`OrderBook` in sync with the stream (see the module doc).

    ``max_buffer`` bounds the messages kept while not synced. Call
    :meth:`start` once to learn whether a snapshot is needed, then feed entries
    with :meth:`on_entry` / :meth:`on_entries` (or :meth:`on_message` and
    :meth:`on_control`), snapshots with :meth:`on_snapshot` and a checkpoint
    with :meth:`on_checkpoint`.

    ``collect_ts``: keep the exchange ``ts`` of every message applied in
    :attr:`applied_ts`, in order, for the caller to drain (e.g. to measure
    how long after the exchange stamped it each message reached the book; the
    synchroniser itself reads no clock).
    """

    def __init__(self, symbol: str, *, max_buffer: int = DEFAULT_MAX_BUFFER,
                 collect_ts: bool = False, max_jump: int = MAX_SEQUENCE_JUMP) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.symbol = symbol
        self.state = SyncState.STARTING
        #: The book; only trustworthy while :attr:`synced`.
        self.book: OrderBook | None = None
        self.stats = SyncStats()
        #: Id of the last stream entry consumed (message or control).
        self.last_stream_id: str | None = None
        #: Id of the stream entry of the last message applied.
        self.last_applied_id: str | None = None
        #: With ``collect_ts``: the ``ts`` (ns) of each message applied since the
        #: caller last emptied the list (it must empty it, or it grows); else ``None``.
        self.applied_ts: list[int] | None = [] if collect_ts else None
        self._buffer: deque[_Buffered] = deque(maxlen=max_buffer)
        # Lowest snapshot sequence we can use, beyond what the buffer says.
        self._floor = 0
        # Highest plausible sequence seen in the stream (for the floor after ctl=gap).
        self._guard = SequenceGuard(max_jump=max_jump)
        #: While synced: why the book may be stale (the feed is or was disconnected and
        #: nothing has shown the book current since); ``None`` when fresh.
        self.stale_reason: str | None = None
        # Between a ctl=disconnected and the next ctl=connected.
        self._feed_down = False
        # The feed is down only because it went silent (no ctl=disconnected read).
        self._silent = False
        self._down_reason = ""
        self._out: list[Output] = []

    # ------------------------------------------------------------------ properties

    @property
    def synced(self) -> bool:
        """``True`` when the book is known to be right."""
        return self.state is SyncState.SYNCED

    @property
    def fresh(self) -> bool:
        """``True`` when the book is synced and nothing says the exchange has moved on."""
        return self.state is SyncState.SYNCED and self.stale_reason is None

    @property
    def needed_sequence(self) -> int | None:
        """While not synced: the lowest snapshot sequence that can be used; else ``None``."""
        if self.state is SyncState.SYNCED:
            return None
        return self._needed()

    @property
    def max_sequence(self) -> int:
        """Highest plausible sequence seen so far (messages, snapshot or checkpoint)."""
        return self._guard.position or 0

    @property
    def buffered(self) -> int:
        """Messages held while waiting for a snapshot."""
        return len(self._buffer)

    # ------------------------------------------------------------------ inputs

    def start(self) -> list[Output]:
        """Outputs of the initial state: a :class:`NeedSnapshot` unless already synced."""
        if self.state is not SyncState.SYNCED:
            self._request("no book yet")
        return self._drain()

    def on_entry(self, stream_id: str, fields: Mapping[Any, Any]) -> list[Output]:
        """One stream entry as read from Redis (keys and values as ``str`` or ``bytes``)."""
        self._entry(stream_id, fields)
        return self._drain()

    def on_entries(self, entries: Iterable[tuple[Any, Mapping[Any, Any]]]) -> list[Output]:
        """A batch of stream entries ``(id, fields)``, in stream order.

        The same as :meth:`on_entry` for each, faster: while the book is fresh, a
        run of messages that each follow the last goes to the book in one
        :meth:`~kumex_l3.book.OrderBook.apply_many`; the entry it stops at (and
        every control entry) takes the one-by-one path.
        """
        batch = entries if isinstance(entries, list) else list(entries)
        i, n = 0, len(batch)
        while i < n:
            if self.fresh:
                i += self._run(batch, i)
                if i >= n:
                    break
            stream_id, fields = batch[i]
            self._entry(_text(stream_id), fields)
            i += 1
        return self._drain()

    def _run(self, batch: list[tuple[Any, Mapping[Any, Any]]], start: int) -> int:
        """Apply the messages of ``batch`` from ``start`` that follow the book; how many."""
        book = self.book
        assert book is not None
        if self._guard.position != book.sequence:
            return 0
        raws: list[bytes | str] = []
        for _, fields in itertools.islice(batch, start, None):
            raw = fields.get(FIELD_MSG)
            if raw is None:
                raw = fields.get(_FIELD_MSG_BYTES)
                if raw is None:
                    break
            raws.append(raw)
        if not raws:
            return 0
        taken = book.apply_many(raws, contiguous=True, applied_ts=self.applied_ts)
        if taken:
            # What _message and _applied do for each of them, for the run at once.
            self._guard.advance(book.sequence)
            stats = self.stats
            stats.messages += taken
            stats.applied += taken
            sid = _text(batch[start + taken - 1][0])
            self.last_stream_id = self.last_applied_id = sid
            out = self._out
            if out and type(last := out[-1]) is Applied:
                last.count += taken
                last.sequence = book.sequence
                last.stream_id = sid
            else:
                out.append(Applied(taken, book.sequence, sid))
        return taken

    def on_message(self, raw: bytes | str, stream_id: str) -> list[Output]:
        """One raw level3v2 message (the ``msg`` field) from entry ``stream_id``."""
        self._message(raw, stream_id)
        return self._drain()

    def on_control(self, ctl: str, stream_id: str,
                   fields: Mapping[str, str] | None = None) -> list[Output]:
        """One feed control entry (``connected``, ``snapshot``, ``gap``); ``fields`` its others."""
        self._control(ctl, stream_id, fields or {})
        return self._drain()

    @property
    def feed_silent(self) -> bool:
        """The feed went silent (:meth:`on_feed_silent`) and nothing has been heard since."""
        return self._silent

    def on_feed_silent(self, reason: str) -> list[Output]:
        """The feed is not known to be alive (its heartbeat lapsed): as ``ctl=disconnected``.

        For a feed that died without writing ``ctl=disconnected``. The book, if
        fresh, becomes stale with ``reason``; it is fresh again as after a
        disconnection (``ctl=connected`` from the restarted feed, then a
        contiguous message or a snapshot at its sequence), or at
        :meth:`on_feed_heard`. A contiguous message also shows the feed alive.
        """
        self.stats.silences += 1
        if not self._feed_down:
            self._feed_down = True
            self._silent = True
            self._down_reason = reason[:300]
        if self.state is SyncState.SYNCED and self.stale_reason is None:
            self._go_stale()
        return self._drain()

    def on_feed_heard(self) -> list[Output]:
        """The silent feed is back *on the same exchange connection*: fresh again.

        The caller knows it from the heartbeat: the connection the book was
        following never broke, so the stream holds all of it, and no
        ``ctl=connected`` will come. Does nothing after a ``ctl=disconnected``.
        """
        if self._silent:
            self._silent = False
            self._feed_down = False
            if self.state is SyncState.SYNCED and self.stale_reason is not None:
                self._refresh()
        return self._drain()

    def on_snapshot(self, data: Mapping[str, Any] | Snapshot | bytes | str) -> list[Output]:
        """A snapshot (the exchange's ``data``, as JSON text, a dict or parsed) is available.

        Ignored while synced; else used if recent enough (see the module doc),
        otherwise a new :class:`NeedSnapshot` is output. A snapshot that cannot
        be parsed or is crossed is rejected the same way.
        """
        self._snapshot(data)
        return self._drain()

    def on_checkpoint(self, state: Mapping[str, Any], stream_id: str) -> list[Output]:
        """Restore the book from a checkpoint saved at ``stream_id`` (:meth:`OrderBook.to_state`).

        The caller then reads the stream after ``stream_id``. Only accepted
        before the synchroniser has a book; a bad checkpoint leaves it waiting
        for a snapshot.
        """
        if self.state is not SyncState.STARTING or self.book is not None:
            raise RuntimeError("a checkpoint can only be restored before anything else")
        try:
            book = OrderBook.from_state(state)
            if book.symbol != self.symbol:
                raise MessageError(f"checkpoint of {book.symbol}, not {self.symbol}")
            book.check()
        except (MessageError, IntegrityError) as exc:
            self._request(f"bad checkpoint: {exc}")
            return self._drain()
        self.book = book
        self.stats.checkpoints_used += 1
        self.last_stream_id = stream_id
        self._trust(book.sequence)
        self._become_synced()
        return self._drain()

    # ------------------------------------------------------------------ internals

    def _drain(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def _needed(self) -> int:
        if self._buffer:
            first = min(b.msg.sequence for b in self._buffer)
            return max(self._floor, first - 1)
        return self._floor

    def _request(self, reason: str) -> None:
        self.stats.snapshot_requests += 1
        self._out.append(NeedSnapshot(self._needed(), reason))

    def _entry(self, stream_id: str, fields: Mapping[Any, Any]) -> None:
        raw = fields.get(FIELD_MSG)
        if raw is None:
            raw = fields.get(FIELD_MSG.encode())
        if raw is not None:
            self._message(raw, stream_id)
            return
        ctl = fields.get(FIELD_CTL)
        if ctl is None:
            ctl = fields.get(FIELD_CTL.encode())
        if ctl is not None:
            text = {_text(k): _text(v) for k, v in fields.items()}
            self._control(_text(ctl), stream_id, text)
            return
        self.last_stream_id = stream_id
        self.stats.refused += 1
        described = ",".join(sorted(_text(k) for k in fields))
        self._out.append(DeadLetter("", f"entry has neither msg nor ctl (fields: {described})",
                                    stream_id))

    def _message(self, raw: bytes | str, stream_id: str) -> None:
        self.last_stream_id = stream_id
        stats = self.stats
        stats.messages += 1
        try:
            msg = parse_message(raw)
            if isinstance(msg, Control):
                raise MessageError(f"{msg.type} is not a level3v2 data message")
            if msg.symbol != self.symbol:
                raise MessageError(f"message for {msg.symbol} in the {self.symbol} stream")
        except MessageError as exc:
            stats.refused += 1
            self._out.append(DeadLetter(raw, exc.reason, stream_id))
            return
        seq = msg.sequence
        verdict = self._guard.check(seq)
        if verdict is Verdict.IMPLAUSIBLE:
            stats.refused += 1
            stats.implausible += 1
            self._out.append(DeadLetter(raw, self._implausible(seq), stream_id))
            return
        if verdict is Verdict.REBASE and self.state is not SyncState.SYNCED:
            # The stream really moved far away: what was buffered belongs to the old one.
            self._drop_far(seq)
            self._floor = 0
        if self.state is SyncState.SYNCED:
            self._apply_synced(msg, raw, stream_id)
        else:
            if len(self._buffer) == self._buffer.maxlen:
                stats.overflow += 1
            self._buffer.append(_Buffered(msg, stream_id))

    def _apply_synced(self, msg: DataMessage, raw: bytes | str, stream_id: str) -> None:
        book = self.book
        assert book is not None
        try:
            applied = book.apply(msg)
        except SequenceGap as exc:
            self.stats.gaps += 1
            reason = f"sequence gap: expected {exc.expected}, got {exc.got}"
            self._lose(reason)
            self._buffer.append(_Buffered(msg, stream_id))
            self._request(reason)
            return
        except IntegrityError as exc:
            self.stats.integrity_errors += 1
            # The book or this message is wrong: only a snapshot that includes it will do.
            self._floor = max(self._floor, msg.sequence)
            reason = f"integrity error: {exc.reason}"
            self._lose(reason)
            self._request(reason)
            return
        except MessageError as exc:  # pragma: no cover - kind and symbol checked above
            self.stats.refused += 1
            self._out.append(DeadLetter(raw, exc.reason, stream_id))
            return
        if applied:
            self._applied(msg.sequence, msg.ts, stream_id)
            if self.stale_reason is not None:  # contiguous with the book: current again
                self._refresh()
        else:
            self.stats.stale += 1

    def _refresh(self) -> None:
        assert self.book is not None
        self.stale_reason = None
        self._feed_down = self._silent = False  # a message came: the feed is connected
        self._out.append(BecameSynced(self.book.sequence))

    def _applied(self, sequence: int, ts: int, stream_id: str) -> None:
        self.stats.applied += 1
        if self.applied_ts is not None:
            self.applied_ts.append(ts)
        self.last_applied_id = stream_id
        out = self._out
        if out and type(last := out[-1]) is Applied:
            last.count += 1
            last.sequence = sequence
            last.stream_id = stream_id
        else:
            out.append(Applied(1, sequence, stream_id))

    def _control(self, ctl: str, stream_id: str, fields: Mapping[str, str]) -> None:
        self.last_stream_id = stream_id
        if ctl == CTL_CONNECTED:
            # The stream may have a gap across a reconnection; the sequence check
            # on the next message decides (contiguous: nothing lost).
            self.stats.reconnects += 1
            self._feed_down = self._silent = False
        elif ctl == CTL_DISCONNECTED:
            self.stats.disconnects += 1
            self._feed_down = True
            self._silent = False
            self._down_reason = ("the feed lost the exchange ("
                                 + (fields.get("reason") or "no reason given")[:200] + ")")
            if self.state is SyncState.SYNCED and self.stale_reason is None:
                self._go_stale()
        elif ctl == CTL_GAP:
            self.stats.gaps += 1
            if self.state is SyncState.SYNCED:
                assert self.book is not None
                self._floor = max(self._floor, self.max_sequence + 1)
                reason = "the feed dropped messages (ctl=gap)"
                self._lose(reason)
                self._request(reason)
            else:
                # Whatever we buffer before this point cannot bridge the loss.
                self._floor = max(self._floor, self.max_sequence + 1)
                self._buffer.clear()
        elif ctl == CTL_SNAPSHOT:
            seq: int | None
            try:
                seq = int(fields["sequence"])
            except (KeyError, ValueError):
                seq = None
            if self.state is not SyncState.SYNCED:
                if seq is None or seq >= self._needed():
                    self._out.append(FetchSnapshot(seq))
            elif (self.stale_reason is not None and not self._feed_down
                  and self.book is not None and seq == self.book.sequence):
                # The exchange, asked after the reconnection, is where the book is.
                self._refresh()
        # Other control kinds are informational for this consumer.

    def _snapshot(self, data: Mapping[str, Any] | Snapshot | bytes | str) -> None:
        if self.state is SyncState.SYNCED:
            return
        stats = self.stats
        try:
            snap = data if isinstance(data, Snapshot) else parse_snapshot(data)
            if snap.symbol != self.symbol:
                raise MessageError(f"snapshot of {snap.symbol}, not {self.symbol}")
        except MessageError as exc:
            stats.snapshots_rejected += 1
            self._request(f"bad snapshot: {exc.reason}")
            return
        needed = self._needed()
        if snap.sequence < needed:
            stats.snapshots_rejected += 1
            self._request(f"snapshot at {snap.sequence} is too old (need {needed})")
            return
        try:
            book = OrderBook.from_snapshot(snap)
        except IntegrityError as exc:
            stats.snapshots_rejected += 1
            self._floor = max(self._floor, snap.sequence + 1)
            self._request(f"bad snapshot: {exc.reason}")
            return
        stats.snapshots_used += 1
        self.book = book
        self._trust(book.sequence)
        self._drop_far(book.sequence)
        buffered = sorted(self._buffer, key=_sequence_of)
        self._buffer.clear()
        conflict = _conflicting_sequence(buffered)
        if conflict is not None and conflict > book.sequence:
            # Two different messages claim one sequence: one of them is forged or
            # corrupt, and nothing says which. Only a snapshot past it is safe.
            stats.snapshots_rejected += 1
            self._floor = max(self._floor, conflict)
            self._buffer.extend(b for b in buffered if b.msg.sequence > conflict)
            self.book = None
            self._request(f"two different messages carry sequence {conflict}")
            return
        start = 0
        while start < len(buffered) and buffered[start].msg.sequence <= book.sequence:
            start += 1
        stats.dropped += start
        for i in range(start, len(buffered)):
            item = buffered[i]
            msg = item.msg
            try:
                applied = book.apply(msg)
            except SequenceGap as exc:
                stats.gaps += 1
                # Keep the hole's far side; a snapshot newer than it is needed.
                self._buffer.extend(buffered[i:])
                self.book = None
                self._request(f"hole in the buffered stream: expected {exc.expected}, "
                              f"got {exc.got}")
                return
            except IntegrityError as exc:
                stats.integrity_errors += 1
                self._floor = max(self._floor, msg.sequence)
                self._buffer.extend(buffered[i + 1:])
                self.book = None
                self._request(f"integrity error while replaying: {exc.reason}")
                return
            if applied:
                self._applied(msg.sequence, msg.ts, item.stream_id)
            else:
                stats.stale += 1
        self._become_synced()

    def _become_synced(self) -> None:
        assert self.book is not None
        self.state = SyncState.SYNCED
        self.stale_reason = None
        self._floor = 0
        self._out.append(BecameSynced(self.book.sequence))
        if self._feed_down:  # right at its sequence, but the exchange may be past it
            self._go_stale()

    def _go_stale(self) -> None:
        assert self.book is not None
        self.stale_reason = (f"{self._down_reason}; "
                             f"last sequence {self.book.sequence}")
        self._out.append(BecameStale(self.stale_reason))

    def _trust(self, sequence: int) -> None:
        """A snapshot or checkpoint at ``sequence`` (trusted): the position is near it."""
        position = self._guard.position
        if position is None or abs(position - sequence) > self._guard.max_jump:
            self._guard.reset(sequence)
        else:
            self._guard.advance(sequence)

    def _implausible(self, sequence: int) -> str:
        return (f"implausible sequence {sequence}: more than {self._guard.max_jump} from the "
                f"stream's position {self._guard.position}")

    def _drop_far(self, sequence: int) -> None:
        """Refuse the buffered messages implausibly far from ``sequence``."""
        limit = self._guard.max_jump
        far = [b for b in self._buffer if abs(b.msg.sequence - sequence) > limit]
        if not far:
            return
        kept = [b for b in self._buffer if abs(b.msg.sequence - sequence) <= limit]
        self._buffer.clear()
        self._buffer.extend(kept)
        for item in far:
            self.stats.refused += 1
            self.stats.implausible += 1
            # The buffer keeps parsed messages only: the entry id says where the raw one is.
            self._out.append(DeadLetter(f"(a {type(item.msg).__name__} message; see the "
                                        f"stream entry)", self._implausible(item.msg.sequence),
                                        item.stream_id))

    def _lose(self, reason: str) -> None:
        self.state = SyncState.SYNCING
        self.stale_reason = None
        self.stats.resyncs += 1
        self.book = None
        self._buffer.clear()
        self._out.append(BecameUnsynced(reason))


def _sequence_of(item: _Buffered) -> int:
    return item.msg.sequence


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _conflicting_sequence(buffered: list[_Buffered]) -> int | None:
    """The highest sequence that two *different* buffered messages share (sorted input)."""
    found = None
    for a, b in itertools.pairwise(buffered):
        if a.msg.sequence == b.msg.sequence and a.msg != b.msg:
            found = a.msg.sequence
    return found
