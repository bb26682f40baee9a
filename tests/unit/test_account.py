"""services.sandbox.account against slow, exact accounting of the same fills and orders.

The reference never looks at a :class:`Position`'s split of profit: the equity
is the starting balance, minus the fees, plus the cash the fills moved and the
open contracts valued at the mark (cash-flow accounting, in exact fractions);
a position's cost is replayed from its fills with average-cost arithmetic in
fractions; an order's margin is its value over its leverage.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sandbox.account import Holding, OpenOrder, account_overview
from services.sandbox.positions import Position

_Fill = tuple[str, int, int, int]  # side, size, price in ticks, fee in 1e-8 units
_Order = tuple[int, int, int]  # size, price in ticks, leverage

_contract = st.tuples(
    st.booleans(),  # inverse
    st.lists(st.tuples(st.sampled_from(["buy", "sell"]), st.integers(1, 300),
                       st.integers(1, 2_000_000), st.integers(0, 10_000)), max_size=25),
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 2_000_000), st.integers(1, 75)),
             max_size=5),
    st.one_of(st.none(), st.integers(1, 2_000_000)),  # mark in ticks
    st.integers(1, 75),  # the position's leverage
)


def _multiplier(inverse: bool) -> Fraction:
    return Fraction(1) if inverse else Fraction(1, 1000)


def _value(inverse: bool, size: int, price: Fraction) -> Fraction:
    m = _multiplier(inverse)
    return size * m / price if inverse else size * m * price


def _reference(start: Fraction, contracts: list[tuple[bool, list[_Fill], list[_Order],
                                                     int | None, int]]) -> dict[str, Fraction]:
    equity = start
    unrealised = position_margin = order_margin = Fraction(0)
    for inverse, fills, orders, mark_ticks, leverage in contracts:
        qty, cost = 0, Fraction(0)  # signed, average cost
        cash = Fraction(0)
        for side, size, ticks, fee in fills:
            price = Fraction(ticks, 10)
            value = _value(inverse, size, price)
            sign = 1 if side == "buy" else -1
            # Cash flows: a linear buy pays its value; an inverse buy receives it (in XBT).
            cash += sign * value if inverse else -sign * value
            equity -= Fraction(fee, 10**8)
            for _ in range(size):  # one contract at a time: slow and obvious
                one = _value(inverse, 1, price)
                if qty == 0 or (qty > 0) == (sign > 0):
                    cost += sign * one
                else:  # closes one: its share of the average cost goes
                    cost -= cost / abs(qty)
                qty += sign
        held = Fraction(0)
        if mark_ticks is not None and qty:
            mark = Fraction(mark_ticks, 10)
            held = _value(inverse, abs(qty), mark) * (1 if qty > 0 else -1)
            position_value = -held if inverse else held
            unrealised += (cost - held) if inverse else (held - cost)
            equity += cash + position_value
        elif qty == 0:
            equity += cash
        else:  # no mark: nothing is unrealised; the open contracts count at cost
            equity += cash + (-cost if inverse else cost)
        position_margin += abs(cost) / leverage
        for size, ticks, order_leverage in orders:
            order_margin += _value(inverse, size, Fraction(ticks, 10)) / order_leverage
    margin_balance = equity - unrealised
    return {"account_equity": equity, "unrealised_pnl": unrealised,
            "margin_balance": margin_balance, "position_margin": position_margin,
            "order_margin": order_margin,
            "available_balance": equity - position_margin - order_margin}


def _holding(inverse: bool, fills: list[_Fill], orders: list[_Order], mark_ticks: int | None,
             leverage: int) -> Holding:
    multiplier = Decimal(1) if inverse else Decimal("0.001")
    position = Position("X", inverse, multiplier, "XBT")
    for i, (side, size, ticks, fee) in enumerate(fills):
        position.fill(side, size, Decimal(ticks) / 10, Decimal(fee) / 10**8, i)
    return Holding(position, None if mark_ticks is None else Decimal(mark_ticks) / 10,
                   Decimal(leverage),
                   tuple(OpenOrder(size, Decimal(ticks) / 10, Decimal(lev))
                         for size, ticks, lev in orders))


@settings(max_examples=300, deadline=None)
@given(st.lists(_contract, max_size=3), st.integers(0, 10**12))
def test_overview_agrees_with_exact_accounting(
        contracts: list[tuple[bool, list[_Fill], list[_Order], int | None, int]],
        start_units: int) -> None:
    start = Fraction(start_units, 10**8)
    got = account_overview("XBT", Decimal(start_units) / 10**8,
                           [_holding(*c) for c in contracts])
    want = _reference(start, contracts)
    assert got.currency == "XBT" and got.frozen_funds == 0
    for name, value in want.items():
        actual = Fraction(getattr(got, name))
        # Decimal divides to 28 digits; the reference is exact.
        assert abs(actual - value) <= Fraction(1, 10**12) * (1 + abs(value)), name
    assert got.account_equity == got.margin_balance + got.unrealised_pnl
    # The venue's identity: marginBalance = positionMargin + orderMargin + frozenFunds +
    # availableBalance - unrealisedPNL.
    identity = (got.position_margin + got.order_margin + got.frozen_funds
                + got.available_balance - got.unrealised_pnl)
    assert abs(got.margin_balance - identity) <= Decimal("1e-20") * (1 + abs(identity))


def test_a_round_trip_moves_the_balance_by_its_profit_less_fees() -> None:
    linear = Position("ETHUSDTM", False, Decimal("0.01"), "USDT")
    linear.fill("buy", 10, Decimal(2000), Decimal("0.12"), 1)
    linear.fill("sell", 10, Decimal(2100), Decimal("0.126"), 2)
    overview = account_overview("USDT", Decimal(100_000),
                                [Holding(linear, Decimal(2050), Decimal(5))])
    # 10 x 0.01 x (2100 - 2000) = 10, less 0.246 of fees; flat: no margin, nothing unrealised.
    assert overview.margin_balance == Decimal("100009.754")
    assert overview.account_equity == overview.available_balance == overview.margin_balance
    assert overview.position_margin == overview.unrealised_pnl == 0


def test_margins_of_a_position_and_an_order() -> None:
    inverse = Position("XBTUSDM", True, Decimal(1), "XBT")
    inverse.fill("buy", 1000, Decimal(50_000), Decimal(0), 1)  # cost 0.02 XBT
    order = OpenOrder(500, Decimal(40_000), Decimal(10))  # 0.0125 XBT at 10x
    overview = account_overview("XBT", Decimal(10),
                                [Holding(inverse, Decimal(40_000), Decimal(4), (order,))])
    assert overview.position_margin == Decimal("0.005")
    assert overview.order_margin == Decimal("0.00125")
    assert overview.unrealised_pnl == Decimal("0.02") - Decimal("0.025")
    # The equity (the loss at the mark included) less both margins.
    assert overview.available_balance == Decimal(10) - Decimal("0.005") - Decimal("0.00625")
    api = overview.to_api()
    assert api["currency"] == "XBT" and isinstance(api["accountEquity"], float)
    assert set(api) == {"accountEquity", "unrealisedPNL", "marginBalance", "positionMargin",
                        "orderMargin", "frozenFunds", "availableBalance", "currency"}


def test_leverage_must_be_positive() -> None:
    position = Position("XBTUSDM", True, Decimal(1), "XBT")
    with pytest.raises(ValueError, match="leverage"):
        account_overview("XBT", Decimal(1), [Holding(position, None, Decimal(0))])
