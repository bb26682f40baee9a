"""Contract specifications of the sandbox exchange (kumex-api.md §7).

Pure data: the contracts the sandbox lists, their exchange field names
(:meth:`Contract.to_api`) and the exchange's text form of a price
(:func:`format_price`, the tick's number of decimals: ``"31570.0"``).

The catalog: the three contracts the sandbox always had (``XBTUSDM``,
``XBTUSDTM``, ``ETHUSDTM``, their specifications unchanged) and a hundred more
linear ``{BASE}USDTM`` perpetuals named after contracts the real venue listed.
Their specifications are spread as the venue's are, from a rough price of the
base: the tick is about a ten-thousandth of the price (a power of ten), the
multiplier makes one contract worth between about 1 and 10 USDT (a power of
ten), the lot is one contract. :data:`MIDS` holds those prices (the synthetic
flow starts there) and :data:`ACTIVITY` each contract's share of the flow:
the three of old the busiest, the others falling off as a Zipf law by their
rank, so that a few are busy and most are quiet, as on a real venue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = ["ACTIVITY", "CONTRACTS", "MIDS", "Contract", "format_price", "price_decimals"]


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


# The rest of the catalog: base, a rough price in USDT (the flow's start mid), by the
# venue's usual order of activity (busiest first).
_CATALOG: tuple[tuple[str, str], ...] = (
    ("SOL", "20"), ("XRP", "0.5"), ("DOGE", "0.07"), ("ADA", "0.3"), ("AVAX", "12"),
    ("LINK", "7"), ("DOT", "5"), ("MATIC", "0.6"), ("LTC", "70"), ("BCH", "230"),
    ("TRX", "0.09"), ("UNI", "5"), ("ATOM", "9"), ("ETC", "16"), ("XLM", "0.12"),
    ("FIL", "4"), ("APT", "7"), ("ARB", "1.1"), ("OP", "1.5"), ("NEAR", "1.4"),
    ("ICP", "4"), ("INJ", "8"), ("SUI", "0.5"), ("SEI", "0.15"), ("TIA", "3"),
    ("AAVE", "60"), ("MKR", "1200"), ("SNX", "2.5"), ("CRV", "0.5"), ("COMP", "50"),
    ("SUSHI", "0.8"), ("YFI", "6000"), ("1INCH", "0.3"), ("LDO", "1.8"), ("RUNE", "1.5"),
    ("GRT", "0.1"), ("SAND", "0.35"), ("MANA", "0.35"), ("AXS", "5"), ("APE", "1.5"),
    ("GALA", "0.02"), ("ENJ", "0.25"), ("CHZ", "0.06"), ("FTM", "0.2"), ("ALGO", "0.1"),
    ("EGLD", "30"), ("FLOW", "0.5"), ("THETA", "0.7"), ("XTZ", "0.7"), ("EOS", "0.6"),
    ("NEO", "8"), ("ZEC", "25"), ("DASH", "28"), ("XMR", "150"), ("KSM", "20"),
    ("BAT", "0.2"), ("ZIL", "0.02"), ("IOTA", "0.17"), ("VET", "0.02"), ("HBAR", "0.05"),
    ("QNT", "100"), ("STX", "0.6"), ("IMX", "0.7"), ("BLUR", "0.2"), ("DYDX", "2"),
    ("GMX", "40"), ("PEPE", "0.0000012"), ("SHIB", "0.000008"), ("FLOKI", "0.00003"),
    ("BONK", "0.000002"), ("WIF", "1.5"), ("ORDI", "10"), ("KAS", "0.05"), ("TON", "2"),
    ("JUP", "0.5"), ("PYTH", "0.3"), ("WLD", "2"), ("FET", "0.4"), ("RNDR", "3"),
    ("AR", "6"), ("ENS", "8"), ("CFX", "0.15"), ("LUNC", "0.00009"), ("MASK", "3"),
    ("ROSE", "0.05"), ("KAVA", "0.7"), ("ONE", "0.012"), ("CELO", "0.5"), ("ZRX", "0.3"),
    ("BAND", "1.2"), ("STORJ", "0.4"), ("SKL", "0.03"), ("ANKR", "0.02"), ("OCEAN", "0.4"),
    ("RVN", "0.02"), ("ICX", "0.2"), ("WAVES", "2"), ("TRB", "15"), ("LRC", "0.2"),
)


def _power_of_ten(value: Decimal) -> Decimal:
    """The power of ten at or below ``value`` (``0.07`` -> ``0.01``)."""
    return Decimal(10) ** math.floor(math.log10(value))


def _linear(base: str, price: Decimal) -> Contract:
    return Contract(
        symbol=f"{base}USDTM",
        base_currency=base,
        quote_currency="USDT",
        settle_currency="USDT",
        type="FFWCSX",
        is_inverse=False,
        multiplier=_power_of_ten(Decimal(10) / price),
        lot_size=1,
        tick_size=_power_of_ten(price) / 10_000,
        max_order_qty=1_000_000,
        max_price=_power_of_ten(price) * 1_000_000,
        max_leverage=50,
        maker_fee_rate=Decimal("0.0002"),
        taker_fee_rate=Decimal("0.0006"),
        status="Open",
        root_symbol="USDT",
        index_symbol=f".K{base}USDT",
    )


CONTRACTS.update((c.symbol, c) for c in (_linear(b, Decimal(p)) for b, p in _CATALOG))

MIDS: dict[str, Decimal] = {
    "XBTUSDM": Decimal("30000"), "XBTUSDTM": Decimal("30000"), "ETHUSDTM": Decimal("2000"),
    **{f"{b}USDTM": Decimal(p) for b, p in _CATALOG},
}
"""Each contract's rough price: where the synthetic flow starts its mid."""

ACTIVITY: dict[str, float] = {
    symbol: 1.0 if rank < 3 else 3.0 / (rank + 1) for rank, symbol in enumerate(CONTRACTS)
}
"""Each contract's weight in the synthetic flow: 1 for the three of old, then Zipf (1/rank)."""
