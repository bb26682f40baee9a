"""Replay of a recorded level3v2 capture through the sandbox's WebSocket hub.

A capture is a text file (optionally gzip-compressed, detected by its magic
bytes) holding one raw WebSocket frame a line, exactly as received from the
exchange (what the feed stores in ``kumex:{SYM}:l3``). :class:`Replayer`
sends every data message out unchanged through :meth:`Hub.publish_raw`, in
file order:

* at the recorded pace, from the messages' ``ts`` (nanoseconds) divided by
  ``speed`` (2.0 = twice as fast), or as fast as the clients take it with
  ``speed=0`` (the replay waits while a client queue is more than half full,
  for at most ``stall_timeout_s``, so that a stuck client is dropped as slow
  rather than stalling everyone);
* pausable (:meth:`Replayer.pause`, :meth:`Replayer.resume`); paused time is
  not counted in the pace.

Lines that are not data messages (blank lines, ``welcome``/``ack``/``pong``,
text that does not parse) are skipped and counted by reason.

The replayer keeps an L3 book per symbol of what it has sent, so that
:meth:`Replayer.snapshot` answers like ``GET /api/v2/level3/snapshot`` at the
replay's current position. A capture usually starts mid-stream (its first
sequence is above 1): each symbol's book then starts **empty at
first_sequence - 1**, so it holds only orders opened within the capture
(matches, updates and dones of earlier orders change nothing). Where the
capture itself is inconsistent (a sequence gap, a message that contradicts
the book), the message is still sent as recorded, the book skips it and the
event is counted (``gaps``, ``book_errors``): the snapshot stays the best
knowledge of the replayed state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Generator
from pathlib import Path
from typing import Any, Final

from kumex_l3 import (
    Control,
    DataMessage,
    IntegrityError,
    MessageError,
    OrderBook,
    SequenceGap,
    parse_message,
)
from kumex_l3.replay import read_lines
from services.sandbox.hub import Hub

__all__ = ["Replayer", "read_capture"]

_log = logging.getLogger(__name__)

#: Poll period while waiting for clients (backpressure, subscribers).
_POLL_S: Final = 0.002
#: Most messages published between two yields to the event loop.
_CHUNK: Final = 64


def read_capture(path: str | Path) -> Generator[str, None, None]:
    """The lines of a capture (gzip or plain) without their line terminators.

    Bytes that are not UTF-8 become U+FFFD: such a line does not parse and is skipped.
    """
    for line in read_lines(path):
        yield line.decode("utf-8", errors="replace")


class Replayer:
    """Sends a capture through ``hub`` and keeps the books of what it sent.

    ``speed``: 1.0 = recorded pace, 2.0 = twice as fast, 0 = as fast as
    possible. ``wait_for_subscribers``: :meth:`run` first waits until that
    many clients hold a subscription. Symbols of the capture are added to the
    hub's symbols as they appear.
    """

    def __init__(
        self,
        source: str | Path,
        hub: Hub,
        *,
        speed: float = 1.0,
        wait_for_subscribers: int = 0,
        stall_timeout_s: float = 5.0,
    ) -> None:
        if not speed >= 0:
            raise ValueError(f"speed must be >= 0, not {speed!r}")
        if stall_timeout_s < 0:
            raise ValueError(f"stall_timeout_s must be >= 0, not {stall_timeout_s!r}")
        self.source = Path(source)
        self.hub = hub
        self.speed = float(speed)
        self.wait_for_subscribers = wait_for_subscribers
        self.stall_timeout_s = stall_timeout_s
        #: Data messages sent.
        self.published = 0
        #: Lines read so far.
        self.lines = 0
        #: Lines skipped, by reason (``blank``, ``control``, ``invalid``).
        self.skipped: Counter[str] = Counter()
        #: Sequence gaps in the capture (the book jumped over them).
        self.gaps = 0
        #: Messages that contradicted the replayed book (sent, not applied).
        self.book_errors = 0
        self.done = False
        self._books: dict[str, OrderBook] = {}
        self._running = asyncio.Event()
        self._running.set()
        self._paused_at: float | None = None
        self._paused_total = 0.0

    # ------------------------------------------------------------------ control

    @property
    def paused(self) -> bool:
        """Whether the replay is paused."""
        return not self._running.is_set()

    def pause(self) -> None:
        """Stop sending after the current message; :meth:`resume` continues."""
        if self._running.is_set():
            self._running.clear()
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        """Continue a paused replay; the pause does not count in the pace."""
        if not self._running.is_set():
            if self._paused_at is not None:
                self._paused_total += time.monotonic() - self._paused_at
                self._paused_at = None
            self._running.set()

    # ------------------------------------------------------------------ state

    @property
    def symbols(self) -> list[str]:
        """Symbols seen so far, in order of first appearance."""
        return list(self._books)

    def snapshot(self, symbol: str) -> dict[str, Any]:
        """The replayed book of ``symbol`` as ``/api/v2/level3/snapshot`` ``data``.

        ``{"symbol", "sequence", "ts", "asks": [[orderId, price, size, ts]...], "bids": [...]}``,
        each side best first and in queue order. ``KeyError`` for a symbol
        not (yet) seen in the capture.
        """
        book = self._books.get(symbol)
        if book is None:
            raise KeyError(f"symbol {symbol!r} has not appeared in the capture")
        return book.to_snapshot()

    def book(self, symbol: str) -> OrderBook:
        """The replayed book of ``symbol`` (read-only use). ``KeyError`` if unseen."""
        return self._books[symbol]

    def stats(self) -> dict[str, Any]:
        """JSON-able progress: lines, published, skipped, gaps, book errors, positions."""
        return {
            "source": self.source.name,
            "speed": self.speed,
            "lines": self.lines,
            "published": self.published,
            "skipped": dict(self.skipped),
            "gaps": self.gaps,
            "bookErrors": self.book_errors,
            "paused": self.paused,
            "done": self.done,
            "sequences": {s: b.sequence for s, b in self._books.items()},
        }

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Replay the whole capture once; returns when every message has been handed over."""
        hub = self.hub
        while hub.subscriber_count() < self.wait_for_subscribers:
            await asyncio.sleep(_POLL_S)
        start = time.monotonic()
        first_ts: int | None = None
        # Messages due now go out in runs of one symbol, up to _CHUNK, with one yield to
        # the loop a run (not one a message): the book and the hub stay in step, since
        # nothing else runs between a message's apply and its publish.
        run_symbol = ""
        run: list[str] = []
        since_yield = 0

        def publish_run() -> None:
            if run:
                hub.publish_raw(run_symbol, run)
                self.published += len(run)
                run.clear()

        try:
            with contextlib.closing(read_capture(self.source)) as lines:
                for line in lines:
                    self.lines += 1
                    msg = self._parse(line)
                    if msg is None:
                        continue
                    if first_ts is None:
                        first_ts = msg.ts
                    if not self._due_now(start, msg.ts - first_ts):
                        publish_run()
                        since_yield = 0
                        await self._until_due(start, msg.ts - first_ts)
                    symbol = msg.symbol
                    book = self._books.get(symbol)
                    if book is None:
                        book = self._books[symbol] = OrderBook(symbol, msg.sequence - 1)
                        hub.add_symbols([symbol])
                    if symbol != run_symbol:
                        publish_run()
                        run_symbol = symbol
                    run.append(line.rstrip("\r\n"))
                    self._apply(book, msg)
                    since_yield += 1
                    if since_yield >= _CHUNK:
                        publish_run()
                        since_yield = 0
                        await self._backpressure()
                publish_run()
        finally:
            publish_run()
            for symbol in self._books:
                hub.flush(symbol)
            self.done = True

    def _due_now(self, start: float, offset_ns: int) -> bool:
        """Running, and (at a recorded pace) the message's time has come."""
        if not self._running.is_set():
            return False
        if self.speed <= 0:
            return True
        return start + self._paused_total + offset_ns / 1e9 / self.speed <= time.monotonic()

    def _parse(self, line: str) -> DataMessage | None:
        """The data message of a line, or None (skipped, counted by reason)."""
        if not line.strip():
            self.skipped["blank"] += 1
            return None
        try:
            msg = parse_message(line.rstrip("\r\n"))
        except MessageError as exc:
            self.skipped["invalid"] += 1
            _log.debug("line %d skipped: %s", self.lines, exc.reason)
            return None
        if isinstance(msg, Control):
            self.skipped["control"] += 1
            return None
        return msg

    async def _until_due(self, start: float, offset_ns: int) -> None:
        """Wait while paused, and (``speed`` > 0) until the message's recorded time."""
        while True:
            if not self._running.is_set():
                await self._running.wait()
            if self.speed <= 0:
                return
            due = start + self._paused_total + offset_ns / 1e9 / self.speed
            wait = due - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def _apply(self, book: OrderBook, msg: DataMessage) -> None:
        try:
            book.apply(msg)
        except SequenceGap as exc:
            self.gaps += 1
            _log.warning("capture has a gap: %s", exc)
            book.sequence = msg.sequence - 1
            self._apply(book, msg)
        except IntegrityError as exc:
            # The message is refused before the book changes: step over it.
            self.book_errors += 1
            _log.warning("capture contradicts the replayed book: %s", exc)
            book.sequence = msg.sequence
            book.ts = msg.ts

    async def _backpressure(self) -> None:
        """Yield; while a client queue is over half full, wait (bounded) for it to drain."""
        await asyncio.sleep(0)
        hub = self.hub
        high = hub.queue_limit // 2
        if hub.max_queue_depth() <= high:
            return
        deadline = time.monotonic() + self.stall_timeout_s
        while hub.max_queue_depth() > high and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
