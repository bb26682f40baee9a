"""Where a sequenced stream stands, robust to a sequence that cannot be true (pure, no I/O).

Every level3v2 message carries a per-symbol ``sequence`` that grows by exactly
one per message. A consumer keeps its *position* (the highest sequence it has
taken) and classifies each new sequence against it (:class:`Verdict`). The
usual cases are ``NEXT``, ``GAP`` (messages missing) and ``STALE`` (a
duplicate or a replay).

One frame must not be able to wedge a consumer: a sequence such as
``2**63 - 1`` (a corrupt or forged frame) taken as the position would make
every genuine message after it look stale, and a gap could never be seen
again. So a sequence more than ``max_jump`` away from the position, in either
direction, is **implausible**: it is refused and the position does not move.
The stream may really have moved that far (a venue restart, a consumer down
for hours): then the messages that follow are far from the position *and near
each other*, and the second one that is within ``window`` of a refused one
**corroborates** it: the verdict is ``REBASE`` and the position moves there. A
lone bad frame is never corroborated (a copy of the same sequence does not
count: a frame delivered on two lines is still one frame), and if two crafted
frames do make the position jump, the genuine stream, far from them and
contiguous, moves it back the same way.

:class:`SequenceGuard` is used by the feed's arbitration, the book's
synchroniser and the order monitor, each with the default bounds.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final

__all__ = ["CORROBORATION_WINDOW", "MAX_SEQUENCE_JUMP", "SequenceGuard", "Verdict"]

#: Farthest a sequence may be from the position and still be believed on its own.
#: Ten million messages is hours of a busy contract: a consumer that was away
#: longer than that pays one refused message (the next one corroborates it).
MAX_SEQUENCE_JUMP: Final = 10_000_000
#: How near each other two far sequences must be for one to corroborate the other.
CORROBORATION_WINDOW: Final = 1_000
#: Far sequences remembered, awaiting corroboration (the oldest forgotten first).
_FAR_MEMORY: Final = 16


class Verdict(enum.Enum):
    """How a sequence stands against the position."""

    #: No position yet: this sequence becomes it.
    FIRST = "first"
    #: Exactly position + 1.
    NEXT = "next"
    #: Ahead by more than one, within ``max_jump``: messages are missing.
    GAP = "gap"
    #: At or behind the position, within ``max_jump``: a duplicate or a replay.
    STALE = "stale"
    #: More than ``max_jump`` away, not corroborated: refuse it; the position holds.
    IMPLAUSIBLE = "implausible"
    #: Far away but corroborated by a refused neighbour: the stream moved; so does the position.
    REBASE = "rebase"


class SequenceGuard:
    """A position in a sequenced stream and the verdict on each new sequence (module doc).

    :meth:`check` classifies a sequence and moves the position for ``FIRST``,
    ``NEXT``, ``GAP`` and ``REBASE`` (when ``advance``); :meth:`reset` sets the
    position from a trusted source (a snapshot, a checkpoint).
    """

    __slots__ = ("_far", "max_jump", "position", "window")

    def __init__(self, position: int | None = None, *, max_jump: int = MAX_SEQUENCE_JUMP,
                 window: int = CORROBORATION_WINDOW) -> None:
        if max_jump < 1 or window < 1:
            raise ValueError("max_jump and window must be >= 1")
        #: The highest sequence taken (``None``: nothing yet).
        self.position = position
        self.max_jump = max_jump
        self.window = window
        self._far: deque[int] = deque(maxlen=_FAR_MEMORY)

    def classify(self, sequence: int) -> Verdict:
        """The verdict on ``sequence``, changing nothing."""
        position = self.position
        if position is None:
            return Verdict.FIRST
        if sequence == position + 1:
            return Verdict.NEXT
        distance = sequence - position
        if -self.max_jump <= distance <= self.max_jump:
            return Verdict.GAP if distance > 0 else Verdict.STALE
        if any(f != sequence and abs(sequence - f) <= self.window for f in self._far):
            return Verdict.REBASE
        return Verdict.IMPLAUSIBLE

    def check(self, sequence: int, *, advance: bool = True) -> Verdict:
        """The verdict on ``sequence``; the position moves to it unless ``STALE``/``IMPLAUSIBLE``.

        An implausible sequence is remembered so that a neighbour can corroborate
        it. With ``advance=False`` the position stays where it is (the caller
        moves it with :meth:`advance`, e.g. once a held message is released).
        """
        verdict = self.classify(sequence)
        if verdict is Verdict.IMPLAUSIBLE:
            if sequence not in self._far:
                self._far.append(sequence)
        elif verdict is Verdict.REBASE:
            self._far.clear()
            if advance:
                self.position = sequence
        elif verdict is not Verdict.STALE and advance:
            self.position = sequence
        return verdict

    def advance(self, sequence: int) -> None:
        """Move the position forward to ``sequence`` (never back)."""
        if self.position is None or sequence > self.position:
            self.position = sequence

    def reset(self, position: int | None) -> None:
        """Set the position from a trusted source; forget the far sequences."""
        self.position = position
        self._far.clear()

    def far_neighbours(self, sequence: int) -> list[int]:
        """Remembered far sequences within ``window`` of ``sequence`` (itself excluded)."""
        return [f for f in self._far if f != sequence and abs(sequence - f) <= self.window]
