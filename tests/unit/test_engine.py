"""Unit tests of the sandbox matching engine (services/sandbox/engine.py)."""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal
from typing import Any

import pytest

from services.sandbox.contracts import CONTRACTS, Contract, format_price
from services.sandbox.engine import (
    EngineOrder,
    MatchingEngine,
    Message,
    OrderRequest,
    RejectError,
)

T0 = 1_654_073_289_118_060_857
XBT = CONTRACTS["XBTUSDM"]
_HEX24 = re.compile(r"[0-9a-f]{24}")

_FIELDS = {
    "received": {"symbol", "sequence", "orderId", "clientOid", "ts"},
    "open": {"symbol", "sequence", "side", "price", "size", "orderId", "orderTime", "ts"},
    "update": {"symbol", "sequence", "orderId", "size", "ts"},
    "match": {
        "symbol",
        "sequence",
        "side",
        "price",
        "size",
        "makerOrderId",
        "takerOrderId",
        "tradeId",
        "ts",
    },
    "done": {"symbol", "sequence", "orderId", "reason", "ts"},
}

_oid_counter = 0


def _oid() -> str:
    global _oid_counter
    _oid_counter += 1
    return f"c{_oid_counter}"


def req(
    side: str,
    price: str | None,
    size: int,
    *,
    user: str = "u1",
    client_oid: str | None = None,
    **kw: Any,
) -> OrderRequest:
    return OrderRequest(
        user_id=user,
        client_oid=client_oid or _oid(),
        side=side,
        type="limit" if price is not None else "market",
        price=None if price is None else Decimal(price),
        size=size,
        **kw,
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1_000
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def eng() -> MatchingEngine:
    return MatchingEngine(XBT, id_seed=1, start_sequence=1000)


def subjects(msgs: list[Message]) -> list[str]:
    return [m["subject"] for m in msgs]


def place(eng: MatchingEngine, clock: Clock, r: OrderRequest) -> tuple[EngineOrder, list[Message]]:
    return eng.place(r, clock())


def check_stream(msgs: list[Message], symbol: str, first_sequence: int) -> None:
    """Envelope, exact field sets, value types, sequence +1, ts strictly increasing."""
    seq = first_sequence
    last_ts = 0
    for m in msgs:
        assert set(m) == {"type", "topic", "subject", "data"}
        assert m["type"] == "message"
        assert m["topic"] == f"/contractMarket/level3v2:{symbol}"
        d = m["data"]
        assert set(d) == _FIELDS[m["subject"]], m
        assert d["symbol"] == symbol
        assert type(d["sequence"]) is int and d["sequence"] == seq
        assert type(d["ts"]) is int and d["ts"] > last_ts
        last_ts = d["ts"]
        seq += 1
        for key in ("price", "size"):
            if key in d:
                assert isinstance(d[key], str)
        if "size" in d:
            assert int(d["size"]) > 0
        for key in ("orderId", "makerOrderId", "takerOrderId", "tradeId"):
            if key in d:
                assert _HEX24.fullmatch(d[key]), d[key]
        if m["subject"] == "done":
            assert d["reason"] in ("filled", "canceled")
        if m["subject"] == "open":
            assert type(d["orderTime"]) is int and d["orderTime"] < d["ts"]
        json.dumps(m)  # serialisable as is


# ---------------------------------------------------------------- contracts


def test_contract_api_fields_and_price_text() -> None:
    api = XBT.to_api(mark_price=Decimal("31570.5"), index_price=Decimal("31571"))
    assert api["symbol"] == "XBTUSDM"
    assert api["rootSymbol"] == "XBT"
    assert api["type"] == "FFWCSX"
    assert api["baseCurrency"] == "XBT"
    assert api["quoteCurrency"] == "USD"
    assert api["settleCurrency"] == "XBT"
    assert api["isInverse"] is True
    assert api["multiplier"] == -1
    assert api["lotSize"] == 1
    assert api["tickSize"] == 0.1
    assert api["maxOrderQty"] == 10_000_000
    assert api["maxPrice"] == 1_000_000
    assert api["maxLeverage"] == 75
    assert api["makerFeeRate"] == 0.0002
    assert api["takerFeeRate"] == 0.0006
    assert api["status"] == "Open"
    assert api["markPrice"] == 31570.5
    assert api["indexPrice"] == 31571
    json.dumps(api)
    assert "markPrice" not in XBT.to_api()
    usdt = CONTRACTS["XBTUSDTM"].to_api()
    assert (usdt["isInverse"], usdt["multiplier"], usdt["settleCurrency"]) == (False, 0.001, "USDT")
    eth = CONTRACTS["ETHUSDTM"].to_api()
    assert (eth["tickSize"], eth["multiplier"]) == (0.01, 0.01)
    assert format_price(XBT, Decimal("31570")) == "31570.0"
    assert format_price(XBT, Decimal("31570.10")) == "31570.1"
    assert format_price(CONTRACTS["ETHUSDTM"], Decimal("1999.5")) == "1999.50"


# ---------------------------------------------------------------- basic flow


def test_resting_order_emits_received_then_open(eng: MatchingEngine, clock: Clock) -> None:
    order, msgs = place(eng, clock, req("buy", "31570", 3671, client_oid="abc_1-X"))
    assert subjects(msgs) == ["received", "open"]
    check_stream(msgs, "XBTUSDM", 1001)
    assert eng.sequence == 1002
    rec, opn = msgs[0]["data"], msgs[1]["data"]
    assert rec["orderId"] == order.id and rec["clientOid"] == "abc_1-X"
    assert opn == {
        "symbol": "XBTUSDM",
        "sequence": 1002,
        "side": "buy",
        "orderTime": rec["ts"],
        "size": "3671",
        "orderId": order.id,
        "price": "31570.0",
        "ts": opn["ts"],
    }
    assert order.is_active and order.status == "open" and order.ts == opn["ts"]
    assert eng.best_bid() == Decimal("31570.0") and eng.best_ask() is None and eng.mid() is None


def test_instantly_filled_taker_gets_done(eng: MatchingEngine, clock: Clock) -> None:
    maker, _ = place(eng, clock, req("sell", "100.5", 10, user="m"))
    taker, msgs = place(eng, clock, req("buy", "101", 10, user="t"))
    assert subjects(msgs) == ["received", "match", "done", "done"]
    check_stream(msgs, "XBTUSDM", 1003)
    match = msgs[1]["data"]
    assert match["side"] == "buy"
    assert match["price"] == "100.5"  # the maker's price
    assert match["size"] == "10"
    assert (match["makerOrderId"], match["takerOrderId"]) == (maker.id, taker.id)
    assert msgs[2]["data"]["orderId"] == maker.id and msgs[2]["data"]["reason"] == "filled"
    assert msgs[3]["data"]["orderId"] == taker.id and msgs[3]["data"]["reason"] == "filled"
    assert taker.status == "done" and taker.done_reason == "filled" and not taker.is_active
    assert maker.status == "done" and maker.filled_size == 10
    assert eng.book_l3() == {"sequence": eng.sequence, "bids": [], "asks": []}


def test_price_time_priority(eng: MatchingEngine, clock: Clock) -> None:
    a1, _ = place(eng, clock, req("sell", "101", 5, user="m1"))
    a2, _ = place(eng, clock, req("sell", "100", 5, user="m2"))
    a3, _ = place(eng, clock, req("sell", "100", 5, user="m3"))
    a4, _ = place(eng, clock, req("sell", "100", 5, user="m4"))
    _, msgs = place(eng, clock, req("buy", "101", 17, user="t"))
    matches = [m["data"] for m in msgs if m["subject"] == "match"]
    assert [(m["makerOrderId"], m["price"], m["size"]) for m in matches] == [
        (a2.id, "100.0", "5"),
        (a3.id, "100.0", "5"),
        (a4.id, "100.0", "5"),
        (a1.id, "101.0", "2"),
    ]
    # Each fully filled maker's done follows its match at once.
    assert subjects(msgs) == ["received"] + ["match", "done"] * 3 + ["match", "done"]
    assert msgs[-1]["data"]["reason"] == "filled"
    assert eng.book_l3()["asks"] == [("101.0", [(a1.id, 3, a1.ts)])]


def test_partial_fill_of_maker_and_taker_rests_remainder(eng: MatchingEngine, clock: Clock) -> None:
    maker, _ = place(eng, clock, req("buy", "100", 50, user="m"))
    t1, msgs = place(eng, clock, req("sell", "100", 20, user="t"))
    assert subjects(msgs) == ["received", "match", "done"]
    assert maker.remaining_size == 30 and maker.is_active
    assert eng.book_l3()["bids"] == [("100.0", [(maker.id, 30, maker.ts)])]
    t2, msgs = place(eng, clock, req("sell", "99.9", 45, user="t"))
    assert subjects(msgs) == ["received", "match", "done", "open"]
    assert msgs[1]["data"]["size"] == "30"
    assert msgs[2]["data"]["orderId"] == maker.id
    opn = msgs[3]["data"]
    assert (opn["orderId"], opn["price"], opn["size"], opn["side"]) == (t2.id, "99.9", "15", "sell")
    assert t2.filled_size == 30 and t2.is_active and t2.remaining_size == 15
    assert eng.best_ask() == Decimal("99.9") and eng.best_bid() is None
    assert t1.done_reason == "filled"


def test_market_order_sweeps_and_cancels_remainder(eng: MatchingEngine, clock: Clock) -> None:
    b1, _ = place(eng, clock, req("buy", "100", 5, user="m"))
    b2, _ = place(eng, clock, req("buy", "99", 5, user="m"))
    order, msgs = place(eng, clock, req("sell", None, 12, user="t"))
    assert subjects(msgs) == ["received", "match", "done", "match", "done", "done"]
    assert [m["data"]["price"] for m in msgs if m["subject"] == "match"] == ["100.0", "99.0"]
    assert [m["data"]["makerOrderId"] for m in msgs if m["subject"] == "match"] == [b1.id, b2.id]
    assert msgs[-1]["data"] == {
        "symbol": "XBTUSDM",
        "reason": "canceled",
        "sequence": eng.sequence,
        "orderId": order.id,
        "ts": msgs[-1]["data"]["ts"],
    }
    assert order.filled_size == 10 and order.done_reason == "canceled" and order.cancel_exist
    assert order.price is None
    api = order.to_api()
    assert api["type"] == "market" and api["filledSize"] == 10 and api["price"] is None
    # A market order on an empty side: received, then done canceled.
    order, msgs = place(eng, clock, req("sell", None, 3, user="t"))
    assert subjects(msgs) == ["received", "done"] and order.done_reason == "canceled"


def test_market_buy_fully_filled(eng: MatchingEngine, clock: Clock) -> None:
    place(eng, clock, req("sell", "100", 5, user="m"))
    place(eng, clock, req("sell", "100.1", 5, user="m"))
    order, msgs = place(eng, clock, req("buy", None, 7, user="t"))
    assert subjects(msgs) == ["received", "match", "done", "match", "done"]
    assert msgs[-1]["data"]["orderId"] == order.id and msgs[-1]["data"]["reason"] == "filled"
    assert eng.book_l3()["asks"][0][1][0][1] == 3


def test_ioc_partial_fill_then_canceled(eng: MatchingEngine, clock: Clock) -> None:
    a1, _ = place(eng, clock, req("sell", "100", 4, user="m"))
    place(eng, clock, req("sell", "100.2", 4, user="m"))
    order, msgs = place(eng, clock, req("buy", "100.1", 10, user="t", time_in_force="IOC"))
    assert subjects(msgs) == ["received", "match", "done", "done"]
    assert msgs[2]["data"]["orderId"] == a1.id
    assert msgs[3]["data"]["orderId"] == order.id and msgs[3]["data"]["reason"] == "canceled"
    assert order.filled_size == 4 and not order.is_active
    assert eng.best_ask() == Decimal("100.2") and eng.best_bid() is None
    # An IOC that crosses nothing: received + done canceled.
    order, msgs = place(eng, clock, req("buy", "99", 1, user="t", time_in_force="IOC"))
    assert subjects(msgs) == ["received", "done"]


def test_post_only_that_would_cross_is_canceled(eng: MatchingEngine, clock: Clock) -> None:
    place(eng, clock, req("sell", "100", 4, user="m"))
    before = eng.book_l3()
    order, msgs = place(eng, clock, req("buy", "100", 1, user="p", post_only=True))
    assert subjects(msgs) == ["received", "done"]
    assert msgs[1]["data"]["reason"] == "canceled" and msgs[1]["data"]["orderId"] == order.id
    assert order.status == "done" and order.done_reason == "canceled" and order.filled_size == 0
    assert eng.book_l3()["asks"] == before["asks"]
    # A postOnly that does not cross rests normally.
    order, msgs = place(eng, clock, req("buy", "99.9", 1, user="p", post_only=True))
    assert subjects(msgs) == ["received", "open"] and order.is_active
    with pytest.raises(RejectError) as info:
        place(eng, clock, req("buy", "99", 1, post_only=True, time_in_force="IOC"))
    assert info.value.code == "400100"


def test_hidden_order_rests_invisibly_and_can_be_hit(eng: MatchingEngine, clock: Clock) -> None:
    hidden, msgs = place(eng, clock, req("sell", "100", 5, user="h", hidden=True))
    assert subjects(msgs) == ["received"]
    assert hidden.is_active
    visible, _ = place(eng, clock, req("sell", "100", 3, user="v"))
    snap = eng.snapshot(clock())
    assert [row[0] for row in snap["asks"]] == [visible.id]
    assert eng.book_l3()["asks"] == [("100.0", [(visible.id, 3, visible.ts)])]
    # Visible orders go first at one price, then the hidden one, although it came earlier.
    _, msgs = place(eng, clock, req("buy", "100", 4, user="t"))
    assert subjects(msgs) == ["received", "match", "done", "match", "done"]
    assert [m["data"]["makerOrderId"] for m in msgs if m["subject"] == "match"] == [
        visible.id,
        hidden.id,
    ]
    assert hidden.remaining_size == 4
    assert eng.book_l3()["asks"] == [] and eng.best_ask() is None
    assert eng.best_ticks("sell") == 1000  # still there for matching
    # A hidden level blocks a crossing rest, and an amend of a hidden order is silent.
    assert eng.amend_size(hidden.id, 2, clock()) == []
    _, msgs = place(eng, clock, req("buy", "100.5", 3, user="t"))
    assert subjects(msgs) == ["received", "match", "done", "open"]
    assert msgs[2]["data"]["orderId"] == hidden.id
    # Cancel of a hidden order is a done.
    h2, _ = place(eng, clock, req("buy", "50", 1, user="h", hidden=True))
    assert subjects(eng.cancel(h2.id, clock())) == ["done"]


def test_iceberg_is_rejected(eng: MatchingEngine, clock: Clock) -> None:
    with pytest.raises(RejectError) as info:
        place(eng, clock, req("buy", "100", 10, iceberg=True, visible_size=2))
    assert info.value.code == "400100" and "iceberg" in info.value.msg
    assert eng.sequence == 1000


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"side": "buy", "price": "100.05", "size": 1}, "300000"),  # not a tick multiple
        ({"side": "buy", "price": "0", "size": 1}, "300000"),
        ({"side": "buy", "price": "-1", "size": 1}, "300000"),
        ({"side": "buy", "price": "1000000.1", "size": 1}, "300000"),
        ({"side": "buy", "price": "100", "size": 10_000_001}, "300000"),
        ({"side": "buy", "price": "100", "size": 0}, "400100"),
        ({"side": "buy", "price": "100", "size": -3}, "400100"),
        ({"side": "hold", "price": "100", "size": 1}, "400100"),
        ({"side": "buy", "price": "100", "size": 1, "time_in_force": "FOK"}, "400100"),
        ({"side": "buy", "price": "100", "size": 1, "client_oid": "bad oid!"}, "400100"),
        ({"side": "buy", "price": "100", "size": 1, "client_oid": "x" * 41}, "400100"),
        ({"side": "buy", "price": "100", "size": 1, "leverage": "abc"}, "400100"),
        ({"side": "buy", "price": "100", "size": 1, "leverage": "0"}, "400100"),
        ({"side": "buy", "price": "100", "size": 1, "leverage": "76"}, "300000"),
        ({"side": "buy", "price": None, "size": 1, "post_only": True}, "400100"),
        ({"side": "buy", "price": None, "size": 1, "hidden": True}, "400100"),
    ],
)
def test_validation_rejects_before_emitting(
    eng: MatchingEngine, clock: Clock, kwargs: dict[str, Any], code: str
) -> None:
    place(eng, clock, req("sell", "200", 1))
    seq = eng.sequence
    book = eng.book_l3()
    kwargs = dict(kwargs)
    r = req(kwargs.pop("side"), kwargs.pop("price"), kwargs.pop("size"), **kwargs)
    with pytest.raises(RejectError) as info:
        eng.place(r, clock())
    assert info.value.code == code
    assert info.value.http_status == 400 and info.value.msg
    assert eng.sequence == seq and eng.book_l3() == book


def test_limit_without_price_and_lot_size(clock: Clock) -> None:
    eng = MatchingEngine(XBT)
    r = OrderRequest(user_id="u", client_oid="x1", side="buy", type="limit", price=None, size=1)
    with pytest.raises(RejectError) as info:
        eng.place(r, clock())
    assert info.value.code == "400100" and "price" in info.value.msg
    lot10 = Contract(**{**{f: getattr(XBT, f) for f in XBT.__dataclass_fields__}, "lot_size": 10})
    eng10 = MatchingEngine(lot10)
    with pytest.raises(RejectError) as info:
        eng10.place(req("buy", "100", 15), clock())
    assert info.value.code == "300000"
    order, _ = eng10.place(req("buy", "100", 20), clock())
    assert order.is_active and eng.sequence == 0


# ---------------------------------------------------------------- cancel, amend


def test_cancel_paths_and_errors(eng: MatchingEngine, clock: Clock) -> None:
    order, _ = place(eng, clock, req("buy", "100", 5, user="alice"))
    with pytest.raises(RejectError) as info:
        eng.cancel(order.id, clock(), user_id="bob")  # someone else's order
    assert info.value.http_status == 404
    msgs = eng.cancel(order.id, clock(), user_id="alice")
    assert subjects(msgs) == ["done"]
    assert msgs[0]["data"]["reason"] == "canceled" and msgs[0]["data"]["orderId"] == order.id
    assert order.status == "done" and order.cancel_exist and not order.is_active
    assert order.end_at is not None
    assert eng.book_l3()["bids"] == []
    seq = eng.sequence
    with pytest.raises(RejectError) as info:
        eng.cancel(order.id, clock())
    assert (info.value.code, info.value.http_status) == ("100004", 400)
    with pytest.raises(RejectError) as info:
        eng.cancel("0" * 24, clock())
    assert info.value.http_status == 404 and "does not exist" in info.value.msg
    # A filled order cannot be canceled either.
    maker, _ = place(eng, clock, req("buy", "100", 1, user="m"))
    place(eng, clock, req("sell", "100", 1, user="t"))
    seq = eng.sequence
    with pytest.raises(RejectError) as info:
        eng.cancel(maker.id, clock())
    assert info.value.code == "100004" and eng.sequence == seq


def test_cancel_by_client_oid_and_cancel_all(eng: MatchingEngine, clock: Clock) -> None:
    o1, _ = place(eng, clock, req("buy", "100", 5, user="u", client_oid="grid-1"))
    o2, _ = place(eng, clock, req("buy", "99", 5, user="u", client_oid="grid-2"))
    o3, _ = place(eng, clock, req("sell", "101", 5, user="u", client_oid="grid-3"))
    other, _ = place(eng, clock, req("sell", "102", 5, user="v", client_oid="grid-1"))
    assert eng.get_by_client_oid("u", "grid-1") is o1
    assert eng.get_by_client_oid("v", "grid-1") is other
    order, msgs = eng.cancel_by_client_oid("u", "grid-1", clock())
    assert order is o1 and subjects(msgs) == ["done"] and not o1.is_active
    with pytest.raises(RejectError) as info:
        eng.cancel_by_client_oid("u", "nope", clock())
    assert info.value.http_status == 404
    with pytest.raises(RejectError) as info:
        eng.cancel_by_client_oid("u", "grid-1", clock())
    assert info.value.code == "100004"
    assert eng.active_orders("u") == [o2, o3]
    ids, msgs = eng.cancel_all("u", clock())
    assert ids == [o2.id, o3.id]
    assert [m["data"]["orderId"] for m in msgs] == ids
    assert all(m["subject"] == "done" for m in msgs)
    assert eng.active_orders("u") == [] and eng.active_orders("v") == [other]
    assert eng.all_orders("u") == [o1, o2, o3]
    assert eng.cancel_all("nobody", clock()) == ([], [])
    assert eng.book_l3()["asks"] == [("102.0", [(other.id, 5, other.ts)])]


def test_amend_size_emits_update_and_keeps_priority(eng: MatchingEngine, clock: Clock) -> None:
    a, _ = place(eng, clock, req("sell", "100", 10, user="a"))
    b, _ = place(eng, clock, req("sell", "100", 10, user="b"))
    msgs = eng.amend_size(a.id, 4, clock())
    assert subjects(msgs) == ["update"]
    assert msgs[0]["data"]["orderId"] == a.id and msgs[0]["data"]["size"] == "4"
    assert eng.book_l3()["asks"] == [("100.0", [(a.id, 4, a.ts), (b.id, 10, b.ts)])]
    assert a.size == 4
    # After a partial fill the amend is about the remaining size.
    place(eng, clock, req("buy", "100", 1, user="t"))
    msgs = eng.amend_size(a.id, 2, clock())
    assert msgs[0]["data"]["size"] == "2" and a.size == 3 and a.filled_size == 1
    for bad in (0, 2, 3, -1):
        with pytest.raises(RejectError) as info:
            eng.amend_size(a.id, bad, clock())
        assert info.value.code == "400100"
    eng.cancel(a.id, clock())
    with pytest.raises(RejectError) as info:
        eng.amend_size(a.id, 1, clock())
    assert info.value.code == "100004"
    with pytest.raises(RejectError) as info:
        eng.amend_size("f" * 24, 1, clock())
    assert info.value.http_status == 404


# ---------------------------------------------------------------- limits


def test_duplicate_client_oid(eng: MatchingEngine, clock: Clock) -> None:
    first, _ = place(eng, clock, req("buy", "100", 1, user="u", client_oid="same"))
    seq = eng.sequence
    with pytest.raises(RejectError) as info:
        place(eng, clock, req("buy", "99", 1, user="u", client_oid="same"))
    assert info.value.code == "300018" and eng.sequence == seq
    with pytest.raises(RejectError):
        place(eng, clock, req("sell", None, 1, user="u", client_oid="same"))
    # Another user may use the same clientOid; after a done the owner may reuse it.
    place(eng, clock, req("buy", "99", 1, user="w", client_oid="same"))
    eng.cancel(first.id, clock())
    second, _ = place(eng, clock, req("buy", "98", 1, user="u", client_oid="same"))
    assert eng.get_by_client_oid("u", "same") is second
    assert eng.get_order(first.id) is first


def test_max_active_orders_per_user(clock: Clock) -> None:
    eng = MatchingEngine(XBT, max_active_per_user=3)
    for i in range(3):
        place(eng, clock, req("buy", str(100 + i), 1, user="u"))
    seq = eng.sequence
    with pytest.raises(RejectError) as info:
        place(eng, clock, req("buy", "90", 1, user="u"))
    assert info.value.code == "300001" and eng.sequence == seq
    # Other users, IOC and market orders are not limited by u's resting orders.
    place(eng, clock, req("sell", "200", 1, user="v"))
    place(eng, clock, req("buy", "200", 1, user="u", time_in_force="IOC"))
    place(eng, clock, req("sell", None, 1, user="u"))
    assert eng.active_count("u") == 2
    place(eng, clock, req("buy", "90", 1, user="u"))
    assert eng.active_count("u") == 3


def test_self_trade_is_allowed(eng: MatchingEngine, clock: Clock) -> None:
    maker, _ = place(eng, clock, req("buy", "100", 2, user="same"))
    taker, msgs = place(eng, clock, req("sell", "100", 2, user="same"))
    assert subjects(msgs) == ["received", "match", "done", "done"]
    assert maker.done_reason == "filled" and taker.done_reason == "filled"


# ---------------------------------------------------------------- views


def test_snapshot_shape_and_ordering(eng: MatchingEngine, clock: Clock) -> None:
    a_far, _ = place(eng, clock, req("sell", "101", 1))
    a1, _ = place(eng, clock, req("sell", "100.5", 2))
    a2, _ = place(eng, clock, req("sell", "100.5", 3))
    b_far, _ = place(eng, clock, req("buy", "98", 4))
    b1, _ = place(eng, clock, req("buy", "99.5", 5))
    b2, _ = place(eng, clock, req("buy", "99.5", 6))
    place(eng, clock, req("buy", "99.9", 7, hidden=True))
    now = clock()
    snap = eng.snapshot(now)
    assert set(snap) == {"symbol", "sequence", "ts", "asks", "bids"}
    assert (snap["symbol"], snap["sequence"], snap["ts"]) == ("XBTUSDM", eng.sequence, now)
    assert snap["asks"] == [
        [a1.id, "100.5", "2", a1.ts],
        [a2.id, "100.5", "3", a2.ts],
        [a_far.id, "101.0", "1", a_far.ts],
    ]
    assert snap["bids"] == [
        [b1.id, "99.5", "5", b1.ts],
        [b2.id, "99.5", "6", b2.ts],
        [b_far.id, "98.0", "4", b_far.ts],
    ]
    for row in snap["asks"] + snap["bids"]:
        assert type(row[3]) is int
    json.dumps(snap)
    assert eng.book_l3() == {
        "sequence": eng.sequence,
        "bids": [
            ("99.5", [(b1.id, 5, b1.ts), (b2.id, 6, b2.ts)]),
            ("98.0", [(b_far.id, 4, b_far.ts)]),
        ],
        "asks": [
            ("100.5", [(a1.id, 2, a1.ts), (a2.id, 3, a2.ts)]),
            ("101.0", [(a_far.id, 1, a_far.ts)]),
        ],
    }
    assert eng.best_bid() == Decimal("99.5") and eng.best_ask() == Decimal("100.5")
    assert eng.mid() == Decimal("100.0")
    assert eng.best_ticks("buy") == 999  # the hidden bid counts for matching


def test_order_to_api(clock: Clock) -> None:
    eng = MatchingEngine(CONTRACTS["XBTUSDTM"])
    maker, _ = eng.place(req("sell", "30000", 10, user="m", leverage="20", remark="hi"), clock())
    eng.place(req("buy", "30000", 4, user="t"), clock())
    api = maker.to_api()
    assert api["id"] == maker.id
    assert (api["symbol"], api["type"], api["side"], api["price"]) == (
        "XBTUSDTM",
        "limit",
        "sell",
        "30000.0",
    )
    assert (api["size"], api["filledSize"], api["dealSize"]) == (10, 4, 4)
    assert api["value"] == "300"  # 10 * 0.001 * 30000
    assert api["filledValue"] == api["dealValue"] == "120"
    assert (api["leverage"], api["remark"], api["timeInForce"]) == ("20", "hi", "GTC")
    assert (api["isActive"], api["status"], api["cancelExist"]) == (True, "open", False)
    assert api["settleCurrency"] == "USDT" and api["endAt"] is None
    assert type(api["orderTime"]) is int and api["orderTime"] > 10**18
    assert api["createdAt"] == api["orderTime"] // 1_000_000
    for key in (
        "stp",
        "stop",
        "postOnly",
        "hidden",
        "iceberg",
        "forceHold",
        "closeOrder",
        "visibleSize",
        "clientOid",
        "tags",
        "updatedAt",
        "reduceOnly",
    ):
        assert key in api
    json.dumps(api)
    inv = MatchingEngine(XBT)
    o, _ = inv.place(req("buy", "32000", 100), clock())
    assert o.to_api()["value"] == "0.00312500"  # 100 USD at 32000


def test_ids_are_hex_unique_and_deterministic(clock: Clock) -> None:
    def run(seed: int) -> list[Message]:
        eng = MatchingEngine(XBT, id_seed=seed)
        out: list[Message] = []
        now = T0
        for i in range(50):
            now += 1000
            out += eng.place(
                req("buy" if i % 2 else "sell", "100", 1 + i % 3, client_oid=f"o{i}"), now
            )[1]
        return out

    a, b, c = run(5), run(5), run(6)
    assert a == b
    ids = [m["data"]["orderId"] for m in a if m["subject"] == "received"]
    trades = [m["data"]["tradeId"] for m in a if m["subject"] == "match"]
    assert len(set(ids)) == len(ids) and len(set(trades)) == len(trades) and trades
    assert not set(ids) & set(trades)
    assert all(_HEX24.fullmatch(x) for x in ids + trades)
    assert [m["data"]["orderId"] for m in c if m["subject"] == "received"] != ids
    other = MatchingEngine(CONTRACTS["ETHUSDTM"], id_seed=5)
    oid = other.place(OrderRequest("u", "o0", "buy", price=Decimal(1), size=1), T0 + 1000)[0].id
    assert oid not in ids


def test_done_orders_are_forgotten_beyond_the_cap(clock: Clock) -> None:
    eng = MatchingEngine(XBT, max_done_orders=5)
    orders = [eng.place(req("buy", None, 1, user="u"), clock())[0] for _ in range(8)]
    assert [eng.get_order(o.id) for o in orders[:3]] == [None] * 3
    assert all(eng.get_order(o.id) is o for o in orders[3:])
    assert eng.all_orders("u") == orders[3:]
    assert eng.get_by_client_oid("u", orders[0].client_oid) is None


def test_ts_strictly_increasing_even_with_a_frozen_clock() -> None:
    eng = MatchingEngine(XBT)
    msgs: list[Message] = []
    for i in range(5):
        msgs += eng.place(req("sell", "100", 1, client_oid=f"f{i}"), T0)[1]
    msgs += eng.place(req("buy", "100", 5, client_oid="t"), T0)[1]
    check_stream(msgs, "XBTUSDM", 1)


# ---------------------------------------------------------------- random stress vs a reference


class _Ref:
    """Obviously correct, slow reference: a flat list of resting orders."""

    def __init__(self) -> None:
        self.rest: list[dict[str, Any]] = []  # arrival order
        self.arrival = 0

    def place(
        self, oid: str, side: str, price: int | None, size: int, kind: str, hidden: bool
    ) -> list[tuple[str, int, int]]:
        fills: list[tuple[str, int, int]] = []
        while size:
            opp = [o for o in self.rest if o["side"] != side]
            if price is not None:
                opp = [
                    o
                    for o in opp
                    if (o["price"] <= price if side == "buy" else o["price"] >= price)
                ]
            if not opp:
                break
            key = (
                (lambda o: (o["price"], o["hidden"], o["n"]))
                if side == "buy"
                else (lambda o: (-o["price"], o["hidden"], o["n"]))
            )
            best = min(opp, key=key)
            fill = min(size, best["size"])
            fills.append((best["id"], best["price"], fill))
            best["size"] -= fill
            size -= fill
            if not best["size"]:
                self.rest.remove(best)
        if size and kind == "gtc":
            self.arrival += 1
            self.rest.append(
                {
                    "id": oid,
                    "side": side,
                    "price": price,
                    "size": size,
                    "hidden": hidden,
                    "n": self.arrival,
                }
            )
        return fills


def test_random_matching_agrees_with_reference() -> None:
    rng = random.Random(20240601)
    eng = MatchingEngine(XBT, id_seed=3, max_active_per_user=10_000)
    ref = _Ref()
    now = T0
    stream: list[Message] = []
    for i in range(3000):
        now += 1000
        action = rng.random()
        resting = [o for o in ref.rest]
        if action < 0.2 and resting:
            victim = rng.choice(resting)
            stream += eng.cancel(victim["id"], now)
            ref.rest.remove(victim)
            continue
        if action < 0.3 and resting:
            victim = rng.choice(resting)
            if victim["size"] > 1:
                new = rng.randint(1, victim["size"] - 1)
                stream += eng.amend_size(victim["id"], new, now)
                victim["size"] = new
            continue
        side = rng.choice(("buy", "sell"))
        kind = rng.choice(("gtc", "gtc", "gtc", "ioc", "market"))
        hidden = kind == "gtc" and rng.random() < 0.1
        price = rng.randint(990, 1010)
        size = rng.randint(1, 30)
        r = OrderRequest(
            user_id=f"u{rng.randrange(4)}",
            client_oid=f"r{i}",
            side=side,
            type="market" if kind == "market" else "limit",
            price=None if kind == "market" else price * XBT.tick_size,
            size=size,
            time_in_force="IOC" if kind == "ioc" else "GTC",
            hidden=hidden,
        )
        order, msgs = eng.place(r, now)
        stream += msgs
        expected = ref.place(
            order.id, side, None if kind == "market" else price, size, kind, hidden
        )
        got = [
            (
                m["data"]["makerOrderId"],
                int(Decimal(m["data"]["price"]) / XBT.tick_size),
                int(m["data"]["size"]),
            )
            for m in msgs
            if m["subject"] == "match"
        ]
        assert got == expected, i
        bid, ask = eng.best_ticks("buy"), eng.best_ticks("sell")
        assert bid is None or ask is None or bid < ask
    check_stream(stream, "XBTUSDM", 1)
    # Final book equals the reference, level by level, in queue order.
    for side, key in (("buy", "bids"), ("sell", "asks")):
        refs = sorted(
            (o for o in ref.rest if o["side"] == side and not o["hidden"]),
            key=lambda o: (-o["price"] if side == "buy" else o["price"], o["n"]),
        )
        flat = [(oid, size) for _, orders in eng.book_l3()[key] for oid, size, _ in orders]
        assert flat == [(o["id"], o["size"]) for o in refs]
        everything = [o for o in ref.rest if o["side"] == side]
        assert eng.resting_count(side) == len(everything)
        assert eng.resting_size(side) == sum(o["size"] for o in everything)
