"""The Level 3 order book: every resting order, in queue order (pure, no I/O).

Structure (the shape nautilus_trader's ladder and sortedcontainers' checks use):

* per side, a sorted price ladder (``SortedList`` of ``Decimal`` prices) and a
  ``dict`` price -> :class:`_Level`;
* a level keeps its orders in a ``dict`` in queue order (arrival = ``open`` ts)
  and its total size;
* one order-id index over both sides.

:meth:`OrderBook.apply` enforces ``sequence == book.sequence + 1``: a message at
or below the book's sequence is ignored (``apply`` returns ``False``), a message
above it raises :class:`~kumex_l3.errors.SequenceGap`, and a message that
contradicts the book (over-fill, ``remainSize`` disagreement, crossed book,
duplicate order) raises :class:`~kumex_l3.errors.IntegrityError`. After either
error the book is no longer known and must be rebuilt from a snapshot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Final, NamedTuple

import msgspec
from sortedcontainers import SortedList

from kumex_l3.errors import IntegrityError, MessageError, SequenceGap
from kumex_l3.messages import (
    _DECODE_ERRORS,
    _FRAME,
    MAX_MESSAGE_BYTES,
    TOPIC_PREFIX,
    Control,
    DataMessage,
    Done,
    Match,
    Open,
    Qty,
    Received,
    Snapshot,
    Update,
    format_qty,
    parse_message,
    parse_price,
    parse_qty,
    parse_snapshot,
)

__all__ = [
    "BookStats",
    "DepthLevel",
    "L3Level",
    "L3Order",
    "OrderBook",
    "QueuePosition",
    "Trade",
]

#: The messages :meth:`OrderBook.apply` takes.
_DATA_KINDS: Final = frozenset({Received, Open, Update, Match, Done})

#: Trades an :class:`OrderBook` remembers (:attr:`OrderBook.trades`).
RECENT_TRADES: Final = 50

_STATE_VERSION: Final = 1


class DepthLevel(NamedTuple):
    """One aggregated price level: ``(price, size, order_count)``."""

    price: Decimal
    size: Qty
    orders: int


class Trade(NamedTuple):
    """One ``match``: the exchange's price and size texts, the taker's side, ts in ns."""

    price: str
    size: str
    side: str
    ts: int
    trade_id: str


class L3Order(NamedTuple):
    """One resting order inside a level, in queue order."""

    order_id: str
    size: Qty
    ts: int


class L3Level(NamedTuple):
    """One price level with its orders in queue order; ``text`` is the exchange's price text."""

    price: Decimal
    text: str
    size: Qty
    orders: list[L3Order]


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """Where a resting order stands: ``position`` 0 is first in its price's queue."""

    order_id: str
    side: str
    price: Decimal
    price_text: str
    size: Qty
    ts: int
    position: int
    size_ahead: Qty


@dataclass(slots=True)
class BookStats:
    """Counters of what ``apply`` did (since the book was built)."""

    applied: int = 0
    stale: int = 0
    unknown_match: int = 0
    unknown_done: int = 0
    unknown_update: int = 0


class _Order(msgspec.Struct, gc=False):
    # A C-built struct: three times cheaper to make than a __slots__ class, and, holding
    # no containers, never tracked by the garbage collector.
    order_id: str
    side: str
    price: Decimal
    size: Qty
    ts: int


class _Level:
    __slots__ = ("last_ts", "orders", "price", "size", "text")

    def __init__(self, price: Decimal, text: str) -> None:
        self.price = price
        self.text = text
        self.orders: dict[str, _Order] = {}
        self.size: Qty = 0
        #: No order of this level has a later ts (an upper bound: a removal leaves it).
        self.last_ts = 0

    def add(self, order: _Order) -> None:
        if order.ts >= self.last_ts:
            self.orders[order.order_id] = order
            self.last_ts = order.ts
        else:
            # Rare: an order whose ts is earlier than one already queued. Queue
            # priority is by ts; keep arrival order among equal ts.
            queue = list(self.orders.values())
            i = len(queue)
            while i > 0 and queue[i - 1].ts > order.ts:
                i -= 1
            queue.insert(i, order)
            self.orders = {o.order_id: o for o in queue}
        self.size += order.size


class _Side:
    __slots__ = ("is_bid", "levels", "prices")

    def __init__(self, is_bid: bool) -> None:
        self.is_bid = is_bid
        self.levels: dict[Decimal, _Level] = {}
        self.prices: SortedList = SortedList()

    def best(self) -> Decimal | None:
        prices = self.prices
        if not prices:
            return None
        best: Decimal = prices[-1] if self.is_bid else prices[0]
        return best

    def iter_levels(self, n: int | None = None) -> Iterator[_Level]:
        """Levels best first (at most ``n``)."""
        levels = self.levels
        prices = self.prices
        if n is None:
            n = len(prices)
        n = max(n, 0)
        if self.is_bid:
            chosen = prices.islice(max(len(prices) - n, 0), len(prices), reverse=True)
        else:
            chosen = prices.islice(0, n)
        for price in chosen:
            yield levels[price]

    def insert(self, order: _Order, text: str) -> None:
        level = self.levels.get(order.price)
        if level is None:
            level = self.levels[order.price] = _Level(order.price, text)
            self.prices.add(order.price)
        level.add(order)

    def remove(self, order: _Order) -> None:
        """Take a resting order off its level (the level too, when it was the last)."""
        level = self.levels[order.price]
        orders = level.orders
        del orders[order.order_id]
        level.size -= order.size
        if not orders:
            del self.levels[order.price]
            self.prices.remove(order.price)


class OrderBook:
    """An order-by-order (L3) book of one symbol, kept in strict sequence.

    Build it with :meth:`from_snapshot` (exchange snapshot), :meth:`from_state`
    (own checkpoint) or ``OrderBook(symbol, sequence=0)`` (empty), then feed it
    parsed messages with :meth:`apply`.
    """

    __slots__ = ("_asks", "_bids", "_index", "_matches", "_sides", "sequence",
                 "stats", "symbol", "ts")

    def __init__(self, symbol: str, sequence: int = 0, ts: int = 0) -> None:
        self.symbol = symbol
        #: Sequence of the last message applied (or of the snapshot).
        self.sequence = sequence
        #: ``ts`` (ns) of the last message applied (or of the snapshot).
        self.ts = ts
        self.stats = BookStats()
        self._bids = _Side(is_bid=True)
        self._asks = _Side(is_bid=False)
        self._sides = {"buy": self._bids, "sell": self._asks}
        self._index: dict[str, _Order] = {}
        self._matches: deque[Match] = deque(maxlen=RECENT_TRADES)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any] | Snapshot | bytes | str) -> OrderBook:
        """A book equal to an exchange L3 snapshot (the ``data`` object, or its parsed form)."""
        snap = data if isinstance(data, Snapshot) else parse_snapshot(data)
        book = cls(snap.symbol, snap.sequence, snap.ts)
        for side, rows in (("buy", snap.bids), ("sell", snap.asks)):
            target = book._sides[side]
            for row in rows:
                order = _Order(row.order_id, side, row.price_value, row.qty, row.ts)
                book._index[row.order_id] = order
                target.insert(order, row.price)
        bid, ask = book._bids.best(), book._asks.best()
        if bid is not None and ask is not None and bid >= ask:
            raise IntegrityError(snap.symbol, snap.sequence,
                                 f"snapshot is crossed: bid {bid} >= ask {ask}")
        return book

    def to_snapshot(self) -> dict[str, Any]:
        """The book as the ``data`` of ``/api/v2/level3/snapshot`` (4-element rows, best first)."""
        def rows(side: _Side) -> list[list[Any]]:
            return [[o.order_id, level.text, format_qty(o.size), o.ts]
                    for level in side.iter_levels() for o in level.orders.values()]

        return {
            "symbol": self.symbol,
            "sequence": self.sequence,
            "ts": self.ts,
            "bids": rows(self._bids),
            "asks": rows(self._asks),
        }

    def to_state(self) -> dict[str, Any]:
        """The whole state as JSON-able data (for checkpoints); :meth:`from_state` restores it.

        The snapshot rows keep the exact queue order, so a restore does not re-sort by ts.
        """
        return {"v": _STATE_VERSION, **self.to_snapshot(), "stats": asdict(self.stats)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OrderBook:
        """Restore a book saved by :meth:`to_state`, exactly (queue order included)."""
        if state.get("v") != _STATE_VERSION:
            raise MessageError(f"checkpoint version {state.get('v')!r} is not {_STATE_VERSION}")
        try:
            book = cls(str(state["symbol"]), int(state["sequence"]), int(state["ts"]))
            for side, key in (("buy", "bids"), ("sell", "asks")):
                target = book._sides[side]
                for order_id, text, size, ts in state[key]:
                    order = _Order(order_id, side, parse_price(text), parse_qty(size), int(ts))
                    book._index[order_id] = order
                    level = target.levels.get(order.price)
                    if level is None:
                        level = target.levels[order.price] = _Level(order.price, text)
                        target.prices.add(order.price)
                    # Saved in queue order: append as is, even if ts are not monotonic.
                    level.orders[order_id] = order
                    level.size += order.size
                    level.last_ts = max(level.last_ts, order.ts)
            book.stats = BookStats(**state.get("stats", {}))
            bid, ask = book._bids.best(), book._asks.best()
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"bad checkpoint: {exc!r}") from None
        if bid is not None and ask is not None and bid >= ask:
            # apply() counts on a book that is never crossed.
            raise MessageError(f"bad checkpoint: crossed, bid {bid} >= ask {ask}")
        return book

    # ------------------------------------------------------------------ applying

    def apply(self, msg: DataMessage | Control) -> bool:
        """Apply one message. ``True`` if applied, ``False`` if ignored as already applied.

        Raises ``SequenceGap`` when messages were skipped, ``IntegrityError`` when
        the message contradicts the book, ``MessageError`` for a message of
        another symbol or a non-data envelope. After an error the book is as it
        was before the message.
        """
        if type(msg) not in _DATA_KINDS:
            if isinstance(msg, Control):
                raise MessageError(f"{msg.type} is not a data message")
            raise MessageError(f"cannot apply {type(msg).__name__}")
        if msg.symbol != self.symbol:  # type: ignore[union-attr]
            raise MessageError(f"message for {msg.symbol} applied to the "  # type: ignore[union-attr]
                               f"{self.symbol} book")
        if msg.sequence <= self.sequence:  # type: ignore[union-attr]
            self.stats.stale += 1
            return False
        self._change((msg,))  # type: ignore[arg-type]
        return True

    def apply_many(self, frames: Sequence[bytes | str], *, contiguous: bool = False,
                   applied_ts: list[int] | None = None) -> int:
        """Parse and apply raw frames in order, until one cannot be; how many were taken.

        Each frame taken is exactly ``apply(parse_message(frame))`` (applied, or
        skipped as already applied). It stops at the first frame that would raise
        (a malformed frame, another symbol, a gap, a contradiction) and leaves that
        frame and the rest untouched: when the result is below ``len(frames)``, the
        caller takes ``frames[result]`` through :func:`parse_message` and
        :meth:`apply`, which raise the error, and goes on as it sees fit.

        ``contiguous``: stop at a frame already applied too, so that every frame
        taken moved the book by one sequence. ``applied_ts`` receives the ``ts`` of
        each message applied, in order.
        """
        symbol = self.symbol
        own_topic = TOPIC_PREFIX + symbol
        decode = _FRAME.decode
        msgs: list[DataMessage] = []
        append = msgs.append
        if frames and max(map(len, frames)) > MAX_MESSAGE_BYTES:
            # parse_message refuses it before decoding: the batch ends before it.
            frames = frames[:next(i for i, f in enumerate(frames) if len(f) > MAX_MESSAGE_BYTES)]
        for frame in frames:
            try:
                envelope = decode(frame)
            except _DECODE_ERRORS:
                # Not the common shape (a control frame, or not valid): the careful
                # path parses it, or says what is wrong (and the batch ends here).
                try:
                    msg: Any = parse_message(frame)
                except MessageError:
                    break
                if type(msg) not in _DATA_KINDS or msg.symbol != symbol:
                    break
            else:
                msg = envelope.data
                topic = envelope.topic
                if msg.symbol != symbol or (topic is not None and topic != own_topic):
                    break
            append(msg)
        return self._change(msgs, stop=True, contiguous=contiguous, applied_ts=applied_ts)

    def _change(self, msgs: Sequence[DataMessage], *, stop: bool = False,
                contiguous: bool = False, applied_ts: list[int] | None = None) -> int:
        """Apply parsed messages of this symbol in order; how many were taken.

        A message at or below the book's sequence is counted stale and skipped
        (with ``contiguous``, it ends the run). ``applied_ts`` receives the ``ts``
        of each message applied.
        The first one that cannot be applied raises ``SequenceGap`` or
        ``IntegrityError``, or with ``stop`` ends the run; either way the book is
        left as it was after the message before it (every check comes before a
        change).
        """
        index = self._index
        sides = self._sides
        stats = self.stats
        expected = self.sequence + 1
        ts = self.ts
        taken = stale = 0
        try:
            for msg in msgs:
                seq = msg.sequence
                if seq != expected:
                    if seq > expected:
                        raise SequenceGap(self.symbol, expected, seq)
                    if contiguous:
                        break
                    stale += 1
                    taken += 1
                    continue
                kind = type(msg)
                if kind is Received:
                    pass  # an order that rests nowhere yet: only its sequence counts
                elif kind is Done:
                    order = index.pop(msg.order_id, None)  # type: ignore[union-attr]
                    if order is None:
                        stats.unknown_done += 1
                    else:
                        sides[order.side].remove(order)
                elif kind is Open:
                    self._open(msg)  # type: ignore[arg-type]
                elif kind is Match:
                    self._match(msg)  # type: ignore[arg-type]
                else:  # Update
                    order = index.get(msg.order_id)  # type: ignore[union-attr]
                    qty = msg.qty  # type: ignore[union-attr]
                    if order is None:
                        stats.unknown_update += 1
                    elif qty == 0:
                        del index[order.order_id]
                        sides[order.side].remove(order)
                    else:
                        sides[order.side].levels[order.price].size += qty - order.size
                        order.size = qty
                expected = seq + 1
                ts = msg.ts
                taken += 1
        except (SequenceGap, IntegrityError):
            if not stop:
                raise
        finally:
            stats.applied += taken - stale
            stats.stale += stale
            if applied_ts is not None:
                nxt = self.sequence + 1
                for m in msgs[:taken]:
                    if m.sequence == nxt:
                        applied_ts.append(m.ts)
                        nxt += 1
            self.sequence = expected - 1
            self.ts = ts
        return taken

    def _open(self, msg: Open) -> None:
        order_id = msg.order_id
        if order_id in self._index:
            raise IntegrityError(self.symbol, msg.sequence, f"order {order_id} opened twice")
        price = msg.price_value
        side = self._bids if msg.side == "buy" else self._asks
        level = side.levels.get(price)
        if level is None:
            # Only a new level can cross: the book is never crossed, so a price that
            # already rests on this side is beyond the other side's best.
            if side is self._bids:
                ask = self._asks.best()
                if ask is not None and price >= ask:
                    raise IntegrityError(self.symbol, msg.sequence,
                                         f"open buy {order_id} at {price} crosses ask {ask}")
            else:
                bid = self._bids.best()
                if bid is not None and price <= bid:
                    raise IntegrityError(self.symbol, msg.sequence,
                                         f"open sell {order_id} at {price} crosses bid {bid}")
            level = side.levels[price] = _Level(price, msg.price)
            side.prices.add(price)
        ts = msg.ts
        order = _Order(order_id, msg.side, price, msg.qty, ts)
        self._index[order_id] = order
        if ts >= level.last_ts:  # _Level.add's common case, inline
            level.orders[order_id] = order
            level.last_ts = ts
            level.size += order.size
        else:
            level.add(order)

    def _match(self, msg: Match) -> None:
        maker = self._index.get(msg.maker_order_id)
        if maker is None:  # a hidden maker, or one that rested before our snapshot window
            self.stats.unknown_match += 1
            self._matches.append(msg)
            return
        if maker.side == msg.side:
            raise IntegrityError(self.symbol, msg.sequence,
                                 f"match taker side {msg.side} equals maker {maker.order_id} side")
        if maker.price != msg.price_value:
            raise IntegrityError(self.symbol, msg.sequence,
                                 f"match price {msg.price} differs from maker price {maker.price}")
        size = msg.qty
        remain = maker.size - size
        if remain < 0:
            raise IntegrityError(self.symbol, msg.sequence,
                                 f"match {size} exceeds maker {maker.order_id} size {maker.size}")
        if msg.remain_qty is not None and msg.remain_qty != remain:
            raise IntegrityError(self.symbol, msg.sequence,
                                 f"remainSize {msg.remain_size} disagrees with book {remain}")
        self._matches.append(msg)
        side = self._sides[maker.side]
        if remain == 0:
            del self._index[maker.order_id]
            side.remove(maker)
        else:
            maker.size = remain
            side.levels[maker.price].size -= size

    # ------------------------------------------------------------------ reading

    @property
    def trades(self) -> list[Trade]:
        """The last :data:`RECENT_TRADES` matches, oldest first (not part of checkpoints)."""
        return [Trade(m.price, m.size, m.side, m.ts, m.trade_id) for m in self._matches]

    def __len__(self) -> int:
        """Number of resting orders."""
        return len(self._index)

    @property
    def order_count(self) -> int:
        """Number of resting orders."""
        return len(self._index)

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._index

    def best_bid(self) -> Decimal | None:
        """Highest bid price, or ``None`` for an empty side."""
        return self._bids.best()

    def best_ask(self) -> Decimal | None:
        """Lowest ask price, or ``None`` for an empty side."""
        return self._asks.best()

    def best_bid_text(self) -> str | None:
        """The exchange's text of the best bid price."""
        best = self._bids.best()
        return None if best is None else self._bids.levels[best].text

    def best_ask_text(self) -> str | None:
        """The exchange's text of the best ask price."""
        best = self._asks.best()
        return None if best is None else self._asks.levels[best].text

    def depth(self, n: int | None = None) -> tuple[list[DepthLevel], list[DepthLevel]]:
        """``(bids, asks)``, each best first: ``(price, size, order_count)`` for ``n`` levels."""
        return (
            [DepthLevel(lv.price, lv.size, len(lv.orders)) for lv in self._bids.iter_levels(n)],
            [DepthLevel(lv.price, lv.size, len(lv.orders)) for lv in self._asks.iter_levels(n)],
        )

    def depth_rows(self, n: int | None = None) -> tuple[list[list[Any]], list[list[Any]]]:
        """Like :meth:`depth` in the HTTP form: ``[price_text, size_text, order_count]``."""
        return (
            [[lv.text, format_qty(lv.size), len(lv.orders)] for lv in self._bids.iter_levels(n)],
            [[lv.text, format_qty(lv.size), len(lv.orders)] for lv in self._asks.iter_levels(n)],
        )

    def l3(self, n: int | None = None) -> tuple[list[L3Level], list[L3Level]]:
        """``(bids, asks)``, each best first, every level with its orders in queue order."""
        def side(s: _Side) -> list[L3Level]:
            return [
                L3Level(lv.price, lv.text, lv.size,
                        [L3Order(o.order_id, o.size, o.ts) for o in lv.orders.values()])
                for lv in s.iter_levels(n)
            ]

        return side(self._bids), side(self._asks)

    def queue_position(self, order_id: str) -> QueuePosition | None:
        """Where ``order_id`` stands in its price's queue, or ``None`` if it does not rest."""
        order = self._index.get(order_id)
        if order is None:
            return None
        level = self._sides[order.side].levels[order.price]
        ahead: Qty = 0
        position = 0
        for other in level.orders.values():
            if other is order:
                break
            ahead += other.size
            position += 1
        return QueuePosition(order_id, order.side, order.price, level.text, order.size,
                             order.ts, position, ahead)

    def order(self, order_id: str) -> L3Order | None:
        """A resting order, or ``None``."""
        o = self._index.get(order_id)
        return None if o is None else L3Order(o.order_id, o.size, o.ts)

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        """Verify every invariant; raise ``IntegrityError`` naming the first one broken.

        Index matches the ladder, level sizes are the sums of their orders, no
        empty level, prices sorted and unique, queues in ts order is *not*
        required (a restored checkpoint keeps the exchange's order), no order
        of size <= 0, and the book is not crossed.
        """
        def fail(reason: str) -> IntegrityError:
            return IntegrityError(self.symbol, self.sequence, f"check: {reason}")

        seen: set[str] = set()
        for name, side in (("buy", self._bids), ("sell", self._asks)):
            if list(side.prices) != sorted(side.levels):
                raise fail(f"{name} ladder prices do not match levels")
            if len(set(side.prices)) != len(side.prices):
                raise fail(f"{name} ladder has duplicate prices")
            for price, level in side.levels.items():
                if level.price != price:
                    raise fail(f"{name} level keyed {price} holds price {level.price}")
                if not level.orders:
                    raise fail(f"{name} level {price} is empty")
                if parse_price(level.text) != price:
                    raise fail(f"{name} level {price} has text {level.text!r}")
                total: Qty = 0
                for order_id, order in level.orders.items():
                    if order.order_id != order_id or self._index.get(order_id) is not order:
                        raise fail(f"order {order_id} is not indexed")
                    if order.side != name or order.price != price:
                        raise fail(f"order {order_id} is at the wrong place")
                    if order.size <= 0:
                        raise fail(f"order {order_id} has size {order.size}")
                    seen.add(order_id)
                    total += order.size
                if total != level.size:
                    raise fail(f"{name} level {price} size {level.size} != sum {total}")
        if seen != set(self._index):
            raise fail("index holds orders that are on no level")
        bid, ask = self._bids.best(), self._asks.best()
        if bid is not None and ask is not None and bid >= ask:
            raise fail(f"crossed: bid {bid} >= ask {ask}")
