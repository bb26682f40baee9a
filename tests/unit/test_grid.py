"""Grid decisions (pure): layout, counter-orders, limits under random fills, clientOids."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumex_l3.grid import (
    Fill,
    GridConfig,
    GridOrder,
    GridPlan,
    GridState,
    initial_orders,
    is_client_oid_of,
    make_client_oid,
    on_fill,
    retry_refused,
)


def _config(**overrides: object) -> GridConfig:
    base: dict[str, object] = {
        "symbol": "XBTUSDM", "centre": Decimal("30000.0"), "step_ticks": 5,
        "tick_size": Decimal("0.1"), "levels": 3, "size": 2, "max_position": 100,
        "max_open_orders": 50, "leverage": 5, "client_oid_prefix": "g1",
    }
    base.update(overrides)
    return GridConfig(**base)  # type: ignore[arg-type]


def _prices(plan: GridPlan, side: str) -> list[Decimal]:
    return [d.price for d in plan.places if d.side == side and d.price is not None]


def test_initial_grid_layout() -> None:
    config = _config()
    plan = initial_orders(config, GridState())
    assert _prices(plan, "buy") == [Decimal("29999.5"), Decimal("29999.0"), Decimal("29998.5")]
    assert _prices(plan, "sell") == [Decimal("30000.5"), Decimal("30001.0"), Decimal("30001.5")]
    assert [d.client_oid for d in plan.places] == [make_client_oid("g1", i, "")
                                                   for i in range(1, 7)]
    assert all(d.size == 2 and d.reason for d in plan.places)
    assert plan.state.open_count == 6
    assert plan.state.next_seq == 7
    assert all(o.status == "pending" for o in plan.state.orders.values())
    # Run again: everything is present, nothing new.
    again = initial_orders(config, plan.state)
    assert again.places == ()
    assert again.state == plan.state
    assert all("held by" in d.reason for d in again.decisions)


def test_initial_grid_respects_limits_nearest_levels_first() -> None:
    plan = initial_orders(_config(max_open_orders=3), GridState())
    assert [(d.side, d.price) for d in plan.places] == [
        ("buy", Decimal("29999.5")), ("sell", Decimal("30000.5")), ("buy", Decimal("29999.0"))]
    assert any("max open orders" in d.reason for d in plan.decisions if d.action == "skip")

    # Long 5 already, max 8, size 2: only one more buy fits (5 + 2 <= 8, 5 + 4 > 8).
    plan = initial_orders(_config(max_position=8), GridState(position=5))
    assert len(_prices(plan, "buy")) == 1
    # Sells: 5 - 2k >= -8 → k <= 6: all three.
    assert len(_prices(plan, "sell")) == 3
    assert any("position could reach" in d.reason for d in plan.decisions)


def test_initial_grid_skips_non_positive_prices() -> None:
    plan = initial_orders(_config(centre=Decimal("1.0"), step_ticks=5, levels=3), GridState())
    assert _prices(plan, "buy") == [Decimal("0.5")]
    assert any("price <= 0" in d.reason for d in plan.decisions)


def test_buy_fill_places_a_sell_one_step_higher_for_the_filled_size() -> None:
    config = _config()
    plan = initial_orders(config, GridState())
    buy = plan.places[0]
    assert buy.client_oid is not None and buy.price is not None
    partial = on_fill(config, plan.state, Fill(buy.client_oid, 1))
    (counter,) = partial.places
    assert (counter.side, counter.price, counter.size) == ("sell", buy.price + config.step, 1)
    assert counter.client_oid == make_client_oid("g1", 7, "")
    assert partial.state.position == 1
    assert partial.state.orders[buy.client_oid].status == "partially_filled"
    assert buy.client_oid in counter.reason
    # The same event again: nothing new.
    same = on_fill(config, partial.state, Fill(buy.client_oid, 1))
    assert same.places == () and same.state.position == 1
    # The rest fills: a second counter for 1 more.
    rest = on_fill(config, partial.state, Fill(buy.client_oid, 2, "filled"))
    (counter2,) = rest.places
    assert (counter2.side, counter2.price, counter2.size) == ("sell", counter.price, 1)
    assert rest.state.position == 2
    assert not rest.state.orders[buy.client_oid].is_open


def test_sell_fill_places_a_buy_one_step_lower() -> None:
    config = _config()
    plan = initial_orders(config, GridState())
    sell = plan.places[1]
    assert sell.side == "sell" and sell.client_oid is not None and sell.price is not None
    filled = on_fill(config, plan.state, Fill(sell.client_oid, 2, "filled"))
    (counter,) = filled.places
    assert (counter.side, counter.price, counter.size) == ("buy", sell.price - config.step, 2)
    assert filled.state.position == -2


def test_counter_order_is_skipped_when_open_orders_are_at_the_limit() -> None:
    config = _config(max_open_orders=2, levels=1)
    plan = initial_orders(config, GridState())
    assert plan.state.open_count == 2
    buy = plan.places[0]
    assert buy.client_oid is not None
    partial = on_fill(config, plan.state, Fill(buy.client_oid, 1))
    assert partial.places == ()
    assert "max open orders" in partial.decisions[-1].reason
    assert partial.state.position == 1
    # A full fill frees its slot: the counter fits.
    full = on_fill(config, partial.state, Fill(buy.client_oid, 2))
    assert len(full.places) == 1 and full.places[0].size == 1


def test_a_rate_limited_counter_order_is_placed_again_under_a_new_client_oid() -> None:
    config = _config()
    plan = initial_orders(config, GridState())
    buy = plan.places[0]
    assert buy.client_oid is not None and buy.price is not None
    filled = on_fill(config, plan.state, Fill(buy.client_oid, 2, "filled"))
    (counter,) = filled.places
    assert counter.client_oid is not None
    # The exchange refused it (429): the event marks it rejected, then the retry.
    refused = on_fill(config, filled.state, Fill(counter.client_oid, 0, "rejected"))
    assert refused.state.open_count == filled.state.open_count - 1
    again = retry_refused(config, refused.state, counter.client_oid, "rate limited")
    (retry,) = again.places
    assert (retry.side, retry.price, retry.size) == (counter.side, counter.price, counter.size)
    assert retry.client_oid not in (None, counter.client_oid)
    assert "again for " + counter.client_oid in retry.reason
    assert again.state.open_count == filled.state.open_count
    assert again.state.position == filled.state.position == 2
    # Not twice, and never an order that is not rejected or that filled at all.
    twice = retry_refused(config, again.state, retry.client_oid or "", "rate limited")
    assert twice.places == () and "not retried" in twice.decisions[0].reason
    assert retry_refused(config, again.state, "other-1", "x").places == ()
    # Limits hold: with no room left, the retry is skipped with its reason.
    tight = _config(max_open_orders=len(refused.state.open_orders()))
    full = initial_orders(tight, refused.state)
    blocked = retry_refused(tight, full.state, counter.client_oid, "rate limited")
    assert blocked.places == () and "max open orders" in blocked.decisions[0].reason


def test_status_only_events_and_unknown_orders() -> None:
    config = _config()
    plan = initial_orders(config, GridState())
    coid = plan.places[0].client_oid
    assert coid is not None
    canceled = on_fill(config, plan.state, Fill(coid, 0, "canceled"))
    assert canceled.places == ()
    assert not canceled.state.orders[coid].is_open
    assert canceled.state.open_count == plan.state.open_count - 1
    unknown = on_fill(config, plan.state, Fill("other-1", 5, "filled"))
    assert unknown.state == plan.state and unknown.places == ()


def test_over_fill_is_counted_at_the_order_size() -> None:
    config = _config()
    plan = initial_orders(config, GridState())
    coid = plan.places[0].client_oid
    assert coid is not None
    over = on_fill(config, plan.state, Fill(coid, 99, "filled"))
    assert over.state.position == 2
    assert over.places[0].size == 2
    assert "counted 2" in over.decisions[0].reason


def test_client_oids_are_unguessable_and_never_repeat_across_salts() -> None:
    """``{prefix}-{16 characters}``: 96 bits keyed by the grid's salt. Knowing every
    earlier clientOid and the prefix says nothing of the next one; another salt (another
    grid, a lost state) never gives an earlier one again."""
    one = [make_client_oid("g1", n, "salt-a") for n in range(1, 2001)]
    other = [make_client_oid("g1", n, "salt-b") for n in range(1, 2001)]
    assert len(set(one)) == 2000 and not set(one) & set(other)
    assert all(len(c) == 19 and c.startswith("g1-") and is_client_oid_of("g1", c)
               for c in one)
    assert make_client_oid("g1", 7, "salt-a") == one[6]  # deterministic: a pure core
    assert max(len(make_client_oid("x" * 23, 10**9, "s")) for _ in range(1)) <= 40
    assert not is_client_oid_of("g1", "g1-12")  # the old, guessable shape
    assert not is_client_oid_of("g", one[0])
    assert not is_client_oid_of("g1", one[0] + "x")
    orders = [GridOrder(one[6], "buy", Decimal(1), 1, 0, "open"),
              GridOrder("other-99", "sell", Decimal(2), 1, 0, "open")]
    state = GridState.rebuild(orders, position=3, salt="salt-a", next_seq=8)
    assert state.next_seq == 8 and state.position == 3 and state.salt == "salt-a"
    assert "salt-a" not in repr(state)
    plan = initial_orders(_config(levels=1), state)
    assert [d.client_oid for d in plan.places] == [one[7], one[8]]


@pytest.mark.parametrize("overrides", [
    {"tick_size": Decimal(0)}, {"centre": Decimal(0)}, {"centre": Decimal("30000.05")},
    {"step_ticks": 0}, {"levels": 0}, {"size": 0}, {"max_position": -1},
    {"max_open_orders": -1}, {"leverage": 0}, {"client_oid_prefix": "a-b"},
    {"client_oid_prefix": ""}, {"client_oid_prefix": "x" * 24},
])
def test_config_validation(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _config(**overrides)


# ---------------------------------------------------------------------- property test

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("fill"), st.integers(0, 1000), st.integers(1, 10)),
        st.tuples(st.just("cancel"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("grid"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


def _check_limits(config: GridConfig, state: GridState) -> None:
    assert state.open_count <= config.max_open_orders
    long_worst, short_worst = state.exposure()
    assert long_worst <= config.max_position
    assert short_worst >= -config.max_position
    assert -config.max_position <= state.position <= config.max_position


@settings(max_examples=150, deadline=None)
@given(
    ops=_OPS,
    levels=st.integers(1, 6),
    size=st.integers(1, 5),
    max_position=st.integers(0, 20),
    max_open=st.integers(0, 12),
    step_ticks=st.integers(1, 3),
)
def test_limits_hold_across_random_fill_sequences(
        ops: list[tuple[str, int, int]], levels: int, size: int, max_position: int,
        max_open: int, step_ticks: int) -> None:
    config = _config(levels=levels, size=size, max_position=max_position,
                     max_open_orders=max_open, step_ticks=step_ticks,
                     centre=Decimal("100.0"))
    plan = initial_orders(config, GridState())
    state = plan.state
    seen = [d.client_oid for d in plan.places]
    _check_limits(config, state)
    for kind, pick, amount in ops:
        open_orders = state.open_orders()
        if kind == "grid":
            plan = initial_orders(config, state)
        elif not open_orders:
            continue
        else:
            order = open_orders[pick % len(open_orders)]
            if kind == "cancel":
                plan = on_fill(config, state, Fill(order.client_oid, order.filled, "canceled"))
            else:
                filled = min(order.size, order.filled + amount)
                plan = on_fill(config, state, Fill(order.client_oid, filled))
                delta = filled - order.filled
                for counter in plan.places:
                    assert counter.size == delta
                    assert counter.side != order.side
                    assert counter.price is not None
                    assert abs(counter.price - order.price) == config.step
                    assert (counter.price > order.price) == (order.side == "buy")
        for d in plan.places:
            assert d.client_oid is not None and d.client_oid not in state.orders
            assert config.owns(d.client_oid)
            assert d.reason
        seen.extend(d.client_oid for d in plan.places)
        state = plan.state
        _check_limits(config, state)
        # Position is exactly what the fills say.
        assert state.position == sum(
            (o.filled if o.side == "buy" else -o.filled) for o in state.orders.values())
    assert len(seen) == len(set(seen))
    assert len(seen) == len(state.orders)


def test_the_exchanges_position_limits_the_grid_when_it_is_beyond_its_own() -> None:
    # Long 5 at the exchange (another tool traded the account), the grid's own count 0:
    # max 8, size 2: one buy fits (5 + 2 <= 8), as if the grid were long 5 itself.
    plan = initial_orders(_config(max_position=8), GridState(position=0, exchange_position=5))
    assert len(_prices(plan, "buy")) == 1
    assert len(_prices(plan, "sell")) == 3  # a short risk is measured from the grid's 0
    assert any("at the exchange 5" in d.reason for d in plan.decisions if d.action == "skip")
    # Behind the grid's own count (a fill it has heard of first): its own count rules.
    plan = initial_orders(_config(max_position=8), GridState(position=5, exchange_position=0))
    assert len(_prices(plan, "buy")) == 1


@settings(max_examples=200, deadline=None)
@given(position=st.integers(-12, 12), exchange=st.integers(-30, 30) | st.none(),
       levels=st.integers(1, 6), size=st.integers(1, 5), max_position=st.integers(0, 20))
def test_no_order_is_placed_past_the_limit_from_either_position(
        position: int, exchange: int | None, levels: int, size: int, max_position: int) -> None:
    config = _config(levels=levels, size=size, max_position=max_position,
                     max_open_orders=100, centre=Decimal("100.0"))
    plan = initial_orders(config, GridState(position=position, exchange_position=exchange))
    buys, sells = (sum(d.size for d in plan.places if d.side == s) for s in ("buy", "sell"))
    for base in (position, position if exchange is None else exchange):
        # Placed orders never add risk past the limit, whichever position is the truth
        # (they may have been too many already: then none is placed on that side).
        assert buys == 0 or base + buys <= max_position
        assert sells == 0 or base - sells >= -max_position


def test_a_counter_order_answers_its_fill_whatever_the_exchange_said() -> None:
    # The exchange was read just after a buy of 2 filled (long 2), and counts the buys
    # still open too: the counter sell of that fill still goes, by the grid's own count.
    config = _config(levels=1, size=2, max_position=2)
    plan = initial_orders(config, GridState())
    (buy,) = [d for d in plan.places if d.side == "buy"]
    assert buy.client_oid is not None
    state = replace(plan.state, exchange_position=-2)  # a stale read: short 2
    plan = on_fill(config, state, Fill(buy.client_oid, 2))
    assert [(d.action, d.side) for d in plan.decisions] == [("place", "sell")]


def test_a_final_figure_below_the_count_corrects_the_position_without_a_counter() -> None:
    # A done filled after a loss counted 2 of 2; the exchange's final record says 1.
    config = _config(levels=1, size=2, max_position=10)
    plan = initial_orders(config, GridState())
    (buy,) = [d for d in plan.places if d.side == "buy"]
    assert buy.client_oid is not None
    plan = on_fill(config, plan.state, Fill(buy.client_oid, 2))
    assert plan.state.position == 2 and len(plan.places) == 1
    plan = on_fill(config, plan.state, Fill(buy.client_oid, 1, "filled"))
    assert plan.state.position == 1 and plan.places == ()
    assert plan.state.orders[buy.client_oid].filled == 1
    assert any("position corrected to 1" in d.reason for d in plan.decisions)
    # A figure below the count that is not final is not a correction: ignored.
    plan = on_fill(config, plan.state, Fill(buy.client_oid, 0))
    assert plan.state.position == 1
