"""Grid strategy decisions (pure: no I/O, no clock).

A grid rests ``levels`` buys below a centre price and ``levels`` sells above it,
``step_ticks`` ticks apart. When a buy fills (partly or fully), a sell for the
filled size goes one step above the buy's price; when a sell fills, a buy goes
one step below. The service feeds own-order events in and sends what comes out.

Every function takes a :class:`GridState` and returns a :class:`GridPlan`: the
new state (orders to place already in it, as ``pending``) and the decisions,
each with a one-line ``reason`` for the log. Limits, checked before every
placement:

* open orders (``pending`` included) never exceed ``max_open_orders``;
* the position after every open buy filled never exceeds ``max_position``,
  and after every open sell filled never goes below ``-max_position``. The
  position is the grid's own count of its fills, or, for a grid level, the
  exchange's (``state.exchange_position``, the account's whole position in
  the contract, read by the service) when that is further in the direction
  checked: an account that other tools also trade, or a fill the grid has not
  heard of yet, never lets the grid open a level past the limit.

A counter-order never needs more position room than its fill freed (by the
grid's own count, which is what it answers: the exchange's figure, read at
another moment, may not include that fill yet, or include it twice with the
order's remaining size), so only ``max_open_orders`` can hold one back (it is
then skipped, with its reason).

clientOids are ``{prefix}-{tag}``: ``tag`` is 16 characters (96 bits) of
HMAC-SHA256 keyed by the grid's secret ``state.salt`` over ``n``, the order's
number (``state.next_seq``, which only grows). The public L3 stream shows every
order's clientOid to every account, so a clientOid that could be guessed
before it is used could be used first, by someone else: with the salt nobody
else knows, the next one cannot be predicted, and a new salt (a new grid, a
lost state) never gives an old clientOid again. The same state still gives
the same clientOids (the core stays pure; the salt is chosen by the service).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Final, Literal

__all__ = [
    "DONE_STATUSES",
    "OPEN_STATUSES",
    "Decision",
    "Fill",
    "GridConfig",
    "GridOrder",
    "GridPlan",
    "GridState",
    "Side",
    "initial_orders",
    "is_client_oid_of",
    "make_client_oid",
    "on_fill",
    "retry_refused",
]

Side = Literal["buy", "sell"]

#: Own-order statuses (DESIGN.md) of an order that may still fill.
OPEN_STATUSES: Final = frozenset({"pending", "received", "open", "partially_filled"})
#: Statuses of an order that is over.
DONE_STATUSES: Final = frozenset({"filled", "canceled", "rejected"})

_PREFIX: Final = re.compile(r"[A-Za-z0-9_]{1,23}")
#: Characters of the unguessable part of a clientOid (6 bits each: 96 bits).
_TAG: Final = 16
_TAG_RE: Final = re.compile(rf"[A-Za-z0-9_-]{{{_TAG}}}")


def make_client_oid(prefix: str, seq: int, salt: str) -> str:
    """``{prefix}-{tag}``: the ``seq``-th clientOid of a grid keyed by ``salt`` (module doc)."""
    digest = hmac.new(salt.encode(), f"{prefix}:{seq}".encode(), hashlib.sha256).digest()
    return f"{prefix}-{base64.urlsafe_b64encode(digest).decode()[:_TAG]}"


def is_client_oid_of(prefix: str, client_oid: str) -> bool:
    """Whether ``client_oid`` has the shape of one of the grid ``prefix``'s."""
    head, tail = client_oid[:len(prefix) + 1], client_oid[len(prefix) + 1:]
    return head == prefix + "-" and _TAG_RE.fullmatch(tail) is not None


@dataclass(frozen=True, slots=True)
class GridConfig:
    """What the grid is: its prices, sizes and limits (validated at construction)."""

    symbol: str
    centre: Decimal
    step_ticks: int
    tick_size: Decimal
    levels: int
    size: int
    max_position: int
    max_open_orders: int
    leverage: int = 1
    client_oid_prefix: str = "grid"

    def __post_init__(self) -> None:
        if self.tick_size <= 0:
            raise ValueError("tick_size must be > 0")
        if self.centre <= 0:
            raise ValueError("centre must be > 0")
        if self.centre % self.tick_size != 0:
            raise ValueError(f"centre {self.centre} is not a multiple of the tick {self.tick_size}")
        if self.step_ticks < 1:
            raise ValueError("step_ticks must be >= 1")
        if self.levels < 1:
            raise ValueError("levels must be >= 1")
        if self.size < 1:
            raise ValueError("size must be >= 1")
        if self.max_position < 0:
            raise ValueError("max_position must be >= 0")
        if self.max_open_orders < 0:
            raise ValueError("max_open_orders must be >= 0")
        if self.leverage < 1:
            raise ValueError("leverage must be >= 1")
        if not _PREFIX.fullmatch(self.client_oid_prefix):
            raise ValueError("client_oid_prefix must be 1 to 23 characters of [A-Za-z0-9_]")

    @property
    def step(self) -> Decimal:
        """The price distance between two levels."""
        return self.tick_size * self.step_ticks

    def level_price(self, level: int) -> Decimal:
        """The price of ``level`` (negative below the centre, positive above)."""
        return self.centre + self.step * level

    def owns(self, client_oid: str) -> bool:
        """Whether ``client_oid`` is one of this grid's (``{prefix}-{tag}``)."""
        return is_client_oid_of(self.client_oid_prefix, client_oid)


@dataclass(frozen=True, slots=True)
class GridOrder:
    """One own order as the grid sees it; ``filled`` is the size already reacted to."""

    client_oid: str
    side: Side
    price: Decimal
    size: int
    filled: int = 0
    status: str = "pending"

    @property
    def is_open(self) -> bool:
        """Whether it may still fill."""
        return self.status in OPEN_STATUSES

    @property
    def remaining(self) -> int:
        """Size still to fill (0 when it is over)."""
        return max(0, self.size - self.filled) if self.is_open else 0


@dataclass(frozen=True, slots=True)
class GridState:
    """Own orders by clientOid, the position (contracts, + long), the next clientOid number
    and the secret the clientOids are made with (``salt``: keep it, never log it)."""

    orders: Mapping[str, GridOrder] = field(default_factory=dict)
    position: int = 0
    next_seq: int = 1
    salt: str = field(default="", repr=False)
    #: The account's position at the exchange, as last read (None: not known).
    exchange_position: int | None = None

    def risk_position(self, side: Side) -> int:
        """The position a ``side`` order's risk is measured from: the grid's own count, or
        the exchange's when it is further that way (longer for a buy, shorter for a sell)."""
        if self.exchange_position is None:
            return self.position
        if side == "buy":
            return max(self.position, self.exchange_position)
        return min(self.position, self.exchange_position)

    @classmethod
    def rebuild(cls, orders: Iterable[GridOrder], *, position: int, salt: str,
                next_seq: int = 1) -> GridState:
        """A state from stored orders, with the grid's ``salt`` and next clientOid number."""
        return cls(orders={o.client_oid: o for o in orders}, position=position,
                   next_seq=next_seq, salt=salt)

    def open_orders(self) -> list[GridOrder]:
        """Orders that may still fill, in insertion order."""
        return [o for o in self.orders.values() if o.is_open]

    @property
    def open_count(self) -> int:
        """How many orders may still fill."""
        return sum(1 for o in self.orders.values() if o.is_open)

    def open_remaining(self, side: Side) -> int:
        """Total size still to fill on ``side``."""
        return sum(o.remaining for o in self.orders.values() if o.side == side)

    def occupied(self, price: Decimal) -> GridOrder | None:
        """An open order resting at ``price`` (either side), if any."""
        for o in self.orders.values():
            if o.is_open and o.price == price:
                return o
        return None

    def exposure(self) -> tuple[int, int]:
        """Position if every open buy filled, and if every open sell filled."""
        return (self.position + self.open_remaining("buy"),
                self.position - self.open_remaining("sell"))


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision: place an order (``action`` ``place``) or not (``skip``), and why."""

    action: Literal["place", "skip"]
    reason: str
    client_oid: str | None = None
    side: Side | None = None
    price: Decimal | None = None
    size: int = 0

    def describe(self) -> str:
        """The decision as one log line."""
        if self.action == "place":
            return (f"place {self.side} {self.size} @ {self.price} "
                    f"clientOid={self.client_oid}: {self.reason}")
        return f"skip: {self.reason}"


@dataclass(frozen=True, slots=True)
class GridPlan:
    """The state after the decisions, and the decisions in the order to act on them."""

    state: GridState
    decisions: tuple[Decision, ...] = ()

    @property
    def places(self) -> tuple[Decision, ...]:
        """Only the ``place`` decisions."""
        return tuple(d for d in self.decisions if d.action == "place")


@dataclass(frozen=True, slots=True)
class Fill:
    """An own-order event: the order's cumulative ``filled_size`` and, if known, its status."""

    client_oid: str
    filled_size: int
    status: str | None = None


def _refusal(config: GridConfig, state: GridState, side: Side, size: int, *,
             counter: bool = False) -> str | None:
    """Why an order of ``side``/``size`` may not be placed now, or None. A ``counter``
    order is measured from the grid's own count only (see the module doc)."""
    if state.open_count + 1 > config.max_open_orders:
        return f"max open orders reached ({state.open_count}/{config.max_open_orders})"
    base = state.position if counter else state.risk_position(side)
    held = f"position {state.position}" + (
        "" if state.exchange_position is None
        else f", at the exchange {state.exchange_position}")
    if side == "buy":
        worst = base + state.open_remaining("buy") + size
        if worst > config.max_position:
            return f"position could reach {worst} > max {config.max_position} ({held})"
    else:
        worst = base - state.open_remaining("sell") - size
        if worst < -config.max_position:
            return f"position could reach {worst} < -{config.max_position} ({held})"
    return None


def _place(config: GridConfig, state: GridState, side: Side, price: Decimal, size: int,
           why: str, *, counter: bool = False) -> tuple[GridState, Decision]:
    refusal = _refusal(config, state, side, size, counter=counter)
    what = f"{side} {size} @ {price}"
    if refusal is not None:
        return state, Decision("skip", f"{what} ({why}): {refusal}", side=side, price=price,
                               size=size)
    coid = make_client_oid(config.client_oid_prefix, state.next_seq, state.salt)
    if coid in state.orders:  # 96 bits: never seen; never reuse one anyway
        return state, Decision("skip", f"{what} ({why}): clientOid {coid} already used",
                               side=side, price=price, size=size)
    order = GridOrder(coid, side, price, size)
    new = replace(state, orders={**state.orders, coid: order}, next_seq=state.next_seq + 1)
    return new, Decision("place", why, client_oid=coid, side=side, price=price, size=size)


def initial_orders(config: GridConfig, state: GridState) -> GridPlan:
    """The grid's buys below and sells above the centre that are not already present.

    Levels go nearest first, a buy then a sell, so that the limits cut the far
    levels. A level is present when any open own order rests at its price
    (either side: a counter-order holds the level it sits on).
    """
    decisions: list[Decision] = []
    for k in range(1, config.levels + 1):
        sides: tuple[tuple[Side, int], ...] = (("buy", -k), ("sell", k))
        for side, level in sides:
            price = config.level_price(level)
            why = f"grid level {level:+d} (centre {config.centre})"
            if price <= 0:
                decisions.append(Decision("skip", f"{side} @ {price} ({why}): price <= 0"))
                continue
            holder = state.occupied(price)
            if holder is not None:
                decisions.append(Decision(
                    "skip", f"{side} @ {price} ({why}): level held by {holder.client_oid}"))
                continue
            state, decision = _place(config, state, side, price, config.size, why)
            decisions.append(decision)
    return GridPlan(state, tuple(decisions))


def on_fill(config: GridConfig, state: GridState, fill: Fill) -> GridPlan:
    """Apply one own-order event; on new filled size, the counter-order one step away.

    ``fill.filled_size`` is cumulative (as in the order's hash); only the part
    above the order's ``filled`` is new. An event of an order the grid does not
    hold, or with nothing new, changes nothing but the status. A final event
    (``filled``/``canceled``) with less than the grid counted is the exchange's
    final word correcting an earlier figure (a fill guessed after a loss): the
    position is corrected, and no counter-order follows (the one placed for the
    guess stays: a real order, whose own fills count as any).
    """
    order = state.orders.get(fill.client_oid)
    if order is None:
        return GridPlan(state, (Decision("skip", f"{fill.client_oid}: not a grid order"),))
    final = fill.status in ("filled", "canceled")
    floor = 0 if final else order.filled
    filled = min(max(fill.filled_size, floor), order.size)
    delta = filled - order.filled
    status = fill.status or order.status
    if delta > 0 and fill.status is None:
        status = "filled" if filled >= order.size else "partially_filled"
    updated = replace(order, filled=filled, status=status)
    sign = 1 if order.side == "buy" else -1
    state = replace(state, orders={**state.orders, order.client_oid: updated},
                    position=state.position + sign * delta)
    decisions: list[Decision] = []
    if fill.filled_size > order.size:
        decisions.append(Decision(
            "skip", f"{order.client_oid}: filled {fill.filled_size} > size {order.size}, "
                    f"counted {order.size}"))
    if delta < 0:
        decisions.append(Decision(
            "skip", f"{order.client_oid}: the final figure is {filled}, not {order.filled} "
                    f"as counted: position corrected to {state.position}"))
    if delta <= 0:
        return GridPlan(state, tuple(decisions))
    counter_side: Side = "sell" if order.side == "buy" else "buy"
    price = order.price + config.step if order.side == "buy" else order.price - config.step
    why = (f"counter to {order.client_oid} {order.side} @ {order.price} filled "
           f"{filled}/{order.size} (+{delta}), position {state.position}")
    if price <= 0:
        decisions.append(Decision("skip", f"{counter_side} @ {price} ({why}): price <= 0"))
        return GridPlan(state, tuple(decisions))
    state, decision = _place(config, state, counter_side, price, delta, why, counter=True)
    decisions.append(decision)
    return GridPlan(state, tuple(decisions))


def retry_refused(config: GridConfig, state: GridState, client_oid: str, why: str) -> GridPlan:
    """The same order again, under a new clientOid, for one the exchange refused for now.

    For a refusal that means "later" (a rate limit): the refused order was
    never accepted, so sending its like again cannot double it. Only an order
    that ended ``rejected`` without any fill is retried; limits apply as to
    any placement.
    """
    order = state.orders.get(client_oid)
    if order is None:
        return GridPlan(state, (Decision("skip", f"{client_oid}: not a grid order"),))
    if order.status != "rejected" or order.filled:
        return GridPlan(state, (Decision(
            "skip", f"{client_oid}: not retried, it is {order.status} "
                    f"(filled {order.filled})"),))
    state, decision = _place(config, state, order.side, order.price, order.size,
                             f"again for {client_oid}, refused: {why}")
    return GridPlan(state, (decision,))

