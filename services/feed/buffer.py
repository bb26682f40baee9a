"""The feed's in-memory queue between the socket reader and Redis (pure, no I/O).

The reader appends, the writer peeks a batch, writes it, and only then
commits it (removes it): an entry leaves memory once Redis took it.

* **Data** entries (a raw frame for a symbol's stream, with its sequence) are bounded: past
  ``bound`` data entries held, new ones are refused and counted per symbol.
* **Control** entries (``ctl=connected``, ``ctl=snapshot`` with the snapshot
  to store, ``ctl=gap``, dead letters) are rare and always accepted, so that
  what consumers need to resync is never lost.

Gaps: after a symbol lost messages, a ``ctl=gap`` entry (``reason``,
``dropped``) is queued for it as soon as there is room again, always before
that symbol's next accepted message, so its position in the stream is where
the loss happened. :meth:`FeedBuffer.settle_gaps` queues the pending ones
(the writer calls it after each successful write, i.e. once Redis is back).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Final, TypeAlias

from kumex_l3 import keys

__all__ = ["GAP_REASON_OVERFLOW", "Control", "Data", "Entry", "FeedBuffer", "gap_control"]

#: ``reason`` of the ``ctl=gap`` entries written after a buffer overflow.
GAP_REASON_OVERFLOW: Final = "buffer_overflow"


@dataclass(frozen=True, slots=True)
class Control:
    """A control entry: ``fields`` appended to stream ``key``; ``store`` first, if set.

    ``store`` is ``(string key, value, sequence)``: a ``SET`` done in the same
    command just before the ``XADD`` (the snapshot, then its ``ctl=snapshot`` entry).
    ``maxlen`` overrides the writer's ``MAXLEN ~`` for this stream (dead letters).
    ``fenced``: written only while this feed holds the symbol's writer lease
    (entries of the symbol's own stream); ``store`` is written only if newer than
    the value already stored (a snapshot, compared by its ``sequence``).
    """

    key: str
    fields: Mapping[str, str | bytes]
    store: tuple[str, bytes, int] | None = None
    maxlen: int | None = None
    fenced: bool = False


#: A raw data frame and its sequence.
Data: TypeAlias = tuple[int, str]
#: ``(symbol, payload)``: a payload that is a ``tuple`` is a data frame (:data:`Data`).
Entry: TypeAlias = tuple[str, "Data | Control"]


def gap_control(symbol: str, dropped: int, reason: str = GAP_REASON_OVERFLOW) -> Control:
    """The ``ctl=gap`` entry telling consumers that ``dropped`` messages are missing."""
    return Control(keys.l3_stream(symbol), {keys.FIELD_CTL: "gap", "reason": reason,
                                            "dropped": str(dropped)}, fenced=True)


class FeedBuffer:
    """A FIFO of entries holding at most ``bound`` data entries (see the module docstring)."""

    def __init__(self, bound: int) -> None:
        if bound <= 0:
            raise ValueError("bound must be > 0")
        self.bound = bound
        self._queue: deque[Entry] = deque()
        self._data = 0  # data entries held
        self._pending_gaps: dict[str, int] = {}
        #: Messages refused since start, per symbol.
        self.dropped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def data_count(self) -> int:
        """Data entries held (never above ``bound``)."""
        return self._data

    @property
    def pending_gaps(self) -> dict[str, int]:
        """Messages dropped per symbol whose ``ctl=gap`` is not queued yet."""
        return dict(self._pending_gaps)

    def put(self, symbol: str, sequence: int, text: str) -> bool:
        """Queue a raw data frame; ``False`` (and counted) when the buffer is full."""
        if self._data >= self.bound:
            self._pending_gaps[symbol] = self._pending_gaps.get(symbol, 0) + 1
            self.dropped[symbol] = self.dropped.get(symbol, 0) + 1
            return False
        if self._pending_gaps:
            missing = self._pending_gaps.pop(symbol, 0)
            if missing:
                self._queue.append((symbol, gap_control(symbol, missing)))
        self._queue.append((symbol, (sequence, text)))
        self._data += 1
        return True

    def put_control(self, symbol: str, control: Control) -> None:
        """Queue a control entry (always accepted)."""
        self._queue.append((symbol, control))

    def lost(self, symbol: str, count: int = 1) -> None:
        """Record messages lost after they were accepted (Redis refused them): a gap to mark."""
        self._pending_gaps[symbol] = self._pending_gaps.get(symbol, 0) + count
        self.dropped[symbol] = self.dropped.get(symbol, 0) + count

    def settle_gaps(self) -> list[str]:
        """Queue the pending ``ctl=gap`` entries if there is room; the symbols concerned."""
        if not self._pending_gaps or self._data >= self.bound:
            return []
        settled = list(self._pending_gaps)
        for symbol, missing in self._pending_gaps.items():
            self._queue.append((symbol, gap_control(symbol, missing)))
        self._pending_gaps.clear()
        return settled

    def peek(self, limit: int) -> list[Entry]:
        """The first ``limit`` entries, left in place."""
        return list(islice(self._queue, limit))

    def commit(self, count: int) -> None:
        """Remove the first ``count`` entries (they were written)."""
        queue = self._queue
        for _ in range(count):
            _, payload = queue.popleft()
            if type(payload) is tuple:
                self._data -= 1
