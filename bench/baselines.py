"""Two baseline L3 books, measured beside ours on the same stream.

Both decode as client libraries of the time did (``json.loads``, then
``Decimal`` for prices and sizes) and apply the same rules as
:class:`kumex_l3.OrderBook` (open/update/match/done, unknown orders ignored),
without its sequence and integrity checks.

* :class:`NaiveListBook`: each price level is a Python list of orders that is
  scanned to find an order, as the old coinbase-pro client did; the price
  ladder is a sorted list of prices kept with ``bisect``.
* :class:`CSortedDictBook`: the price ladder is the ``order-book`` package's C
  ``SortedDict`` (one per side, DESC for bids and ASC for asks), levels are
  dicts of orders; an order-id index finds the level.
"""

from __future__ import annotations

import bisect
import json
from decimal import Decimal
from typing import Any

import orjson
from order_book import SortedDict


class NaiveListBook:
    def __init__(self) -> None:
        self.sequence = 0
        self.levels: dict[str, dict[Decimal, list[dict[str, Any]]]] = {"buy": {}, "sell": {}}
        self.prices: dict[str, list[Decimal]] = {"buy": [], "sell": []}
        self.where: dict[str, tuple[str, Decimal]] = {}

    def process(self, raw: bytes) -> None:
        msg = json.loads(raw)
        data = msg["data"]
        self.sequence = data["sequence"]
        subject = msg["subject"]
        if subject == "open":
            side, price = data["side"], Decimal(data["price"])
            level = self.levels[side].get(price)
            if level is None:
                level = self.levels[side][price] = []
                bisect.insort(self.prices[side], price)
            level.append({"id": data["orderId"], "size": Decimal(data["size"]), "ts": data["ts"]})
            self.where[data["orderId"]] = (side, price)
        elif subject == "done":
            self._remove(data["orderId"])
        elif subject == "match":
            loc = self.where.get(data["makerOrderId"])
            if loc is not None:
                for order in self.levels[loc[0]][loc[1]]:
                    if order["id"] == data["makerOrderId"]:
                        order["size"] -= Decimal(data["size"])
                        if order["size"] == 0:
                            self._remove(data["makerOrderId"])
                        break
        elif subject == "update":
            loc = self.where.get(data["orderId"])
            if loc is not None:
                for order in self.levels[loc[0]][loc[1]]:
                    if order["id"] == data["orderId"]:
                        order["size"] = Decimal(data["size"])
                        break

    def _remove(self, order_id: str) -> None:
        loc = self.where.pop(order_id, None)
        if loc is None:
            return
        side, price = loc
        level = self.levels[side][price]
        for i, order in enumerate(level):
            if order["id"] == order_id:
                del level[i]
                break
        if not level:
            del self.levels[side][price]
            prices = self.prices[side]
            del prices[bisect.bisect_left(prices, price)]

    def depth(self) -> tuple[list[tuple[Decimal, Decimal, int]], ...]:
        def side(name: str, reverse: bool) -> list[tuple[Decimal, Decimal, int]]:
            prices = reversed(self.prices[name]) if reverse else iter(self.prices[name])
            return [(p, sum(o["size"] for o in self.levels[name][p]), len(self.levels[name][p]))
                    for p in prices]
        return side("buy", True), side("sell", False)


def _remove(sides: dict[str, Any], where: dict[str, tuple[str, Any]], order_id: str) -> None:
    """Take an order off its level of a ladder keyed by price (the level too when empty)."""
    loc = where.pop(order_id, None)
    if loc is None:
        return
    ladder = sides[loc[0]]
    level = ladder[loc[1]]
    del level[order_id]
    if not level:
        del ladder[loc[1]]


class CSortedDictBook:
    def __init__(self) -> None:
        self.sequence = 0
        self.sides = {"buy": SortedDict(ordering="DESC"), "sell": SortedDict(ordering="ASC")}
        self.where: dict[str, tuple[str, Decimal]] = {}

    def process(self, raw: bytes) -> None:
        msg = json.loads(raw)
        data = msg["data"]
        self.sequence = data["sequence"]
        subject = msg["subject"]
        if subject == "open":
            side, price = data["side"], Decimal(data["price"])
            ladder = self.sides[side]
            if price in ladder:
                level = ladder[price]
            else:
                level = ladder[price] = {}
            level[data["orderId"]] = Decimal(data["size"])
            self.where[data["orderId"]] = (side, price)
        elif subject == "done":
            self._remove(data["orderId"])
        elif subject == "match":
            loc = self.where.get(data["makerOrderId"])
            if loc is not None:
                level = self.sides[loc[0]][loc[1]]
                left = level[data["makerOrderId"]] - Decimal(data["size"])
                if left == 0:
                    self._remove(data["makerOrderId"])
                else:
                    level[data["makerOrderId"]] = left
        elif subject == "update":
            loc = self.where.get(data["orderId"])
            if loc is not None:
                self.sides[loc[0]][loc[1]][data["orderId"]] = Decimal(data["size"])

    def _remove(self, order_id: str) -> None:
        _remove(self.sides, self.where, order_id)

    def depth(self) -> tuple[list[tuple[Decimal, Decimal, int]], ...]:
        return tuple(  # type: ignore[return-value]
            [(p, sum(lv.values()), len(lv)) for p, lv in self.sides[s].to_dict().items()]
            for s in ("buy", "sell")
        )


class SimpleSortedDictBook:
    """The book a Python trader writes first: orjson to dicts, a ``SortedDict`` per side.

    A dict of orders per level, an orderId index, and a check that each sequence
    follows the last. ``float_prices`` keys the ladder by ``float`` (what such a
    book usually does, and the fastest); otherwise by ``Decimal`` (exact).
    """

    def __init__(self, *, float_prices: bool = True) -> None:
        from sortedcontainers import SortedDict as PySortedDict

        self.sequence = 0
        self.sides: dict[str, Any] = {"buy": PySortedDict(), "sell": PySortedDict()}
        self.orders: dict[str, tuple[str, Any]] = {}
        self.key: Any = float if float_prices else Decimal

    def process(self, raw: bytes) -> None:
        msg = orjson.loads(raw)
        data = msg["data"]
        seq = data["sequence"]
        if self.sequence and seq != self.sequence + 1:
            raise ValueError(f"gap: {self.sequence} then {seq}")
        self.sequence = seq
        subject = msg["subject"]
        if subject == "open":
            side, price, oid = data["side"], self.key(data["price"]), data["orderId"]
            ladder = self.sides[side]
            level = ladder.get(price)
            if level is None:
                level = ladder[price] = {}
            level[oid] = int(data["size"])
            self.orders[oid] = (side, price)
        elif subject == "done":
            self._remove(data["orderId"])
        elif subject == "match":
            oid = data["makerOrderId"]
            loc = self.orders.get(oid)
            if loc is not None:
                level = self.sides[loc[0]][loc[1]]
                left = level[oid] - int(data["size"])
                if left == 0:
                    self._remove(oid)
                else:
                    level[oid] = left
        elif subject == "update":
            oid = data["orderId"]
            loc = self.orders.get(oid)
            if loc is not None:
                size = int(data["size"])
                if size == 0:
                    self._remove(oid)
                else:
                    self.sides[loc[0]][loc[1]][oid] = size

    def _remove(self, order_id: str) -> None:
        _remove(self.sides, self.orders, order_id)

    def depth(self) -> tuple[list[tuple[Decimal, Decimal, int]], ...]:
        def side(name: str, reverse: bool) -> list[tuple[Decimal, Decimal, int]]:
            ladder = self.sides[name]
            keys = reversed(ladder) if reverse else iter(ladder)
            return [(Decimal(str(p)), Decimal(sum(ladder[p].values())), len(ladder[p]))
                    for p in keys]
        return side("buy", True), side("sell", False)
