"""OrderBook behaviour, message by message."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumex_l3 import IntegrityError, MessageError, OrderBook, SequenceGap, parse_message
from kumex_l3.testing.synthetic import StreamGenerator


class Feed:
    """Writes raw messages for one symbol with consecutive sequences.

    ``batch`` sends each through :meth:`OrderBook.apply_many` instead of ``apply``:
    a frame it stops at must have left the book as it was, and ``apply`` then
    raises the error (the documented way to learn it).
    """

    def __init__(self, book: OrderBook, *, batch: bool = False) -> None:
        self.book = book
        self.seq = book.sequence
        self.ts = 1_000
        self.batch = batch

    def raw(self, subject: str, seq: int | None = None, **data: Any) -> str:
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.ts += 1
        body = {"symbol": self.book.symbol, "sequence": seq, "ts": data.pop("ts", self.ts), **data}
        return json.dumps({"type": "message", "topic": f"/contractMarket/level3v2:{body['symbol']}",
                           "subject": subject, "data": body})

    def send(self, subject: str, seq: int | None = None, **data: Any) -> bool:
        raw = self.raw(subject, seq, **data)
        if not self.batch:
            return self.book.apply(parse_message(raw))
        before, stale = self.book.to_state(), self.book.stats.stale
        if self.book.apply_many([raw]) == 1:
            return self.book.stats.stale == stale
        assert self.book.to_state() == before, "apply_many changed the book, then stopped"
        return self.book.apply(parse_message(raw))

    def open(self, oid: str, side: str, price: str, size: str, **kw: Any) -> bool:
        return self.send("open", side=side, price=price, size=size, orderId=oid, **kw)


@pytest.fixture(params=["apply", "apply_many"])
def feed(request: pytest.FixtureRequest) -> Feed:
    return Feed(OrderBook("XBTUSDM", sequence=100), batch=request.param == "apply_many")


def test_open_depth_and_best(feed: Feed) -> None:
    feed.open("b1", "buy", "100.0", "5")
    feed.open("b2", "buy", "100", "7")  # same price, other text: one level
    feed.open("b3", "buy", "99.5", "1")
    feed.open("a1", "sell", "101.0", "3")
    book = feed.book
    bids, asks = book.depth(10)
    assert bids == [(Decimal("100"), 12, 2), (Decimal("99.5"), 1, 1)]
    assert asks == [(Decimal("101"), 3, 1)]
    assert book.best_bid() == Decimal("100") and book.best_ask() == Decimal("101")
    assert book.depth_rows(1) == ([["100.0", "12", 2]], [["101.0", "3", 1]])
    assert book.sequence == 104 and len(book) == 4
    book.check()


def test_prices_sort_numerically_not_as_text(feed: Feed) -> None:
    for i, price in enumerate(["9", "10", "100", "9.5"]):
        feed.open(f"a{i}", "sell", price, "1")
    assert [lv.price for lv in feed.book.depth()[1]] == [Decimal(p) for p in
                                                         ("9", "9.5", "10", "100")]


def test_queue_position_update_keeps_place_match_and_done(feed: Feed) -> None:
    for oid, size in (("o1", "5"), ("o2", "3"), ("o3", "4")):
        feed.open(oid, "sell", "200", size)
    book = feed.book
    pos = book.queue_position("o3")
    assert pos is not None and (pos.position, pos.size_ahead, pos.side) == (2, 8, "sell")
    feed.send("update", orderId="o1", size="2")  # keeps its place at the front
    assert [o.order_id for o in book.l3()[1][0].orders] == ["o1", "o2", "o3"]
    feed.send("match", side="buy", price="200", size="2", makerOrderId="o1", takerOrderId="t",
              tradeId="x1")
    assert "o1" not in book  # fully filled: leaves the book at once
    feed.send("done", orderId="o1", reason="filled")  # its done: a no-op, counted
    assert book.stats.unknown_done == 1
    feed.send("match", side="buy", price="200", size="1", makerOrderId="o2", takerOrderId="t",
              tradeId="x2", remainSize="2")
    pos = book.queue_position("o3")
    assert pos is not None and (pos.position, pos.size_ahead) == (1, 2)
    assert book.depth()[1] == [(Decimal("200"), 6, 2)]
    feed.send("done", orderId="o2", reason="canceled")
    assert book.depth()[1] == [(Decimal("200"), 4, 1)]
    assert book.queue_position("nope") is None
    book.check()


def test_queue_priority_is_open_ts(feed: Feed) -> None:
    feed.open("late", "buy", "50", "1", ts=5_000)
    feed.open("early", "buy", "50", "1", ts=4_000)
    assert [o.order_id for o in feed.book.l3()[0][0].orders] == ["early", "late"]


def test_stale_message_ignored_not_applied_twice(feed: Feed) -> None:
    raw = feed.raw("open", side="buy", price="10", size="1", orderId="x")
    assert feed.book.apply(parse_message(raw)) is True
    assert feed.book.apply(parse_message(raw)) is False
    assert feed.book.stats.stale == 1 and len(feed.book) == 1
    assert feed.send("done", seq=50, orderId="x", reason="canceled") is False
    assert "x" in feed.book


def test_gap_raises_with_expected_and_got(feed: Feed) -> None:
    with pytest.raises(SequenceGap) as info:
        feed.send("received", seq=105, orderId="x", clientOid="c")
    assert (info.value.expected, info.value.got) == (101, 105)
    assert feed.book.sequence == 100  # nothing applied


def test_unknown_orders_are_counted_not_errors(feed: Feed) -> None:
    feed.send("done", orderId="ghost", reason="filled")
    feed.send("match", side="buy", price="1", size="1", makerOrderId="hidden", takerOrderId="t",
              tradeId="t1")
    feed.send("update", orderId="ghost", size="3")
    assert feed.book.stats.unknown_done == 1
    assert feed.book.stats.unknown_match == 1
    assert feed.book.stats.unknown_update == 1
    assert feed.book.sequence == 103


@pytest.mark.parametrize(
    ("subject", "data", "reason"),
    [
        ("match", dict(side="buy", price="200", size="6", makerOrderId="o1", takerOrderId="t",
                       tradeId="x"), "exceeds"),
        ("match", dict(side="buy", price="200", size="1", makerOrderId="o1", takerOrderId="t",
                       tradeId="x", remainSize="3"), "remainSize"),
        ("match", dict(side="buy", price="201", size="1", makerOrderId="o1", takerOrderId="t",
                       tradeId="x"), "price"),
        ("match", dict(side="sell", price="200", size="1", makerOrderId="o1", takerOrderId="t",
                       tradeId="x"), "side"),
        ("open", dict(side="buy", price="200", size="1", orderId="b"), "crosses"),
        ("open", dict(side="sell", price="150", size="1", orderId="c"), "crosses"),
        ("open", dict(side="sell", price="300", size="1", orderId="o1"), "twice"),
    ],
)
def test_integrity_errors(feed: Feed, subject: str, data: dict[str, Any], reason: str) -> None:
    feed.open("o1", "sell", "200", "5")
    feed.open("b1", "buy", "150", "5")
    with pytest.raises(IntegrityError) as info:
        feed.send(subject, **data)
    assert reason in info.value.reason


def test_message_for_another_symbol_is_refused(feed: Feed) -> None:
    other = OrderBook("ETHUSDTM", sequence=100)
    with pytest.raises(MessageError):
        feed.book.apply(parse_message(Feed(other).raw("done", orderId="x", reason="filled")))
    with pytest.raises(MessageError):
        feed.book.apply(parse_message('{"type":"welcome","id":"1"}'))


def test_update_to_zero_removes(feed: Feed) -> None:
    feed.open("o", "buy", "10", "4")
    feed.send("update", orderId="o", size="0")
    assert len(feed.book) == 0 and feed.book.depth() == ([], [])
    feed.book.check()


def test_from_snapshot_sorts_rows_and_refuses_a_crossed_one() -> None:
    data = {"symbol": "XBTUSDM", "sequence": 10, "ts": 1,
            "asks": [["a2", "16953.0", "5", 3], ["a1", "16952.0", "1", 9]],
            "bids": [[7, "b1", "16950.0", "1000", 4], ["b0", "16950.0", "2", 2]]}
    book = OrderBook.from_snapshot(data)
    bids, asks = book.l3()
    assert [o.order_id for o in bids[0].orders] == ["b0", "b1"]
    assert [lv.text for lv in asks] == ["16952.0", "16953.0"]
    assert book.sequence == 10
    book.check()
    data["bids"] = [["b", "16960.0", "1", 1]]
    with pytest.raises(IntegrityError):
        OrderBook.from_snapshot(data)


def test_check_detects_corruption(feed: Feed) -> None:
    feed.open("o", "buy", "10", "4")
    feed.book._bids.levels[Decimal("10")].size = 5  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError, match="size"):
        feed.book.check()


def test_bad_checkpoint_is_a_message_error() -> None:
    with pytest.raises(MessageError):
        OrderBook.from_state({"v": 1, "symbol": "X"})
    with pytest.raises(MessageError):
        OrderBook.from_state({"v": 99})
    # apply() counts on a book that is never crossed: a crossed checkpoint is refused.
    crossed = {"v": 1, "symbol": "X", "sequence": 5, "ts": 1,
               "bids": [["b", "101", "1", 1]], "asks": [["a", "100", "1", 2]]}
    with pytest.raises(MessageError, match="crossed"):
        OrderBook.from_state(crossed)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 3_000),
       levels=st.integers(1, 50), target=st.integers(1, 300))
def test_state_round_trip_is_exact(seed: int, count: int, levels: int, target: int) -> None:
    gen = StreamGenerator(seed=seed, levels=levels, target_orders=target)
    book = OrderBook(gen.symbol)
    for raw in gen.take(count) + gen.flush():
        book.apply(parse_message(raw))
    state = json.loads(json.dumps(book.to_state()))  # through JSON, as a checkpoint is stored
    restored = OrderBook.from_state(state)
    assert restored.to_state() == book.to_state()
    assert restored.l3() == book.l3() and restored.sequence == book.sequence
    restored.check()
    # The generator's own snapshot of the same moment builds the same book.
    assert OrderBook.from_snapshot(gen.snapshot()).l3() == book.l3()


def test_to_snapshot_builds_the_same_book() -> None:
    gen = StreamGenerator(seed=5, target_orders=80, levels=10)
    book = OrderBook(gen.symbol)
    for raw in gen.take(4_000) + gen.flush():
        book.apply(parse_message(raw))
    snap = book.to_snapshot()
    assert set(snap) == {"symbol", "sequence", "ts", "bids", "asks"}
    assert all(len(row) == 4 for row in snap["bids"] + snap["asks"])
    assert OrderBook.from_snapshot(snap).l3() == book.l3()
    assert snap == gen.snapshot() | {"ts": book.ts}


def test_recent_trades_are_kept_including_hidden_makers(feed: Feed) -> None:
    feed.open("o1", "sell", "200", "5")
    feed.send("match", side="buy", price="200", size="2", makerOrderId="o1", takerOrderId="t",
              tradeId="x1")
    feed.send("match", side="sell", price="150", size="1", makerOrderId="hidden",
              takerOrderId="t2", tradeId="x2")
    assert [(t.price, t.size, t.side, t.trade_id) for t in feed.book.trades] == [
        ("200", "2", "buy", "x1"), ("150", "1", "sell", "x2")]


def test_apply_many_stops_where_apply_would_raise() -> None:
    """Each kind of refusal ends a batch at that frame, with the frames before it applied."""
    book = OrderBook("XBTUSDM", sequence=100)
    feed = Feed(book)
    ok = [feed.raw("open", side="buy", price="10", size="1", orderId=f"o{i}") for i in range(3)]
    huge = feed.raw("received", orderId="x" * 70_000, clientOid="c")
    other = Feed(OrderBook("ETHUSDTM", sequence=103)).raw("done", orderId="o", reason="filled")
    wrong_topic = ok[0].replace('"sequence": 101', '"sequence": 104').replace(
        "level3v2:XBTUSDM", "level3v2:ETHUSDTM")
    for bad in (huge, other, wrong_topic, '{"type":"welcome","id":"1"}', "{not json",
                feed.raw("received", seq=110, orderId="g", clientOid="g"),
                feed.raw("open", seq=104, side="sell", price="9", size="1", orderId="x")):
        book = OrderBook("XBTUSDM", sequence=100)
        assert book.apply_many([*ok, bad, ok[0]]) == 3, bad[:80]
        assert book.sequence == 103 and len(book) == 3
        with pytest.raises((MessageError, SequenceGap, IntegrityError)):
            book.apply(parse_message(bad))
        assert book.sequence == 103 and len(book) == 3
