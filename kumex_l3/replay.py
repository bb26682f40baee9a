"""``python -m kumex_l3 replay CAPTURE``: rebuild a book from a capture, as fast as it goes.

A capture is what the feed writes with ``FEED_CAPTURE`` (one raw frame a line,
gzip when it starts with gzip's magic bytes, several symbols mixed). The book
starts from ``--snapshot`` (the ``data`` of ``GET /api/v2/level3/snapshot``, or
the whole response) and takes every frame of its symbol after it through
:meth:`~kumex_l3.book.OrderBook.apply_many`, with every check of the live
book: strict sequence, unknown orders counted, over-fills and crossed opens
refused. Without a snapshot the book starts empty just before the first
frame: right only for a capture that began with the book (a sandbox started
fresh); orders that rested before it are missing.

Every ``--every N`` messages applied it can write a sample to a CSV file:
``--depth K`` levels a side (``sequence,ts,side,level,price,size,orders``) or
the queue place of the orders named by ``--order`` (``sequence,ts,orderId,
side,price,size,position,sizeAhead``; an order not resting writes nothing).
``--out FILE`` writes the final book as a snapshot ``data`` object.

It stops with a clear message (exit status 1) at a sequence gap (the capture
lost messages: only a later snapshot can go on) or a frame that contradicts
the book; frames that do not parse are counted and skipped, as the book
service dead-letters them. The summary (messages, msg/s) goes to stderr, with
a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kumex_l3.book import OrderBook
from kumex_l3.errors import IntegrityError, MessageError, ReplayError, SequenceGap
from kumex_l3.messages import TOPIC_PREFIX, Control, format_qty, parse_message

__all__ = ["Replay", "ReplayError", "main", "read_lines"]

_GZIP_MAGIC: Final = b"\x1f\x8b"
#: Frames handed to apply_many at once (sampling cuts a batch where a sample is due).
_BATCH: Final = 4096
#: Bytes of lines read at once (and the reader's buffer).
_CHUNK_BYTES: Final = 1 << 20


def _open(path: Path) -> tuple[io.BufferedIOBase, io.BufferedReader]:
    """(lines, raw file): the raw file's position is the progress through a gzip file."""
    raw = path.open("rb")
    if raw.read(2) == _GZIP_MAGIC:
        raw.seek(0)
        unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
        return io.BufferedReader(unzipped, _CHUNK_BYTES), raw
    raw.seek(0)
    return raw, raw


def read_lines(path: str | Path) -> Iterator[bytes]:
    """The lines of a capture (gzip or plain), without their line terminators."""
    lines, raw = _open(Path(path))
    with raw, lines:
        for line in lines:
            yield line.rstrip(b"\r\n")


def load_snapshot(path: Path) -> OrderBook:
    """A book from a snapshot file: the REST response, or its ``data`` object."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ReplayError(f"snapshot {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), dict):
        data = data["data"]
    try:
        return OrderBook.from_snapshot(data)
    except (MessageError, IntegrityError) as exc:
        raise ReplayError(f"snapshot {path}: {exc}") from None


@dataclass
class Replay:
    """One replay of one symbol; :meth:`feed` takes the capture's lines in order."""

    symbol: str
    book: OrderBook | None = None
    every: int = 0
    depth: int = 0
    orders: Sequence[str] = ()
    samples: Any = None  # a csv.writer
    #: Lines of this symbol seen, applied, skipped as already in the book, refused.
    lines: int = 0
    applied: int = 0
    stale: int = 0
    refused: int = 0
    #: Why frames were refused (first words of the reason), with counts.
    reasons: dict[str, int] = field(default_factory=dict)
    #: Wall time of the replay, seconds.
    seconds: float = 0.0
    _pending: list[bytes] = field(default_factory=list)
    _since_sample: int = 0

    def __post_init__(self) -> None:
        self._marker = (TOPIC_PREFIX + self.symbol + '"').encode()
        self._batch = _BATCH

    def feed(self, lines: Iterable[bytes]) -> None:
        """Take lines of the capture in order (other symbols' lines are passed over).

        A line keeps its terminator: JSON allows the white space.
        """
        marker, batch = self._marker, self._batch
        pending = self._pending
        for line in lines:
            if marker in line:
                pending.append(line)
                if len(pending) >= batch:
                    self.flush()
                    pending = self._pending

    def flush(self) -> None:
        """Apply what is pending."""
        self.lines += len(self._pending)
        self._apply(self._pending)
        self._pending = []

    def _apply(self, frames: list[bytes]) -> None:
        if not frames:
            return
        if self.book is None:
            self.book = self._empty_book(frames)
        book = self.book
        sampling = self.every > 0 and self.samples is not None
        i = 0
        while i < len(frames):
            # With sampling, never past the message that completes the next N.
            end = i + self.every - self._since_sample if sampling else len(frames)
            before = book.stats.stale
            taken = book.apply_many(frames[i:end])
            stale = book.stats.stale - before
            self.stale += stale
            self.applied += taken - stale
            self._since_sample += taken - stale
            if sampling and self._since_sample >= self.every:
                self._since_sample = 0
                self._sample()
            i += taken
            if i < min(end, len(frames)):
                self._refuse(book, frames[i])
                i += 1

    def _refuse(self, book: OrderBook, frame: bytes) -> None:
        """The frame apply_many stopped at: skip what the live book would dead-letter."""
        try:
            msg = parse_message(frame)
            if isinstance(msg, Control):
                raise MessageError(f"{msg.type} is not a data message")
            if msg.symbol != self.symbol:  # the topic named us, the data another symbol
                raise MessageError(f"message for {msg.symbol}")
            book.apply(msg)
        except MessageError as exc:
            self.refused += 1
            key = exc.reason.split(":")[0][:60]
            self.reasons[key] = self.reasons.get(key, 0) + 1
        except SequenceGap as exc:
            raise ReplayError(
                f"{self.symbol}: the capture has a gap after sequence {exc.expected - 1} "
                f"(next is {exc.got}): {exc.got - exc.expected} messages were never "
                f"captured; replay from a snapshot taken after it") from None
        except IntegrityError as exc:
            raise ReplayError(f"{self.symbol}: {exc}") from None
        else:  # pragma: no cover - apply_many stops only where apply raises
            raise ReplayError(f"{self.symbol}: apply_many stopped at a frame apply takes")

    def _empty_book(self, frames: list[bytes]) -> OrderBook:
        for frame in frames:
            try:
                msg = parse_message(frame)
            except MessageError:
                continue
            if not isinstance(msg, Control) and msg.symbol == self.symbol:
                return OrderBook(self.symbol, sequence=msg.sequence - 1, ts=msg.ts)
        return OrderBook(self.symbol)

    def _sample(self) -> None:
        book, out = self.book, self.samples
        assert book is not None and out is not None
        if self.depth > 0:
            for side, levels in zip(("buy", "sell"), book.depth(self.depth), strict=True):
                for i, level in enumerate(levels, 1):
                    out.writerow((book.sequence, book.ts, side, i, level.price,
                                  format_qty(level.size), level.orders))
        for order_id in self.orders:
            pos = book.queue_position(order_id)
            if pos is not None:
                out.writerow((book.sequence, book.ts, order_id, pos.side, pos.price_text,
                              format_qty(pos.size), pos.position, format_qty(pos.size_ahead)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kumex_l3 replay",
        description="Rebuild a book from a capture (FEED_CAPTURE) and a snapshot.")
    p.add_argument("capture", type=Path, help="capture file (.jsonl, or gzip)")
    p.add_argument("--snapshot", type=Path,
                   help="L3 snapshot JSON (the REST answer or its data); default: empty book")
    p.add_argument("--symbol", help="symbol to rebuild (default: the snapshot's, else the "
                   "first in the capture)")
    p.add_argument("--every", type=int, default=0, metavar="N",
                   help="write a sample every N messages applied (with --samples)")
    p.add_argument("--samples", type=Path, metavar="CSV", help="file for the samples")
    p.add_argument("--depth", type=int, default=0, metavar="K",
                   help="sample K price levels a side")
    p.add_argument("--order", action="append", default=[], metavar="ORDER_ID",
                   help="sample this order's queue place (repeatable)")
    p.add_argument("--out", type=Path, metavar="JSON",
                   help="write the final book here (a snapshot data object)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _first_symbol(path: Path) -> str | None:
    for line in read_lines(path):
        try:
            msg = parse_message(line)
        except MessageError:
            continue
        if not isinstance(msg, Control):
            return msg.symbol
    return None


class _NoProgress:
    """Stands for rich's Progress when there is no terminal (or no rich)."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress(show: bool) -> Any:
    """A progress bar on stderr (rich), or a stand-in when not shown or rich is missing."""
    if not show:
        return _NoProgress()
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    except ModuleNotFoundError:
        return _NoProgress()
    return Progress(TextColumn("replay {task.fields[symbol]}"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}% {task.fields[rate]}"),
                    TimeRemainingColumn(), transient=True)


def run(args: argparse.Namespace) -> Replay:
    """The replay ``args`` describe; raises ReplayError, OSError."""
    book = load_snapshot(args.snapshot) if args.snapshot is not None else None
    symbol = args.symbol or (book.symbol if book is not None else _first_symbol(args.capture))
    if symbol is None:
        raise ReplayError(f"{args.capture}: no data message in the capture")
    if book is not None and book.symbol != symbol:
        raise ReplayError(f"the snapshot is of {book.symbol}, not {symbol}")
    if (args.every > 0) != (args.samples is not None) or (
            args.samples is not None and args.depth <= 0 and not args.order):
        raise ReplayError("sampling wants --every N, --samples CSV and --depth K or --order")
    sample_file = args.samples.open("w", newline="") if args.samples is not None else None
    writer = None
    if sample_file is not None:
        writer = csv.writer(sample_file)
        writer.writerow(("sequence", "ts", "side", "level", "price", "size", "orders")
                        if args.depth > 0 else
                        ("sequence", "ts", "orderId", "side", "price", "size", "position",
                         "sizeAhead"))
    replay = Replay(symbol, book, args.every, args.depth, args.order, writer)
    lines, raw = _open(args.capture)
    total = args.capture.stat().st_size
    show = not args.quiet and sys.stderr.isatty()
    progress = _progress(show)
    start = time.perf_counter()
    try:
        with raw, lines, progress:
            task = progress.add_task("replay", total=total, symbol=symbol, rate="")
            while chunk := lines.readlines(_CHUNK_BYTES):
                replay.feed(chunk)
                if show:
                    rate = replay.applied / max(time.perf_counter() - start, 1e-9)
                    progress.update(task, completed=raw.tell(), rate=f"{rate:,.0f} msg/s")
            replay.flush()
    finally:
        if sample_file is not None:
            sample_file.close()
    replay.seconds = time.perf_counter() - start
    if args.out is not None and replay.book is not None:
        args.out.write_text(json.dumps(replay.book.to_snapshot()))
    return replay


def main(argv: Sequence[str] | None = None) -> int:
    """The command; its exit status."""
    args = _parser().parse_args(argv)
    try:
        replay = run(args)
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"replay: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    book = replay.book
    seconds = replay.seconds
    rate = replay.applied / seconds if seconds > 0 else 0.0
    print(f"{replay.symbol}: {replay.lines:,} messages, {replay.applied:,} applied, "
          f"{replay.stale:,} already in the snapshot, {replay.refused:,} refused "
          f"in {seconds:.2f} s: {rate:,.0f} msg/s", file=sys.stderr)
    for reason, count in sorted(replay.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  refused {count:,}: {reason}", file=sys.stderr)
    if book is not None:
        print(f"book at sequence {book.sequence}: {len(book):,} orders, best bid "
              f"{book.best_bid_text()}, best ask {book.best_ask_text()}", file=sys.stderr)
    return 0
