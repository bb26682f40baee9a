"""Stop orders, the order test and the account overview of the sandbox's exchange
(services.sandbox.exchange), in process.

A real :class:`Exchange` with its real engines, stop books and hub (no client
connected, no flow running: the books are what the tests put in them); the L3
stream is read back from the exchange's journal.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import pytest

from services.sandbox.engine import OrderRequest, RejectError
from services.sandbox.exchange import Exchange
from services.sandbox.rest import ApiRefusal, parse_order
from services.sandbox.settings import SandboxSettings
from services.sandbox.stops import StopOrder, StopSpec

SYMBOL = "XBTUSDM"
A, B = "demo-1", "demo-2"
_counter = 0


def _exchange(**settings: Any) -> Exchange:
    return Exchange(SandboxSettings(symbols=SYMBOL, flow_rate=0, seed=7, start_sequence=1000,
                                    journal_size=10_000, **settings))


def _req(user: str, side: str, size: int, price: str | None = None, **kw: Any) -> OrderRequest:
    global _counter
    _counter += 1
    return OrderRequest(user_id=user, client_oid=f"t{_counter}", side=side,
                        type="market" if price is None else "limit",
                        price=None if price is None else Decimal(price), size=size,
                        leverage="5", **kw)


def _stream(ex: Exchange) -> list[dict[str, Any]]:
    return [json.loads(text) for _, text in ex.journal[SYMBOL]]


def _ids(ex: Exchange, subject: str) -> list[str]:
    return [m["data"]["orderId"] for m in _stream(ex) if m["subject"] == subject]


def _api(ex: Exchange, user: str, order_id: str) -> dict[str, Any]:
    order = ex.order_of(user, order_id)
    assert order is not None
    return ex.order_api(order)


def _book_ids(ex: Exchange) -> set[str]:
    book = ex.book_l3(SYMBOL)
    return {o["orderId"] for side in ("bids", "asks") for lv in book[side] for o in lv["orders"]}


def test_a_waiting_stop_is_off_the_book_and_the_feed() -> None:
    ex = _exchange()
    ex.submit(SYMBOL, _req(B, "buy", 1, "100.0"))
    sequence = ex.engines[SYMBOL].sequence
    order_id, _ = ex.submit(SYMBOL, _req(A, "sell", 1, "90.0"), StopSpec("down", Decimal("95")))
    assert ex.engines[SYMBOL].sequence == sequence and order_id not in _book_ids(ex)
    held = ex.order_of(A, order_id)
    assert isinstance(held, StopOrder) and ex.order_of(B, order_id) is None
    api = ex.order_api(held)
    assert (api["stop"], api["stopPrice"], api["stopPriceType"], api["stopTriggered"],
            api["status"]) == ("down", "95.0", "TP", False, "open")
    assert [s.id for s in ex.stop_orders(A)] == [order_id]
    assert ex.order_list(A, active=True) == []  # listed by /api/v1/stopOrders only


def test_trades_fire_stops_in_order_and_a_fired_order_fires_the_next() -> None:
    ex = _exchange()
    for price in ("100.0", "99.0", "98.0"):
        ex.submit(SYMBOL, _req(B, "buy", 1, price))
    market, _ = ex.submit(SYMBOL, _req(A, "sell", 2), StopSpec("down", Decimal("100")))
    resting, _ = ex.submit(SYMBOL, _req(A, "sell", 1, "200.0"), StopSpec("down", Decimal("99")))
    ex.submit(SYMBOL, _req(B, "sell", 1, "100.0", time_in_force="IOC"))  # trades at 100
    # The trade at 100 fires the market stop; its fills at 99 and 98 fire the other.
    stream = _stream(ex)
    received = [m["data"]["orderId"] for m in stream if m["subject"] == "received"]
    assert received[-2:] == [market, resting]
    at = {m["data"]["orderId"]: i for i, m in enumerate(stream) if m["subject"] == "received"}
    market_done = max(i for i, m in enumerate(stream)
                      if m["subject"] == "done" and m["data"]["orderId"] == market)
    assert at[market] < market_done < at[resting]  # one batch out before the next placement
    sold = [m["data"]["price"] for m in stream
            if m["subject"] == "match" and m["data"]["takerOrderId"] == market]
    assert sold == ["99.0", "98.0"]
    assert _api(ex, A, market)["status"] == "done"
    api = _api(ex, A, resting)
    assert (api["status"], api["stopTriggered"], api["stop"], api["price"]) == (
        "open", True, "down", "200.0")
    assert resting in _book_ids(ex) and ex.stop_orders(A) == []
    assert _ids(ex, "open")[-1] == resting
    ex.stop_books[SYMBOL].check()


def test_a_stop_the_last_trade_already_reached_fires_when_placed() -> None:
    ex = _exchange()
    ex.submit(SYMBOL, _req(B, "buy", 1, "100.0"))
    ex.submit(SYMBOL, _req(B, "sell", 1, "100.0", time_in_force="IOC"))
    order_id, _ = ex.submit(SYMBOL, _req(A, "buy", 1, "50.0"), StopSpec("down", Decimal("101")))
    assert order_id in _book_ids(ex) and ex.stop_orders(A) == []
    waiting, _ = ex.submit(SYMBOL, _req(A, "buy", 1, "50.0"), StopSpec("down", Decimal("99.9")))
    assert [s.id for s in ex.stop_orders(A)] == [waiting]


def test_a_fired_stop_the_engine_refuses_is_canceled_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    ex = _exchange(max_active_orders=1)
    ex.submit(SYMBOL, _req(A, "buy", 1, "50.0"))  # A's one open order
    order_id, _ = ex.submit(SYMBOL, _req(A, "buy", 1, "60.0"), StopSpec("up", Decimal("100")))
    ex.submit(SYMBOL, _req(B, "sell", 1, "100.0"))
    with caplog.at_level(logging.WARNING, logger="services.sandbox.exchange"):
        ex.submit(SYMBOL, _req(B, "buy", 1, "100.0", time_in_force="IOC"))
    assert order_id in caplog.text and "300001" in caplog.text
    api = _api(ex, A, order_id)
    assert (api["status"], api["cancelExist"], api["stopTriggered"]) == ("done", True, True)
    assert order_id not in _ids(ex, "received") and ex.stop_orders(A) == []
    assert [o.id for o in ex.order_list(A, active=False)] == [order_id]
    with pytest.raises(RejectError) as refused:
        ex.cancel_order(A, order_id)
    assert refused.value.code == "100004"


def test_cancel_a_waiting_stop_by_id_client_oid_and_all() -> None:
    ex = _exchange()
    request = _req(A, "buy", 1, "50.0")
    first, _ = ex.submit(SYMBOL, request, StopSpec("up", Decimal("500")))
    with pytest.raises(RejectError) as duplicate:
        ex.submit(SYMBOL, request)  # its clientOid is taken while it waits
    assert duplicate.value.code == "300018"
    found = ex.order_by_client_oid(A, request.client_oid)
    assert found is not None and found.id == first
    assert ex.cancel_order_by_client_oid(A, request.client_oid) == request.client_oid
    second, _ = ex.submit(SYMBOL, _req(A, "buy", 1, "50.0"), StopSpec("up", Decimal("500")))
    third, _ = ex.submit(SYMBOL, _req(A, "buy", 1, "50.0"), StopSpec("up", Decimal("600")))
    assert ex.cancel_order(A, second) == [second]
    assert ex.cancel_stops(A, SYMBOL) == [third] and ex.cancel_stops(A) == []
    assert {o.id for o in ex.order_list(A, active=False)} == {first, second, third}


def test_check_order_refuses_as_submit_and_changes_nothing() -> None:
    ex = _exchange(max_active_orders=1)
    sequence = ex.engines[SYMBOL].sequence
    checked = ex.check_order(SYMBOL, _req(A, "buy", 1, "50.0"))
    assert len(checked["orderId"]) == 24 and ex.engines[SYMBOL].sequence == sequence
    ex.submit(SYMBOL, _req(A, "buy", 1, "50.0"))
    for request, stop in ((_req(A, "buy", 1, "50.0"), None),  # too many open orders
                          (_req(A, "buy", 1, "50.05"), None),  # off the tick
                          (_req(A, "buy", 1, "50.0"), StopSpec("up", Decimal("0.01")))):
        with pytest.raises(RejectError) as checking:
            ex.check_order(SYMBOL, request, stop)
        with pytest.raises(RejectError) as placing:
            ex.submit(SYMBOL, request, stop)
        assert (checking.value.code, checking.value.msg) == (placing.value.code,
                                                               placing.value.msg)
    assert ex.stop_orders(A) == []


def _body(**fields: Any) -> bytes:
    return json.dumps({"clientOid": "k", "side": "sell", "symbol": SYMBOL, "leverage": "5",
                       "type": "market", "size": 1, **fields}).encode()


def test_order_bodies_with_and_without_stop_fields() -> None:
    # The venue's own example sends empty stop fields with an ordinary order.
    assert parse_order(_body(stop="", stopPrice=0, stopPriceType=""), A)[2] is None
    _, _, stop = parse_order(_body(stop="up", stopPrice="30000.5", stopPriceType="TP"), A)
    assert stop == StopSpec("up", Decimal("30000.5"), "TP")
    for fields, words in (({"stopPrice": "100"}, "need stop"),
                          ({"stopPriceType": "TP"}, "need stop"),
                          ({"stop": "sideways", "stopPrice": 1, "stopPriceType": "TP"},
                           "down or up"),
                          ({"stop": "down", "stopPrice": 1}, "stopPriceType is required"),
                          ({"stop": "down", "stopPrice": 1, "stopPriceType": "MP"},
                           "MP (mark price) is not supported"),
                          ({"stop": "down", "stopPrice": 1, "stopPriceType": "XX"},
                           "TP, MP or IP"),
                          ({"stop": "down", "stopPriceType": "TP"}, "stopPrice is required"),
                          ({"stop": "down", "stopPrice": "low", "stopPriceType": "TP"},
                           "must be a number")):
        with pytest.raises(ApiRefusal) as refused:
            parse_order(_body(**fields), A)
        assert refused.value.code == "400100" and words in refused.value.msg, fields


def test_account_overview_starts_from_the_configured_balances() -> None:
    ex = _exchange(starting_balances={"XBT": Decimal("2.5")})
    assert ex.account_overview(A, "XBT")["marginBalance"] == 2.5
    assert ex.account_overview(A, "USDT")["availableBalance"] == 0  # left out: 0
    with pytest.raises(RejectError) as unknown:
        ex.account_overview(A, "DOGE")
    assert unknown.value.code == "400100"
    ex.submit(SYMBOL, _req(A, "buy", 100, "50000.0"))
    # An open order holds its value (100 USD at 50000: 0.002 XBT) over its leverage (5).
    overview = ex.account_overview(A, "XBT")
    assert overview["orderMargin"] == pytest.approx(0.0004)
    assert overview["availableBalance"] == pytest.approx(2.5 - 0.0004)
