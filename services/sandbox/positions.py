"""An account's position in one contract, from its fills. Pure.

What ``GET /api/v1/position`` shows (docs.kumex.com, "Get Position Details"),
for the part the sandbox models: the signed quantity, its cost at entry, the
average entry price, the commission paid, the realised profit of the
contracts closed and the unrealised profit at the mark price. Liquidation and
funding are not modelled; the account's balance and margins, from its
positions, are :mod:`services.sandbox.account`'s.

Values are in the settlement currency: for a linear contract (USDT) a fill's
value is ``size x multiplier x price``; for an inverse one (XBTUSDM: the size
in USD) it is ``size x |multiplier| / price``, in XBT. ``cost`` is signed like
the quantity (a long position's is positive), so that the unrealised profit
is ``qty x multiplier x mark - cost`` (linear) or ``cost - qty x |multiplier|
/ mark`` (inverse), long or short.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = ["Position"]

_ZERO = Decimal(0)


@dataclass
class Position:
    """One account's position in one contract (module doc)."""

    symbol: str
    inverse: bool
    multiplier: Decimal  # absolute
    settle_currency: str
    qty: int = 0
    cost: Decimal = _ZERO
    comm: Decimal = _ZERO
    realised_gross: Decimal = _ZERO
    opened_at_ms: int | None = None

    def value(self, size: int, price: Decimal) -> Decimal:
        """The value of ``size`` contracts at ``price`` (unsigned)."""
        if self.inverse:
            return Decimal(size) * self.multiplier / price
        return Decimal(size) * self.multiplier * price

    def fill(self, side: str, size: int, price: Decimal, fee: Decimal, at_ms: int) -> None:
        """A fill of ``size`` contracts of ours on ``side`` at ``price``, paying ``fee``."""
        if size <= 0:
            raise ValueError("a fill has a positive size")
        direction = 1 if side == "buy" else -1
        self.comm += fee
        if self.qty == 0 or (self.qty > 0) == (direction > 0):
            self._open(direction, size, price, at_ms)
            return
        held = 1 if self.qty > 0 else -1
        closed = min(size, abs(self.qty))
        portion = abs(self.cost) * closed / abs(self.qty)
        exit_value = self.value(closed, price)
        gain = exit_value - portion if not self.inverse else portion - exit_value
        self.realised_gross += held * gain
        self.cost -= held * portion
        self.qty -= held * closed
        if self.qty == 0:
            self.cost, self.opened_at_ms = _ZERO, None
        if size > closed:
            self._open(direction, size - closed, price, at_ms)

    def _open(self, direction: int, size: int, price: Decimal, at_ms: int) -> None:
        self.cost += direction * self.value(size, price)
        self.qty += direction * size
        if self.opened_at_ms is None:
            self.opened_at_ms = at_ms

    def avg_entry_price(self) -> Decimal | None:
        """The price the open contracts cost on average (harmonic for inverse)."""
        if self.qty == 0:
            return None
        if self.inverse:
            return abs(self.qty) * self.multiplier / abs(self.cost)
        return abs(self.cost) / (abs(self.qty) * self.multiplier)

    def unrealised(self, mark: Decimal | None) -> Decimal:
        """The profit of the open contracts if closed at ``mark``."""
        if self.qty == 0 or mark is None:
            return _ZERO
        if self.inverse:
            return self.cost - self.qty * self.multiplier / mark
        return self.qty * self.multiplier * mark - self.cost

    def to_api(self, mark: Decimal | None, now_ms: int) -> dict[str, Any]:
        """The ``data`` of ``GET /api/v1/position`` (the modelled fields)."""
        entry = self.avg_entry_price()
        unrealised = self.unrealised(mark)
        mark_value = _ZERO if mark is None or self.qty == 0 else (
            self.qty * self.multiplier / mark if self.inverse
            else self.qty * self.multiplier * mark)
        return {
            "id": f"{self.symbol}-position",
            "symbol": self.symbol,
            "autoDeposit": False,
            "crossMode": False,
            "openingTimestamp": self.opened_at_ms,
            "currentTimestamp": now_ms,
            "currentQty": self.qty,
            "currentCost": float(self.cost),
            "currentComm": float(self.comm),
            "realisedGrossPnl": float(self.realised_gross),
            "realisedPnl": float(self.realised_gross - self.comm),
            "unrealisedPnl": float(unrealised),
            "unrealisedPnlPcnt": float(unrealised / abs(self.cost)) if self.cost else 0.0,
            "isOpen": self.qty != 0,
            "markPrice": None if mark is None else float(mark),
            "markValue": float(mark_value),
            "posCost": float(self.cost),
            "avgEntryPrice": None if entry is None else float(entry),
            "settleCurrency": self.settle_currency,
        }
