"""Contract specifications of the sandbox exchange (kumex-api.md §7).

Pure data: the contracts the sandbox lists, their exchange field names
(:meth:`Contract.to_api`) and the exchange's text form of a price
(:func:`format_price`, the tick's number of decimals: ``"31570.0"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = ["CONTRACTS", "Contract", "format_price", "price_decimals"]


def _num(value: Decimal) -> int | float:
    """A JSON number as the real API writes it: int when integral, else float."""
    if value == value.to_integral_value():
        return int(value)
    return float(value)


@dataclass(frozen=True, slots=True)
class Contract:
    """One perpetual contract (fields of ``GET /api/v1/contracts/{symbol}``)."""

    symbol: str
    base_currency: str
    quote_currency: str
    settle_currency: str
    type: str
    is_inverse: bool
    multiplier: Decimal
    lot_size: int
    tick_size: Decimal
    max_order_qty: int
    max_price: Decimal
    max_leverage: int
    maker_fee_rate: Decimal
    taker_fee_rate: Decimal
    status: str
    root_symbol: str = ""
    index_symbol: str = ""

    def to_api(
        self,
        mark_price: Decimal | None = None,
        index_price: Decimal | None = None,
    ) -> dict[str, Any]:
        """The contract as the REST API returns it (camelCase, numbers as numbers)."""
        data: dict[str, Any] = {
            "symbol": self.symbol,
            "rootSymbol": self.root_symbol or self.settle_currency,
            "type": self.type,
            "firstOpenDate": 1552638575000,
            "expireDate": None,
            "settleDate": None,
            "baseCurrency": self.base_currency,
            "quoteCurrency": self.quote_currency,
            "settleCurrency": self.settle_currency,
            "maxOrderQty": self.max_order_qty,
            "maxPrice": float(self.max_price),
            "lotSize": self.lot_size,
            "tickSize": float(self.tick_size),
            "indexPriceTickSize": float(self.tick_size),
            "multiplier": float(self.multiplier),
            "initialMargin": float(Decimal(1) / Decimal(self.max_leverage)),
            "maintainMargin": float(Decimal(1) / Decimal(self.max_leverage) / 2),
            "maxRiskLimit": 200 if self.is_inverse else 2_000_000,
            "minRiskLimit": 200 if self.is_inverse else 2_000_000,
            "riskStep": 100 if self.is_inverse else 1_000_000,
            "makerFeeRate": float(self.maker_fee_rate),
            "takerFeeRate": float(self.taker_fee_rate),
            "takerFixFee": 0.0,
            "makerFixFee": 0.0,
            "settlementFee": None,
            "isDeleverage": True,
            "isQuanto": False,
            "isInverse": self.is_inverse,
            "markMethod": "FairPrice",
            "fairMethod": "FundingRate",
            "fundingBaseSymbol": f".{self.base_currency}INT8H",
            "fundingQuoteSymbol": f".{self.quote_currency}INT8H",
            "fundingRateSymbol": f".{self.symbol}FPI8H",
            "indexSymbol": self.index_symbol,
            "settlementSymbol": "",
            "status": self.status,
            "maxLeverage": self.max_leverage,
        }
        if mark_price is not None:
            data["markPrice"] = _num(mark_price)
        if index_price is not None:
            data["indexPrice"] = _num(index_price)
        return data


def price_decimals(contract: Contract) -> int:
    """Number of decimals of the contract's tick size (0.1 → 1, 0.01 → 2, 1 → 0)."""
    exponent = contract.tick_size.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def format_price(contract: Contract, price: Decimal) -> str:
    """The exchange's text of ``price``: the tick's decimals, no exponent ("31570.0")."""
    decimals = price_decimals(contract)
    return f"{price.quantize(Decimal(1).scaleb(-decimals)):f}"


CONTRACTS: dict[str, Contract] = {
    "XBTUSDM": Contract(
        symbol="XBTUSDM",
        base_currency="XBT",
        quote_currency="USD",
        settle_currency="XBT",
        type="FFWCSX",
        is_inverse=True,
        multiplier=Decimal(-1),
        lot_size=1,
        tick_size=Decimal("0.1"),
        max_order_qty=10_000_000,
        max_price=Decimal(1_000_000),
        max_leverage=75,
        maker_fee_rate=Decimal("0.0002"),
        taker_fee_rate=Decimal("0.0006"),
        status="Open",
        root_symbol="XBT",
        index_symbol=".BXBT",
    ),
    "XBTUSDTM": Contract(
        symbol="XBTUSDTM",
        base_currency="XBT",
        quote_currency="USDT",
        settle_currency="USDT",
        type="FFWCSX",
        is_inverse=False,
        multiplier=Decimal("0.001"),
        lot_size=1,
        tick_size=Decimal("0.1"),
        max_order_qty=1_000_000,
        max_price=Decimal(1_000_000),
        max_leverage=100,
        maker_fee_rate=Decimal("0.0002"),
        taker_fee_rate=Decimal("0.0006"),
        status="Open",
        root_symbol="USDT",
        index_symbol=".KXBTUSDT",
    ),
    "ETHUSDTM": Contract(
        symbol="ETHUSDTM",
        base_currency="ETH",
        quote_currency="USDT",
        settle_currency="USDT",
        type="FFWCSX",
        is_inverse=False,
        multiplier=Decimal("0.01"),
        lot_size=1,
        tick_size=Decimal("0.01"),
        max_order_qty=1_000_000,
        max_price=Decimal(1_000_000),
        max_leverage=100,
        maker_fee_rate=Decimal("0.0002"),
        taker_fee_rate=Decimal("0.0006"),
        status="Open",
        root_symbol="USDT",
        index_symbol=".KETHUSDT",
    ),
}
