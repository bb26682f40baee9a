"""Line arbitration: several copies of one symbol's feed in, one gap-free stream out (pure).

The feed reads each symbol on ``FEED_LINES`` independent WebSocket connections
(*lines*), as exchanges' own market-data practice does with its A and B lines.
A message lost on one line is usually delivered by another, a few milliseconds
apart. :class:`Arbiter` merges the lines of one symbol by ``sequence``:

* each sequence is released **once and in order** (the first valid copy wins;
  later copies are duplicates and are dropped);
* a message ahead of the next expected sequence is **held** while the hole
  before it may still be filled by another line; the hole is declared a real
  gap only when no line delivered it within ``wait`` seconds of the hole
  becoming visible (:meth:`Arbiter.expire`), and the held messages are
  released after it, so that consumers see the jump and resync;
* a sequence implausibly far from the position (:mod:`kumex_l3.sequence`) is
  held aside: it is released only if another far sequence near it
  corroborates it (the stream really moved, e.g. a venue restart), else it is
  **refused** after ``far_hold`` seconds (a :class:`Refused` output for the
  dead-letter stream); it never moves the position.

Time comes in as ``now`` (monotonic seconds), nothing is awaited: the feed's
line readers call :meth:`Arbiter.seen` then :meth:`Arbiter.offer` for each
frame, and a timer calls :meth:`Arbiter.expire` at :meth:`Arbiter.due`.

Counters (:class:`ArbiterStats`) tell what redundancy bought: per line the
messages it delivered, those it delivered first, the sequences it skipped and
how many of those another line had already delivered (*covered*); for the
arbitration the holes closed by a later copy and the real gaps declared.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeAlias

from kumex_l3.sequence import CORROBORATION_WINDOW, MAX_SEQUENCE_JUMP, SequenceGuard, Verdict

__all__ = [
    "DEFAULT_FAR_HOLD_S",
    "DEFAULT_MAX_PENDING",
    "FILL_BUCKETS",
    "Arbiter",
    "ArbiterStats",
    "GapDeclared",
    "Output",
    "Rebased",
    "Refused",
    "Released",
]

#: Messages held ahead of a hole at most; past it the hole is declared at once.
DEFAULT_MAX_PENDING: Final = 100_000
#: How long an implausible sequence waits for corroboration before it is refused.
DEFAULT_FAR_HOLD_S: Final = 2.0
#: Far messages held at most (the oldest is refused first).
_MAX_FAR: Final = 16
#: Upper bounds (seconds) of the buckets in which hole fill times are counted.
FILL_BUCKETS: Final[tuple[float, ...]] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                                          0.2, 0.5, 1.0)
#: Sequences a line skipped ahead of the position, tracked at most in one go.
_TRACK_MAX: Final = 10_000
#: Declared gaps remembered to tell a line's skipped sequences covered or lost.
_GAP_MEMORY: Final = 256


class Released(NamedTuple):
    """The next message of the merged stream: write it."""

    sequence: int
    text: str
    line: int


class Refused(NamedTuple):
    """A message that will not be written (an implausible sequence, never corroborated)."""

    sequence: int
    text: str
    line: int
    reason: str


class GapDeclared(NamedTuple):
    """No line delivered sequences ``first..last``: they are lost (consumers will resync)."""

    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1


class Rebased(NamedTuple):
    """The stream moved far away from the position (corroborated): it continues at ``to``."""

    since: int | None
    to: int


Output: TypeAlias = Released | Refused | GapDeclared | Rebased


@dataclass(slots=True)
class ArbiterStats:
    """Counters since the arbiter was made; lists are indexed by line."""

    lines: int
    #: Data messages each line delivered (valid or not, duplicates included).
    messages: list[int] = field(default_factory=list)
    #: Messages released from each line (it delivered them first).
    first: list[int] = field(default_factory=list)
    #: Sequences each line skipped over (its own gaps: drops, its reconnects).
    missed: list[int] = field(default_factory=list)
    #: Of those, sequences another line had delivered already (covered by redundancy).
    covered: list[int] = field(default_factory=list)
    #: Holes of the merged stream each line filled (a copy arrived in time).
    filled: list[int] = field(default_factory=list)
    #: Copies dropped: a sequence already released or held.
    duplicates: int = 0
    #: Holes of the merged stream filled before the wait ran out.
    holes_closed: int = 0
    #: Holes declared lost after the wait (each one makes consumers resync).
    real_gaps: int = 0
    #: Messages lost in those gaps.
    lost: int = 0
    #: Implausible sequences refused.
    refused: int = 0
    #: Corroborated jumps far from the position.
    rebases: int = 0
    #: Holes closed, counted by how long they had been visible (:data:`FILL_BUCKETS`,
    #: then one more bucket for anything longer), and the sum of those times.
    fill_buckets: list[int] = field(default_factory=lambda: [0] * (len(FILL_BUCKETS) + 1))
    fill_seconds: float = 0.0
    #: The longest a hole waited before a copy filled it.
    fill_max: float = 0.0

    def __post_init__(self) -> None:
        for name in ("messages", "first", "missed", "covered", "filled"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.lines)


class _Held(NamedTuple):
    text: str
    line: int
    arrived: float


class Arbiter:
    """Merges ``lines`` copies of one symbol's stream (see the module docstring).

    ``position``: the last sequence already written (e.g. read from Redis at
    start), or ``None`` to take the first message as it comes.
    """

    def __init__(self, symbol: str, lines: int, *, wait: float, position: int | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, far_hold: float = DEFAULT_FAR_HOLD_S,
                 max_jump: int = MAX_SEQUENCE_JUMP,
                 window: int = CORROBORATION_WINDOW) -> None:
        if lines < 1:
            raise ValueError("lines must be >= 1")
        if wait < 0 or far_hold < 0:
            raise ValueError("wait and far_hold must be >= 0")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.symbol = symbol
        self.lines = lines
        self.wait = wait
        self.far_hold = far_hold
        self.max_pending = max_pending
        self._guard = SequenceGuard(position, max_jump=max_jump, window=window)
        self._pending: dict[int, _Held] = {}
        self._heap: list[int] = []
        self._hole_since = 0.0
        self._far: dict[int, _Held] = {}
        # Far sequences seen lately (held or refused already): a neighbour corroborates.
        self._far_seen: deque[int] = deque(maxlen=_MAX_FAR)
        self._line_last: list[int | None] = [None] * lines
        # Per line: sequences it skipped that no line had delivered yet (then: covered, when
        # another line's copy is released; lost, when a gap is declared over them).
        self._missing: list[set[int]] = [set() for _ in range(lines)]
        self._tracked = 0
        self._gaps: deque[tuple[int, int]] = deque(maxlen=_GAP_MEMORY)
        self.stats = ArbiterStats(lines)

    # ------------------------------------------------------------------ reading

    @property
    def position(self) -> int | None:
        """The last sequence released (``None`` before the first)."""
        return self._guard.position

    @property
    def held(self) -> int:
        """Messages held: ahead of a hole, or far and awaiting corroboration."""
        return len(self._pending) + len(self._far)

    def due(self) -> float | None:
        """When :meth:`expire` has something to do (monotonic seconds), or ``None``."""
        due: float | None = None
        if self._pending:
            due = self._hole_since + self.wait
        if self._far:
            far_due = min(h.arrived for h in self._far.values()) + self.far_hold
            due = far_due if due is None else min(due, far_due)
        return due

    # ------------------------------------------------------------------ input

    def seen(self, line: int, sequence: int) -> bool:
        """Line ``line`` delivered ``sequence``: whether it is new (worth validating and
        offering) rather than a copy of a message released or held already."""
        stats = self.stats
        stats.messages[line] += 1
        last = self._line_last[line]
        if last is None or sequence > last:
            if last is not None and sequence > last + 1 \
                    and sequence - last <= self._guard.max_jump:
                self._skipped(line, last + 1, sequence - 1)
            self._line_last[line] = sequence
        elif self._tracked and sequence in self._missing[line]:
            # Late on this line (reordered), not lost by it.
            self._missing[line].discard(sequence)
            self._tracked -= 1
            stats.missed[line] -= 1
        if (self._guard.classify(sequence) is Verdict.STALE or sequence in self._pending
                or sequence in self._far):
            stats.duplicates += 1
            return False
        return True

    def offer(self, line: int, sequence: int, text: str, now: float) -> list[Output]:
        """A new, valid message (after :meth:`seen` said so): what to write now, in order."""
        guard = self._guard
        verdict = guard.classify(sequence)
        if verdict is Verdict.NEXT or verdict is Verdict.FIRST:
            out: list[Output] = [Released(sequence, text, line)]
            self.stats.first[line] += 1
            if self._tracked:
                self._covered(sequence)
            if self._pending:
                self._closed(line, now - self._hole_since)
            guard.advance(sequence)
            if self._pending:
                self._drain(out)
            return out
        if verdict is Verdict.GAP:
            if not self._pending:
                self._hole_since = now
            self._pending[sequence] = _Held(text, line, now)
            heapq.heappush(self._heap, sequence)
            if len(self._pending) > self.max_pending:
                out = []
                self._declare(out)
                return out
            return []
        if verdict is Verdict.STALE:  # seen() said new: a caller that skipped it
            self.stats.duplicates += 1
            return []
        return self._far_message(line, sequence, text, now)

    def expire(self, now: float) -> list[Output]:
        """Declare the holes no line filled in time; refuse far messages never corroborated."""
        out: list[Output] = []
        if self._far:
            for sequence, held in list(self._far.items()):
                if now >= held.arrived + self.far_hold:
                    del self._far[sequence]
                    out.append(self._refuse(sequence, held))
        while self._pending and now >= self._hole_since + self.wait:
            self._declare(out)
        return out

    # ------------------------------------------------------------------ internals

    def _drain(self, out: list[Output]) -> None:
        """Release the held messages contiguous with the position."""
        guard, pending, heap = self._guard, self._pending, self._heap
        position = guard.position
        assert position is not None
        first = self.stats.first
        while heap:
            top = heap[0]
            if top not in pending or top <= position:
                heapq.heappop(heap)
                pending.pop(top, None)
                continue
            if top != position + 1:
                break
            heapq.heappop(heap)
            held = pending.pop(top)
            out.append(Released(top, held.text, held.line))
            first[held.line] += 1
            if self._tracked:
                self._covered(top)
            position = top
        guard.advance(position)
        if pending:
            # The next hole became visible when the earliest message beyond it arrived.
            self._hole_since = min(h.arrived for h in pending.values())

    def _declare(self, out: list[Output]) -> None:
        """The hole at the position is lost: skip to the first held message."""
        heap, pending = self._heap, self._pending
        while heap and heap[0] not in pending:
            heapq.heappop(heap)
        if not heap:
            pending.clear()
            return
        position = self._guard.position
        assert position is not None
        first = heap[0]
        gap = GapDeclared(position + 1, first - 1)
        self._gaps.append((gap.first, gap.last))
        if self._tracked:
            for missing in self._missing:
                lost = {s for s in missing if gap.first <= s <= gap.last}
                missing -= lost
                self._tracked -= len(lost)
        self.stats.real_gaps += 1
        self.stats.lost += gap.size
        out.append(gap)
        self._guard.advance(first - 1)
        self._drain(out)

    def _far_message(self, line: int, sequence: int, text: str, now: float) -> list[Output]:
        window = self._guard.window
        if not any(f != sequence and abs(f - sequence) <= window for f in self._far_seen):
            out: list[Output] = []
            if len(self._far) >= _MAX_FAR:
                oldest = min(self._far, key=lambda s: self._far[s].arrived)
                out.append(self._refuse(oldest, self._far.pop(oldest)))
            self._far[sequence] = _Held(text, line, now)
            if sequence not in self._far_seen:
                self._far_seen.append(sequence)
            return out
        # Corroborated: the stream is over there now. Drop the old world's held messages.
        since = self._guard.position
        self.stats.rebases += 1
        world = {f: self._far.pop(f) for f in sorted(self._far)
                 if abs(f - sequence) <= window}
        world[sequence] = _Held(text, line, now)
        self._far_seen.clear()
        self._pending.clear()
        self._heap.clear()
        for missing in self._missing:
            missing.clear()
        self._tracked = 0
        start = min(world)
        self._guard.reset(start - 1)
        out = [Rebased(since, start)]
        for seq in sorted(world):
            self._pending[seq] = world[seq]
            heapq.heappush(self._heap, seq)
        self._hole_since = now
        self._drain(out)
        return out

    def _closed(self, line: int, waited: float) -> None:
        stats = self.stats
        stats.holes_closed += 1
        stats.filled[line] += 1
        stats.fill_seconds += waited
        stats.fill_max = max(stats.fill_max, waited)
        stats.fill_buckets[bisect.bisect_left(FILL_BUCKETS, waited)] += 1

    def _refuse(self, sequence: int, held: _Held) -> Refused:
        self.stats.refused += 1
        return Refused(sequence, held.text, held.line,
                       f"implausible sequence {sequence}: more than {self._guard.max_jump} from "
                       f"the stream's position {self._guard.position}, never corroborated")

    def _skipped(self, line: int, first: int, last: int) -> None:
        """Line ``line`` jumped over ``first..last``: count them, and those already covered."""
        count = last - first + 1
        self.stats.missed[line] += count
        position = self._guard.position
        covered = 0
        if position is not None and position >= first:
            covered = min(last, position) - first + 1
            for lo, hi in self._gaps:
                overlap = min(hi, last, position) - max(lo, first) + 1
                if overlap > 0:
                    covered -= overlap
        pending = self._pending
        lo = first if position is None else max(first, position + 1)
        if lo <= last:
            ahead = range(lo, last + 1)
            if pending:
                covered += sum(1 for s in ahead if s in pending)
            # Not delivered by any line yet: covered or lost, as the next moments tell.
            if len(ahead) <= _TRACK_MAX:
                fresh = {s for s in ahead if s not in pending}
                self._missing[line] |= fresh
                self._tracked += len(fresh)
        self.stats.covered[line] += max(0, covered)

    def _covered(self, sequence: int) -> None:
        """``sequence`` was released: a line that had skipped it was covered."""
        for line, missing in enumerate(self._missing):
            if sequence in missing:
                missing.discard(sequence)
                self._tracked -= 1
                self.stats.covered[line] += 1
