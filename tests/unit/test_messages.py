"""Parser: every subject, both snapshot row shapes, every malformed case."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kumex_l3 import (
    Control,
    Done,
    Match,
    MessageError,
    Open,
    Received,
    Update,
    parse_message,
    parse_snapshot,
)
from kumex_l3.messages import MAX_MESSAGE_BYTES, format_qty, parse_qty

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "real_l3_2022.jsonl"
TOPIC = "/contractMarket/level3v2:XBTUSDM"


def envelope(subject: str, **data: Any) -> str:
    body = {"symbol": "XBTUSDM", "sequence": 3262786901, "ts": 1547697294838004923, **data}
    return json.dumps({"type": "message", "topic": TOPIC, "subject": subject, "data": body})


OPEN = dict(side="buy", price="31570.0", size="3671", orderId="629727c9edde6b0001f422a7",
            orderTime=1654073289118060857)
MATCH = dict(side="buy", price="3634", size="10", makerOrderId="m1", takerOrderId="t1",
             tradeId="6c23b5454353a8882d023b3o")


def test_documented_examples_parse_exactly() -> None:
    msg = parse_message(envelope("open", **OPEN))
    assert isinstance(msg, Open)
    assert msg.sequence == 3262786901 and msg.ts == 1547697294838004923
    assert msg.order_time == 1654073289118060857
    assert msg.price == "31570.0" and msg.price_value == Decimal("31570.0")
    assert msg.qty == 3671 and msg.side == "buy"

    m = parse_message(envelope("match", **MATCH).encode())
    assert isinstance(m, Match)
    assert (m.maker_order_id, m.taker_order_id, m.trade_id) == ("m1", "t1",
                                                                "6c23b5454353a8882d023b3o")
    assert m.qty == 10 and m.remain_qty is None

    u = parse_message(envelope("update", orderId="o", size="100"))
    assert isinstance(u, Update) and u.qty == 100
    d = parse_message(envelope("done", orderId="o", reason="canceled"))
    assert isinstance(d, Done) and d.reason == "canceled"
    r = parse_message(envelope("received", orderId="o", clientOid="c1"))
    assert isinstance(r, Received) and r.client_oid == "c1"


def test_real_2022_capture() -> None:
    lines = FIXTURE.read_text().splitlines()
    parsed = [parse_message(line) for line in lines]
    assert [type(p) for p in parsed] == [Open, Open, Received]
    first = parsed[0]
    assert isinstance(first, Open)
    # ts beyond 2**53 survives exactly (a float would round it).
    assert first.ts == 1654073248910399802 and first.ts > 2**53
    assert float(first.ts) != first.ts


def test_remain_size_and_decimal_sizes() -> None:
    m = parse_message(envelope("match", **MATCH, remainSize="0"))
    assert isinstance(m, Match) and m.remain_qty == 0
    o = parse_message(envelope("open", **{**OPEN, "size": "0.5"}))
    assert isinstance(o, Open) and o.qty == Decimal("0.5")
    assert parse_qty("10.0") == 10 and isinstance(parse_qty("10.0"), int)
    assert format_qty(Decimal("1.50")) == "1.5" and format_qty(Decimal("1E+1")) == "10"


def test_prices_compare_as_numbers() -> None:
    nine = parse_message(envelope("open", **{**OPEN, "price": "9"}))
    ten = parse_message(envelope("open", **{**OPEN, "price": "10.0"}))
    assert isinstance(nine, Open) and isinstance(ten, Open)
    assert nine.price_value < ten.price_value
    assert "9" > "10.0"  # what string comparison would have said


@pytest.mark.parametrize(
    ("kind", "control_id", "code"),
    [("welcome", "abc", None), ("ack", "1545910660739", None), ("pong", "17", None),
     ("error", "x", 401)],
)
def test_control_envelopes(kind: str, control_id: str, code: int | None) -> None:
    raw: dict[str, Any] = {"id": control_id, "type": kind}
    if code is not None:
        raw.update(code=code, data="token is invalid")
    msg = parse_message(json.dumps(raw))
    assert msg == Control(type=kind, id=control_id, code=code,
                          data="token is invalid" if code else None)


BAD: list[tuple[str, str | bytes, str]] = [
    ("bad json", "{not json", "bad envelope"),
    ("not an object", "[1,2]", "bad envelope"),
    ("truncated", envelope("open", **OPEN)[:-5], "bad envelope"),
    ("unknown envelope", '{"type":"surprise"}', "unknown envelope type"),
    ("no subject", json.dumps({"type": "message", "topic": TOPIC, "data": {}}), "without subject"),
    ("unknown subject", envelope("teleport", orderId="o"), "unknown subject"),
    ("no data", json.dumps({"type": "message", "topic": TOPIC, "subject": "done"}), "missing data"),
    ("missing field", envelope("open", **{k: v for k, v in OPEN.items() if k != "orderId"}),
     "orderId"),
    ("missing sequence", json.dumps({"type": "message", "topic": TOPIC, "subject": "done",
                                     "data": {"symbol": "XBTUSDM", "ts": 1, "orderId": "o",
                                              "reason": "filled"}}), "sequence"),
    ("sequence as string", envelope("done", orderId="o", reason="filled").replace(
        '"sequence": 3262786901', '"sequence": "3262786901"'), "sequence"),
    ("sequence as float", envelope("done", orderId="o", reason="filled").replace(
        '"sequence": 3262786901', '"sequence": 3262786901.0'), "sequence"),
    ("huge sequence", envelope("done", orderId="o", reason="filled").replace(
        '"sequence": 3262786901', '"sequence": 99999999999999999999999'), "sequence"),
    ("negative ts", envelope("done", orderId="o", reason="filled").replace(
        '"ts": 1547697294838004923', '"ts": -1'), "ts"),
    ("negative size", envelope("open", **{**OPEN, "size": "-1"}), "size"),
    ("zero open size", envelope("open", **{**OPEN, "size": "0"}), "size"),
    ("non-numeric size", envelope("open", **{**OPEN, "size": "lots"}), "size"),
    ("NaN size", envelope("match", **{**MATCH, "size": "NaN"}), "size"),
    ("infinite price", envelope("open", **{**OPEN, "price": "Infinity"}), "price"),
    ("negative price", envelope("open", **{**OPEN, "price": "-5"}), "price"),
    ("numeric price", envelope("open", **{**OPEN, "price": 31570.0}), "price"),
    ("bad side", envelope("open", **{**OPEN, "side": "up"}), "side"),
    ("bad reason", envelope("done", orderId="o", reason="vanished"), "reason"),
    ("update negative", envelope("update", orderId="o", size="-2"), "size"),
    ("topic of another symbol", envelope("done", orderId="o", reason="filled").replace(
        "level3v2:XBTUSDM", "level3v2:ETHUSDTM"), "topic"),
    ("one megabyte", envelope("open", **{**OPEN, "orderId": "x" * (1 << 20)}), "exceeds"),
    ("one megabyte bytes", b" " * (MAX_MESSAGE_BYTES + 1), "exceeds"),
    ("not utf-8", b'{"type":"message","subject":"done","data":{"symbol":"\xff"}}', "utf-8"),
]


@pytest.mark.parametrize(("name", "raw", "reason"), BAD, ids=[b[0] for b in BAD])
def test_malformed_messages_raise_message_error(name: str, raw: str | bytes, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        parse_message(raw)
    # Decoder wording varies between msgspec releases ("invalid utf-8", "Invalid UTF-8").
    assert reason.lower() in info.value.reason.lower()
    assert isinstance(info.value, ValueError)  # one documented type, a ValueError too


def test_snapshot_both_row_shapes_unsorted() -> None:
    data = {
        "symbol": "XBTUSDM", "sequence": 1669149851334, "ts": 1590634672060667000,
        "asks": [["a2", "16953.0", "5", 3], ["a1", "16952.0", "1", 1671206200542484700],
                 [1650874840161291000, "a3", "16952.0", "2", 1671206200542484701]],
        "bids": [["b2", "9.5", "1", 2], ["b1", "10.0", "1000", 1650874840161291000],
                 ["b3", "10.0", "7", 5]],
    }
    snap = parse_snapshot(data)
    assert snap.sequence == 1669149851334
    assert [o.order_id for o in snap.asks] == ["a1", "a3", "a2"]
    assert [o.order_id for o in snap.bids] == ["b3", "b1", "b2"]  # same price: by ts
    assert snap.asks[1].order_time == 1650874840161291000
    assert parse_snapshot(json.dumps(data)) == snap


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sequence": "1"}, "sequence"),
        ({"symbol": None}, "symbol"),
        ({"bids": "nope"}, "bids"),
        ({"bids": [["b", "1", "1"]]}, "3 elements"),
        ({"bids": [["b", 1.5, "1", 1]]}, "strings"),
        ({"bids": [["b", "1", "-1", 1]]}, "size"),
        ({"bids": [["b", "1", "1", "1"]]}, "ts"),
        ({"bids": [["b", "1", "1", 1]], "asks": [["b", "2", "1", 1]]}, "twice"),
        ({"asks": [["a", "abc", "1", 1]]}, "price"),
    ],
)
def test_bad_snapshots(change: dict[str, Any], reason: str) -> None:
    data: dict[str, Any] = {"symbol": "XBTUSDM", "sequence": 5, "ts": 1, "bids": [], "asks": []}
    data.update(change)
    with pytest.raises(MessageError) as info:
        parse_snapshot(data)
    assert reason in info.value.reason
