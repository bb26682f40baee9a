"""A slow, obviously correct L3 book: the oracle of the stress tests.

It decodes with ``json.loads`` (not the project's parser), keeps every resting
order in one dict in arrival order, and computes every view by grouping and
sorting from scratch. No cleverness, no incremental state.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


class ReferenceBook:
    def __init__(self, snapshot: dict[str, Any] | None = None, symbol: str = "XBTUSDM") -> None:
        self.symbol = symbol
        self.sequence = 0
        # orderId -> [side, Decimal price, price text, size, ts, arrival number]
        self.orders: dict[str, list[Any]] = {}
        self._arrivals = 0
        if snapshot is not None:
            self.symbol = snapshot["symbol"]
            self.sequence = snapshot["sequence"]
            for side, key in (("buy", "bids"), ("sell", "asks")):
                rows = [r if len(r) == 4 else r[1:] for r in snapshot[key]]
                for oid, price, size, ts in sorted(rows, key=lambda r: r[3]):
                    self._add(oid, side, price, Decimal(size), ts)

    def _add(self, oid: str, side: str, price: str, size: Decimal, ts: int) -> None:
        self._arrivals += 1
        self.orders[oid] = [side, Decimal(price), price, size, ts, self._arrivals]

    def apply(self, raw: str) -> None:
        msg = json.loads(raw)
        data = msg["data"]
        assert data["sequence"] == self.sequence + 1, (data["sequence"], self.sequence)
        self.sequence = data["sequence"]
        subject = msg["subject"]
        if subject == "open":
            self._add(data["orderId"], data["side"], data["price"], Decimal(data["size"]),
                      data["ts"])
        elif subject == "update":
            if data["orderId"] in self.orders:
                self.orders[data["orderId"]][3] = Decimal(data["size"])
                if self.orders[data["orderId"]][3] == 0:
                    del self.orders[data["orderId"]]
        elif subject == "match":
            maker = self.orders.get(data["makerOrderId"])
            if maker is not None:
                maker[3] -= Decimal(data["size"])
                assert maker[3] >= 0
                if maker[3] == 0:
                    del self.orders[data["makerOrderId"]]
        elif subject == "done":
            self.orders.pop(data["orderId"], None)

    def l3(self) -> tuple[list[Any], list[Any]]:
        """Each side best first: ``(price, [(orderId, size, ts), ...])`` in queue order."""
        groups: dict[tuple[str, Decimal], list[tuple[str, list[Any]]]] = {}
        for oid, o in self.orders.items():
            groups.setdefault((o[0], o[1]), []).append((oid, o))
        out = []
        for side in ("buy", "sell"):
            prices = sorted((p for s, p in groups if s == side), reverse=(side == "buy"))
            levels = []
            for p in prices:
                queue = sorted(groups[(side, p)], key=lambda item: (item[1][4], item[1][5]))
                levels.append((p, [(oid, o[3], o[4]) for oid, o in queue]))
            out.append(levels)
        return out[0], out[1]

    def depth(self) -> tuple[list[Any], list[Any]]:
        bids, asks = self.l3()
        return (
            [(p, sum(size for _, size, _ in q), len(q)) for p, q in bids],
            [(p, sum(size for _, size, _ in q), len(q)) for p, q in asks],
        )
