"""services.sandbox.stops: which stop orders a sequence of trades fires, and in what order.

The property test drives a :class:`StopBook` and a slow, obvious reference (a
list of waiting stops in creation order, scanned whole at every trade) with the
same random adds, cancels and trade prices, and asks for the same fired
stops, in the same order, and the same waiting ones.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sandbox.contracts import CONTRACTS
from services.sandbox.engine import OrderRequest, RejectError
from services.sandbox.stops import StopBook, StopOrder, StopSpec, new_stop, stop_ticks

XBT = CONTRACTS["XBTUSDM"]
TICK = XBT.tick_size


def _stop(order_id: str, direction: str, ticks: int, *, user: str = "u1",
          client_oid: str | None = None, now_ms: int = 1) -> StopOrder:
    request = OrderRequest(user_id=user, client_oid=client_oid or f"c-{order_id}", side="sell",
                           type="market", size=1, leverage="5")
    return new_stop(order_id, request, XBT, StopSpec(direction, ticks * TICK), None, "5", now_ms)


def test_down_fires_at_or_below_up_at_or_above() -> None:
    book = StopBook("XBTUSDM")
    book.add(_stop("d", "down", 1000))
    book.add(_stop("u", "up", 1010))
    assert book.fire(1001, 2) == [] and book.fire(1009, 2) == [] and len(book) == 2
    (down,) = book.fire(1000, 3)
    assert down.id == "d" and down.triggered and down.placed and down.updated_at == 3
    (up,) = book.fire(1010, 4)
    assert up.id == "u" and len(book) == 0
    book.check()


def test_one_trade_fires_in_creation_order_not_price_order() -> None:
    book = StopBook("XBTUSDM")
    for order_id, direction, ticks in (("a", "down", 900), ("b", "up", 800), ("c", "down", 1000),
                                       ("d", "down", 950), ("e", "up", 990)):
        book.add(_stop(order_id, direction, ticks))
    # 899 reaches the down stops at 900, 1000 and 950 and the up stop at 800.
    assert [s.id for s in book.fire(899, 1)] == ["a", "b", "c", "d"]
    assert [s.id for s in book.fire(1200, 1)] == ["e"]


def test_cancel_and_lookups() -> None:
    book = StopBook("XBTUSDM")
    book.add(_stop("a", "down", 900, client_oid="x"))
    book.add(_stop("b", "up", 1100, user="u2"))
    with pytest.raises(RejectError) as other:
        book.cancel("b", "u1", 5)
    assert (other.value.code, other.value.http_status) == ("100004", 404)
    with pytest.raises(RejectError) as unknown:
        book.cancel("zz", "u1", 5)
    assert unknown.value.http_status == 404
    canceled = book.cancel("a", "u1", 5)
    assert canceled.status == "canceled" and not canceled.triggered and canceled.end_at == 5
    with pytest.raises(RejectError) as twice:
        book.cancel("a", "u1", 6)
    assert (twice.value.code, twice.value.http_status) == ("100004", 400)
    assert book.get("a") is canceled and book.by_client_oid("u1", "x") is canceled
    assert list(book.finished("u1")) == [canceled] and book.open_orders("u1") == []
    assert book.fire(1, 7) == []  # a canceled stop never fires
    assert book.cancel_all("u2", 8) == ["b"] and len(book) == 0
    book.check()


def test_limits_per_account_and_client_oid() -> None:
    book = StopBook("XBTUSDM", max_per_user=2)
    book.add(_stop("a", "down", 900, client_oid="x"))
    with pytest.raises(RejectError) as dup:
        book.add(_stop("b", "down", 900, client_oid="x"))
    assert dup.value.code == "300018"
    book.add(_stop("b", "down", 901))
    with pytest.raises(RejectError) as full:
        book.add(_stop("c", "up", 901))
    assert full.value.code == "300001"
    book.add(_stop("c", "up", 901, user="u2"))  # per account
    book.fire(900, 1)  # "a" fired: its clientOid is free, a place is free
    book.add(_stop("d", "up", 2000, client_oid="x"))
    book.check()


def test_refused_is_canceled_and_triggered() -> None:
    book = StopBook("XBTUSDM")
    book.add(_stop("a", "down", 900))
    (fired,) = book.fire(900, 1)
    book.refused(fired, "too many active orders", 2)
    api = fired.to_api()
    assert (api["status"], api["isActive"], api["cancelExist"], api["stopTriggered"]) == (
        "done", False, True, True)
    assert list(book.finished("u1")) == [fired]


def test_stop_price_must_fit_the_contract() -> None:
    assert stop_ticks(XBT, StopSpec("down", Decimal("30000.5"))) == 300005
    for bad in ("30000.05", "0", "-1", "1000001"):
        with pytest.raises(RejectError) as refused:
            stop_ticks(XBT, StopSpec("down", Decimal(bad)))
        assert refused.value.code == "300000"


def test_api_shape_of_a_waiting_stop() -> None:
    request = OrderRequest(user_id="u1", client_oid="k", side="buy", type="limit",
                           price=Decimal("30000.0"), size=3, leverage="5")
    stop = new_stop("id1", request, XBT, StopSpec("up", Decimal("31000")), Decimal("30000.0"),
                    "5", 123)
    api = stop.to_api()
    assert {k: api[k] for k in ("id", "type", "side", "price", "size", "stop", "stopPrice",
                                "stopPriceType", "stopTriggered", "status", "isActive",
                                "createdAt", "orderTime", "settleCurrency")} == {
        "id": "id1", "type": "limit", "side": "buy", "price": "30000.0", "size": 3,
        "stop": "up", "stopPrice": "31000.0", "stopPriceType": "TP", "stopTriggered": False,
        "status": "open", "isActive": True, "createdAt": 123, "orderTime": None,
        "settleCurrency": "XBT"}


def test_finished_stops_are_forgotten_oldest_first() -> None:
    book = StopBook("XBTUSDM", max_done=3)
    for i in range(5):
        book.add(_stop(f"s{i}", "down", 900))
    book.fire(900, 1)
    assert [book.get(f"s{i}") is not None for i in range(5)] == [False, False, True, True, True]
    book.check()


# ---------------------------------------------------------------------- property test

_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(["down", "up"]), st.integers(90, 110),
              st.sampled_from(["u1", "u2"])),
    st.tuples(st.just("cancel"), st.integers(0, 60)),
    st.tuples(st.just("trade"), st.integers(85, 115)),
), min_size=10, max_size=120)


@settings(max_examples=400, deadline=None)
@given(_ops)
def test_fires_what_a_full_scan_fires_in_creation_order(ops: list[tuple[Any, ...]]) -> None:
    book = StopBook("XBTUSDM", max_per_user=6)
    waiting: list[tuple[str, str, int, str]] = []  # (id, direction, ticks, user), oldest first
    made: list[str] = []
    for op in ops:
        if op[0] == "add":
            _, direction, ticks, user = op
            order_id = f"s{len(made)}"
            made.append(order_id)
            if sum(1 for w in waiting if w[3] == user) >= 6:
                with pytest.raises(RejectError):
                    book.add(_stop(order_id, direction, ticks, user=user))
                continue
            book.add(_stop(order_id, direction, ticks, user=user))
            waiting.append((order_id, direction, ticks, user))
        elif op[0] == "cancel":
            if op[1] >= len(made):
                continue
            order_id = made[op[1]]
            entry = next((w for w in waiting if w[0] == order_id), None)
            held = book.get(order_id)
            if entry is None:
                with pytest.raises(RejectError):
                    book.cancel(order_id, held.user_id if held else "u1", 0)
                continue
            book.cancel(order_id, entry[3], 0)
            waiting.remove(entry)
        else:
            price = op[1]
            expected = [w[0] for w in waiting
                        if (price <= w[2] if w[1] == "down" else price >= w[2])]
            waiting = [w for w in waiting if w[0] not in expected]
            assert [s.id for s in book.fire(price, 0)] == expected
        book.check()
        assert len(book) == len(waiting)
        for user in ("u1", "u2"):
            assert [s.id for s in book.open_orders(user)] == [w[0] for w in waiting
                                                                if w[3] == user]
