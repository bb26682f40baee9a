"""Synthetic order flow for the sandbox exchange: seeded, pure, fast.

:class:`SyntheticFlow` drives one :class:`~services.sandbox.engine.MatchingEngine`
per symbol with the actions of simulated participants; every call returns the
level3v2 messages the engines emitted, per symbol, in sequence order.

Participants:

* makers ``flow-maker-N`` quote GTC limits at 1..``levels`` ticks around a mid
  that random-walks per symbol (more often near the touch), cancel (preferring
  the quote farther from the mid), re-quote and shrink resting sizes
  (``amend_size`` → ``update``); now and then a hidden order, or a postOnly
  that may cross (and is canceled by the engine);
* takers ``flow-taker-N`` send market orders, IOC limits a few ticks through
  the touch, and occasional aggressive GTC limits that fill partly and rest.

Sizes are heavy-tailed (Pareto, capped); taker sizes are also capped at a
quarter of the opposite side's resting size, and a side that runs thin is
refilled first, so the book stays two-sided. The engine guarantees it is never
crossed. The mix of placing and canceling steers the resting count toward
``target_resting`` per symbol. Everything random comes from one
``random.Random(seed)``: same seed, same engines, same ``now_ns`` sequence →
the same messages.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Mapping
from decimal import Decimal

from services.sandbox.contracts import ACTIVITY, MIDS
from services.sandbox.engine import EngineOrder, MatchingEngine, Message, OrderRequest, RejectError

__all__ = ["DEFAULT_MIDS", "SyntheticFlow"]

DEFAULT_MIDS: dict[str, Decimal] = MIDS
"""Start mids used when ``start_mid`` does not name a symbol (the catalog's prices)."""

_FALLBACK_MID_TICKS = 100_000
_N_TAKERS = 4
_LEVERAGE = "10"

# Action names, drawn with weights that depend on the book's state.
_QUOTE = 0
_CANCEL = 1
_AMEND = 2
_MARKET = 3
_IOC = 4
_AGGRESSIVE = 5
_POST_ONLY = 6
_HIDDEN = 7


class _SymbolFlow:
    """The flow's per-symbol state: its engine, mid (in ticks) and known resting ids."""

    __slots__ = ("engine", "mid", "resting", "symbol")

    def __init__(self, symbol: str, engine: MatchingEngine, mid_ticks: float) -> None:
        self.symbol = symbol
        self.engine = engine
        self.mid = mid_ticks
        # Ids of orders the flow placed that may still rest; dead ones are
        # dropped lazily when drawn (fills remove orders behind our back).
        self.resting: list[str] = []


class SyntheticFlow:
    """Seeded synthetic participants trading on one engine per symbol.

    ``engines`` maps symbol → engine (iterated in its own order, which must be
    deterministic). ``target_resting`` is the resting order count aimed at per
    symbol, ``levels`` the number of price levels per side makers quote over.
    """

    def __init__(
        self,
        engines: Mapping[str, MatchingEngine],
        *,
        seed: int,
        start_mid: Mapping[str, Decimal] | None = None,
        target_resting: int = 300,
        levels: int = 40,
        maker_size_scale: int = 10,
        taker_size_scale: int = 5,
        max_maker_size: int = 2_000,
        max_taker_size: int = 1_000,
        hidden_weight: float = 1.5,
    ) -> None:
        if not engines:
            raise ValueError("SyntheticFlow needs at least one engine")
        if target_resting < 1 or levels < 1:
            raise ValueError("target_resting and levels must be positive")
        self.engines = engines
        self.target_resting = target_resting
        self.levels = levels
        self.maker_size_scale = maker_size_scale
        self.taker_size_scale = taker_size_scale
        self.max_maker_size = max_maker_size
        self.max_taker_size = max_taker_size
        self.hidden_weight = hidden_weight
        #: Requests the engine refused (should stay 0; counted, never raised).
        self.rejects = 0
        self._rng = random.Random(seed)
        mids = dict(start_mid or {})
        self._symbols: list[_SymbolFlow] = []
        max_active = 100
        for symbol, engine in engines.items():
            max_active = min(max_active, engine.max_active_per_user)
            mid = mids.get(symbol, DEFAULT_MIDS.get(symbol))
            if mid is None:
                mid_ticks = float(_FALLBACK_MID_TICKS)
            else:
                mid_ticks = float(mid / engine.contract.tick_size)
            self._symbols.append(_SymbolFlow(symbol, engine, max(mid_ticks, 4.0 * levels)))
        # Each step draws its symbol by the catalog's activity; symbols of equal
        # weight (the three of old alone, say) are drawn uniformly, as they always were.
        weights = [ACTIVITY.get(sf.symbol, 1.0) for sf in self._symbols]
        self._cum_weights: list[float] | None = (
            None if len(set(weights)) <= 1 else list(itertools.accumulate(weights)))
        # Enough makers that they never hit the per-user active order limit.
        n_makers = max(8, (3 * target_resting) // max(1, max_active) + 2)
        self._makers = [f"flow-maker-{i}" for i in range(n_makers)]
        self._takers = [f"flow-taker-{i}" for i in range(_N_TAKERS)]
        self._min_side = max(3, target_resting // 10)

    # ------------------------------------------------------------------ helpers

    def _client_oid(self) -> str:
        return f"{self._rng.getrandbits(80):020x}"

    def _pareto(self, scale: int, cap: int) -> int:
        size = int(scale * self._rng.paretovariate(1.5))
        return min(cap, max(1, size))

    def _user_with_room(self, users: list[str], engine: MatchingEngine) -> str | None:
        start = self._rng.randrange(len(users))
        limit = engine.max_active_per_user
        for i in range(len(users)):
            user = users[(start + i) % len(users)]
            if engine.active_count(user) < limit:
                return user
        return None

    def _draw_resting(self, sf: _SymbolFlow) -> EngineOrder | None:
        """A random order of the flow that still rests on ``sf``'s engine, or None."""
        resting = sf.resting
        engine = sf.engine
        rng = self._rng
        while resting:
            i = rng.randrange(len(resting))
            order = engine.get_order(resting[i])
            if order is not None and order.is_active:
                return order
            resting[i] = resting[-1]
            resting.pop()
        return None

    def _place(
        self,
        sf: _SymbolFlow,
        user: str,
        side: str,
        size: int,
        now_ns: int,
        *,
        price_ticks: int | None = None,
        tif: str = "GTC",
        post_only: bool = False,
        hidden: bool = False,
    ) -> list[Message]:
        engine = sf.engine
        lot = engine.contract.lot_size
        req = OrderRequest(
            user_id=user,
            client_oid=self._client_oid(),
            side=side,
            type="market" if price_ticks is None else "limit",
            price=None if price_ticks is None else price_ticks * engine.contract.tick_size,
            size=size * lot,
            time_in_force=tif,
            post_only=post_only,
            hidden=hidden,
            leverage=_LEVERAGE,
        )
        try:
            order, msgs = engine.place(req, now_ns)
        except RejectError:
            self.rejects += 1
            return []
        if order.is_active:
            sf.resting.append(order.id)
            if len(sf.resting) > 4 * self.target_resting + 100:
                sf.resting = [
                    oid for oid in sf.resting if (o := engine.get_order(oid)) and o.is_active
                ]
        return msgs

    def _quote_price(self, sf: _SymbolFlow, side: str, offset: int) -> int:
        """Passive price ``offset`` ticks from the mid, never crossing the other side."""
        mid = round(sf.mid)
        engine = sf.engine
        if side == "buy":
            price = mid - offset
            ask = engine.best_ticks("sell")
            if ask is not None and price >= ask:
                price = ask - 1
        else:
            price = mid + offset
            bid = engine.best_ticks("buy")
            if bid is not None and price <= bid:
                price = bid + 1
        return max(1, price)

    def _offset(self) -> int:
        """Ticks from the mid: 1..levels, denser near the touch."""
        return 1 + min(self.levels - 1, int(self.levels * self._rng.random() ** 1.7))

    def _maker_side(self, engine: MatchingEngine) -> str:
        bids = engine.resting_count("buy")
        asks = engine.resting_count("sell")
        return "buy" if self._rng.random() * (bids + asks + 2) < asks + 1 else "sell"

    def _taker_side(self, sf: _SymbolFlow) -> str:
        """Lean toward moving the book to the flow's mid."""
        engine = sf.engine
        bid = engine.best_ticks("buy")
        ask = engine.best_ticks("sell")
        lean = 0.0
        if bid is not None and ask is not None:
            lean = max(-0.3, min(0.3, (sf.mid - (bid + ask) / 2) / (2 * self.levels)))
        return "buy" if self._rng.random() < 0.5 + lean else "sell"

    # ------------------------------------------------------------------ actions

    def _quote(
        self,
        sf: _SymbolFlow,
        now_ns: int,
        side: str | None = None,
        *,
        hidden: bool = False,
    ) -> list[Message]:
        engine = sf.engine
        user = self._user_with_room(self._makers, engine)
        if user is None:
            return self._cancel(sf, now_ns)
        if side is None:
            side = self._maker_side(engine)
        price = self._quote_price(sf, side, self._offset())
        size = self._pareto(self.maker_size_scale, self.max_maker_size)
        return self._place(sf, user, side, size, now_ns, price_ticks=price, hidden=hidden)

    def _cancel(self, sf: _SymbolFlow, now_ns: int) -> list[Message]:
        first = self._draw_resting(sf)
        if first is None:
            return []
        second = self._draw_resting(sf)
        victim = first
        if second is not None and abs(second.price_ticks - sf.mid) > abs(
            first.price_ticks - sf.mid
        ):
            victim = second
        try:
            return sf.engine.cancel(victim.id, now_ns)
        except RejectError:
            self.rejects += 1
            return []

    def _amend(self, sf: _SymbolFlow, now_ns: int) -> list[Message]:
        order = self._draw_resting(sf)
        if order is None:
            return []
        left = order.remaining_size // sf.engine.contract.lot_size
        if left < 2:
            return self._cancel(sf, now_ns)
        new_size = self._rng.randint(1, left - 1) * sf.engine.contract.lot_size
        try:
            return sf.engine.amend_size(order.id, new_size, now_ns)
        except RejectError:
            self.rejects += 1
            return []

    def _taker_size(self, sf: _SymbolFlow, side: str) -> int:
        opposite = "sell" if side == "buy" else "buy"
        depth = sf.engine.resting_size(opposite) // sf.engine.contract.lot_size
        cap = min(self.max_taker_size, max(1, depth // 4))
        return self._pareto(self.taker_size_scale, cap)

    def _take(self, sf: _SymbolFlow, now_ns: int, kind: int) -> list[Message]:
        engine = sf.engine
        side = self._taker_side(sf)
        opposite = "sell" if side == "buy" else "buy"
        best = engine.best_ticks(opposite)
        if best is None:
            return self._quote(sf, now_ns, opposite)
        rng = self._rng
        size = self._taker_size(sf, side)
        sign = 1 if side == "buy" else -1
        if kind == _MARKET:
            user = self._takers[rng.randrange(len(self._takers))]
            return self._place(sf, user, side, size, now_ns)
        if kind == _IOC:
            user = self._takers[rng.randrange(len(self._takers))]
            price = max(1, best + sign * rng.randint(-1, 4))
            return self._place(sf, user, side, size, now_ns, price_ticks=price, tif="IOC")
        taker = self._user_with_room(self._takers, engine)
        if taker is None:
            return self._cancel(sf, now_ns)
        price = max(1, best + sign * rng.randint(0, 2))
        return self._place(sf, taker, side, 2 * size, now_ns, price_ticks=price)

    def _post_only(self, sf: _SymbolFlow, now_ns: int) -> list[Message]:
        engine = sf.engine
        user = self._user_with_room(self._makers, engine)
        if user is None:
            return self._cancel(sf, now_ns)
        side = self._maker_side(engine)
        opposite_best = engine.best_ticks("sell" if side == "buy" else "buy")
        if opposite_best is not None and self._rng.random() < 0.5:
            price = opposite_best  # would cross: the engine cancels it
        else:
            price = self._quote_price(sf, side, self._offset())
        size = self._pareto(self.maker_size_scale, self.max_maker_size)
        return self._place(sf, user, side, size, now_ns, price_ticks=price, post_only=True)

    # ------------------------------------------------------------------ public API

    def prime(self, now_ns: int) -> list[tuple[str, list[Message]]]:
        """Place the initial resting orders: ``target_resting`` per symbol over
        ``levels`` levels per side. Returns one ``(symbol, messages)`` per symbol."""
        out: list[tuple[str, list[Message]]] = []
        rng = self._rng
        for sf in self._symbols:
            msgs: list[Message] = []
            for i in range(self.target_resting):
                side = "buy" if i % 2 == 0 else "sell"
                user = self._makers[i % len(self._makers)]
                price = self._quote_price(sf, side, 1 + rng.randrange(self.levels))
                size = self._pareto(self.maker_size_scale, self.max_maker_size)
                msgs.extend(self._place(sf, user, side, size, now_ns, price_ticks=price))
            out.append((sf.symbol, msgs))
        return out

    def step(self, now_ns: int) -> list[tuple[str, list[Message]]]:
        """One participant action on one symbol; returns ``[(symbol, messages)]``
        (empty when the action emitted nothing)."""
        rng = self._rng
        cum = self._cum_weights
        if cum is None:
            sf = self._symbols[rng.randrange(len(self._symbols))]
        else:
            sf = self._symbols[bisect.bisect_right(cum, rng.random() * cum[-1])]
        sf.mid = max(2.0 * self.levels, sf.mid + rng.gauss(0.0, 0.6))
        engine = sf.engine
        msgs: list[Message]
        if engine.resting_count("buy") < self._min_side or engine.best_bid() is None:
            msgs = self._quote(sf, now_ns, "buy")
        elif engine.resting_count("sell") < self._min_side or engine.best_ask() is None:
            msgs = self._quote(sf, now_ns, "sell")
        else:
            msgs = self._act(sf, now_ns)
        return [(sf.symbol, msgs)] if msgs else []

    def _act(self, sf: _SymbolFlow, now_ns: int) -> list[Message]:
        ratio = sf.engine.resting_count() / self.target_resting
        weights = (
            max(2.0, 40.0 * (2.0 - ratio)),  # quote
            max(1.0, 30.0 * ratio),  # cancel
            6.0,  # amend
            5.0,  # market
            6.0,  # IOC
            3.0,  # aggressive GTC
            1.5,  # postOnly
            self.hidden_weight,  # hidden quote
        )
        action = self._rng.choices(range(len(weights)), weights)[0]
        if action == _QUOTE:
            return self._quote(sf, now_ns)
        if action == _CANCEL:
            return self._cancel(sf, now_ns)
        if action == _AMEND:
            return self._amend(sf, now_ns)
        if action in (_MARKET, _IOC, _AGGRESSIVE):
            return self._take(sf, now_ns, action)
        if action == _POST_ONLY:
            return self._post_only(sf, now_ns)
        return self._quote(sf, now_ns, hidden=True)
