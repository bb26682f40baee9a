"""services.sandbox.positions against accounting that does not depend on the method.

Whatever way a position splits profit between realised and unrealised, their sum
is the cash the fills moved plus the open contracts valued at the mark; the
quantity is the net of the fills; a flat position has no cost and all its profit
realised.
"""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.sandbox.positions import Position

_fills = st.lists(st.tuples(st.sampled_from(["buy", "sell"]), st.integers(1, 500),
                            st.integers(1, 2_000_000)), min_size=1, max_size=40)


def _total(position: Position, fills: list[tuple[str, int, Decimal]], mark: Decimal) -> Decimal:
    """Gross profit by cash flows: independent of how it is split."""
    m = position.multiplier
    if position.inverse:
        flows = sum((Decimal(s) * m / p * (1 if side == "buy" else -1) for side, s, p in fills),
                    Decimal(0))
        return flows - position.qty * m / mark
    flows = sum((Decimal(s) * m * p * (-1 if side == "buy" else 1) for side, s, p in fills),
                Decimal(0))
    return flows + position.qty * m * mark


@settings(max_examples=300, deadline=None)
@given(_fills, st.booleans(), st.integers(1, 2_000_000))
def test_profit_and_quantity_agree_with_the_cash_flows(
        raw: list[tuple[str, int, int]], inverse: bool, mark_ticks: int) -> None:
    multiplier = Decimal(1) if inverse else Decimal("0.001")
    position = Position("X", inverse, multiplier, "XBT" if inverse else "USDT")
    fills = [(side, size, Decimal(ticks) / 10) for side, size, ticks in raw]
    for i, (side, size, price) in enumerate(fills):
        position.fill(side, size, price, Decimal(0), i)
    mark = Decimal(mark_ticks) / 10
    assert position.qty == sum(s if side == "buy" else -s for side, s, _ in fills)
    got = position.realised_gross + position.unrealised(mark)
    assert abs(got - _total(position, fills, mark)) < Decimal("1e-12")
    if position.qty == 0:
        assert position.cost == 0 and position.avg_entry_price() is None
        assert position.opened_at_ms is None
    else:
        entry = position.avg_entry_price()
        assert entry is not None
        prices = [p for _, _, p in fills]
        assert min(prices) - Decimal("1e-12") <= entry <= max(prices) + Decimal("1e-12")


def test_a_long_closed_higher_realises_the_difference() -> None:
    linear = Position("ETHUSDTM", False, Decimal("0.01"), "USDT")
    linear.fill("buy", 10, Decimal(2000), Decimal("0.1"), 1)
    linear.fill("buy", 10, Decimal(2200), Decimal("0.1"), 2)
    assert linear.avg_entry_price() == Decimal(2100)
    linear.fill("sell", 5, Decimal(2300), Decimal("0.1"), 3)
    assert linear.realised_gross == Decimal("10.00")  # 5 x 0.01 x (2300 - 2100)
    assert linear.qty == 15 and linear.avg_entry_price() == Decimal(2100)
    assert linear.comm == Decimal("0.3") and linear.opened_at_ms == 1
    inverse = Position("XBTUSDM", True, Decimal(1), "XBT")
    inverse.fill("sell", 100, Decimal(50_000), Decimal(0), 1)
    inverse.fill("buy", 150, Decimal(40_000), Decimal(0), 2)  # closes 100, opens 50 long
    assert inverse.realised_gross == Decimal(100) / 40_000 - Decimal(100) / 50_000
    assert inverse.qty == 50 and inverse.avg_entry_price() == Decimal(40_000)
    assert inverse.opened_at_ms == 2
