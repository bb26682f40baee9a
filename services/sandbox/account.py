"""An account's balance in one settlement currency. Pure.

What ``GET /api/v1/account-overview?currency=`` shows (docs.kumex.com, "Get
Account Overview"), from the account's positions and open orders in the
contracts settled in that currency, all in that currency:

* ``marginBalance`` = the starting balance + the realised profit of those
  positions - the fees they paid;
* ``unrealisedPNL`` = the profit of the open contracts at the mark price;
* ``accountEquity`` = ``marginBalance`` + ``unrealisedPNL``;
* ``positionMargin`` = each position's cost (absolute) / its leverage;
* ``orderMargin`` = each open order's value (remaining size at its price) / the
  order's leverage;
* ``frozenFunds`` = 0 (no withdrawals or transfers here);
* ``availableBalance`` = ``marginBalance`` + ``unrealisedPNL`` -
  ``positionMargin`` - ``orderMargin`` - ``frozenFunds``: the venue documents
  ``marginBalance = positionMargin + orderMargin + frozenFunds +
  availableBalance - unrealisedPNL``.

Untriggered stop orders hold no margin (they are not orders yet). Funding,
liquidation and risk limits are not modelled: nothing stops a balance from
going negative. Values are exact :class:`~decimal.Decimal`; the API sends them
as JSON numbers, as the venue does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.sandbox.positions import Position

__all__ = ["AccountOverview", "Holding", "OpenOrder", "account_overview"]

_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class OpenOrder:
    """An order resting in the book: its remaining size, price and leverage."""

    size: int
    price: Decimal
    leverage: Decimal


@dataclass(frozen=True, slots=True)
class Holding:
    """An account's part of one contract: its position, valued at ``mark`` (None: no
    mark, no unrealised profit), margined at ``leverage``, and its open orders."""

    position: Position
    mark: Decimal | None
    leverage: Decimal
    orders: tuple[OpenOrder, ...] = ()


@dataclass(frozen=True, slots=True)
class AccountOverview:
    """The fields of ``GET /api/v1/account-overview`` (module doc)."""

    currency: str
    account_equity: Decimal
    unrealised_pnl: Decimal
    margin_balance: Decimal
    position_margin: Decimal
    order_margin: Decimal
    frozen_funds: Decimal
    available_balance: Decimal

    def to_api(self) -> dict[str, Any]:
        """The ``data`` of the reply: numbers as JSON numbers, as the venue sends them."""
        return {
            "accountEquity": float(self.account_equity),
            "unrealisedPNL": float(self.unrealised_pnl),
            "marginBalance": float(self.margin_balance),
            "positionMargin": float(self.position_margin),
            "orderMargin": float(self.order_margin),
            "frozenFunds": float(self.frozen_funds),
            "availableBalance": float(self.available_balance),
            "currency": self.currency,
        }


def _positive(leverage: Decimal) -> Decimal:
    if not leverage.is_finite() or leverage <= 0:
        raise ValueError(f"leverage must be a positive number, not {leverage}")
    return leverage


def account_overview(currency: str, starting_balance: Decimal,
                     holdings: Iterable[Holding]) -> AccountOverview:
    """The overview of an account that started with ``starting_balance`` of ``currency``
    and holds ``holdings`` (one per contract settled in ``currency``)."""
    realised = unrealised = position_margin = order_margin = _ZERO
    for holding in holdings:
        position = holding.position
        realised += position.realised_gross - position.comm
        unrealised += position.unrealised(holding.mark)
        position_margin += abs(position.cost) / _positive(holding.leverage)
        for order in holding.orders:
            order_margin += position.value(order.size, order.price) / _positive(order.leverage)
    margin_balance = starting_balance + realised
    frozen = _ZERO
    return AccountOverview(
        currency=currency,
        account_equity=margin_balance + unrealised,
        unrealised_pnl=unrealised,
        margin_balance=margin_balance,
        position_margin=position_margin,
        order_margin=order_margin,
        frozen_funds=frozen,
        available_balance=margin_balance + unrealised - position_margin - order_margin - frozen,
    )
