"""Seeded generator of valid level3v2 streams (pure, no I/O), for tests and benchmarks.

It keeps a small model of the book of its own (price in integer ticks, FIFO
queues) and emits the raw JSON text of each message exactly as the exchange
writes it: makers arrive (``received`` + ``open``), cancel (``done``
canceled), shrink (``update``); takers sweep one or more levels (``received``,
``match`` per maker, ``done`` filled for each exhausted maker, then the
taker's own ``done`` or ``open`` of its remainder); some orders are refused at
once (``received`` + ``done`` for an order that never rested). Given the same
arguments it yields the same bytes.

This is deliberately not the sandbox's matching engine: it is a compact second
implementation so that the book, its reference and the benchmarks have a
stream that does not depend on the services.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from typing import Any

__all__ = ["StreamGenerator"]


class StreamGenerator:
    """A deterministic stream of valid level3v2 messages for one symbol.

    ``tick_decimals`` sets the price text (1 -> ``"31570.5"``); prices are kept
    as integer ticks. ``target_orders`` is the resting order count the flow
    hovers around; ``levels`` the half-width of the quoted band, in ticks.
    """

    def __init__(
        self,
        symbol: str = "XBTUSDM",
        *,
        seed: int = 1,
        start_sequence: int = 0,
        mid_ticks: int = 315_700,
        tick_decimals: int = 1,
        target_orders: int = 400,
        levels: int = 60,
        start_ts: int = 1_654_073_289_118_060_857,
    ) -> None:
        self.symbol = symbol
        self.sequence = start_sequence
        self.ts = start_ts
        self._rng = random.Random(seed)
        self._seed = seed
        self._mid = mid_ticks
        self._dec = tick_decimals
        self._scale = 10**tick_decimals
        self._target = target_orders
        self._levels = levels
        self._ids = 0
        self._carry: list[str] = []
        self._trades = 0
        # order id -> [side, ticks, size, ts]
        self._orders: dict[str, list[Any]] = {}
        self._queues: dict[tuple[str, int], deque[str]] = {}
        self._bid_ticks: list[int] = []  # ascending
        self._ask_ticks: list[int] = []  # ascending
        self._head = (
            '{"type":"message","topic":"/contractMarket/level3v2:' + symbol + '","subject":"'
        )

    # ------------------------------------------------------------------ public

    def take(self, n: int) -> list[str]:
        """The next ``n`` messages (raw JSON text); an action split at ``n`` continues next call."""
        out = self._carry
        while len(out) < n:
            out.extend(self._action())
        self._carry = out[n:]
        del out[n:]
        return out

    def flush(self) -> list[str]:
        """The rest of an action split by :meth:`take` (often none); call it before a snapshot."""
        out, self._carry = self._carry, []
        return out

    def snapshot(self) -> dict[str, Any]:
        """The ``data`` of an L3 snapshot of the model at the last *generated* message.

        Exact only when no message is pending: call :meth:`flush` first.
        """
        if self._carry:
            raise RuntimeError("messages of an action are still pending; drain them first")

        def rows(ticks: list[int], side: str, reverse: bool) -> list[list[Any]]:
            out: list[list[Any]] = []
            for t in sorted(ticks, reverse=reverse):
                for oid in self._queues[(side, t)]:
                    _, _, size, ts = self._orders[oid]
                    out.append([oid, self._price(t), str(size), ts])
            return out

        return {
            "symbol": self.symbol,
            "sequence": self.sequence,
            "ts": self.ts,
            "bids": rows(self._bid_ticks, "buy", True),
            "asks": rows(self._ask_ticks, "sell", False),
        }

    @property
    def resting(self) -> int:
        """Number of orders resting in the model."""
        return len(self._orders)

    # ------------------------------------------------------------------ model

    def _price(self, ticks: int) -> str:
        if self._dec == 0:
            return str(ticks)
        whole, frac = divmod(ticks, self._scale)
        return f"{whole}.{frac:0{self._dec}d}"

    def _next_id(self) -> str:
        self._ids += 1
        return f"{self._seed & 0xFFFFFFFF:08x}{self._ids:016x}"

    def _tick_ts(self) -> int:
        self.ts += self._rng.randint(1_000, 3_000_000)
        return self.ts

    def _size(self) -> int:
        # Heavy-tailed, capped: most orders small, a few very large.
        return min(int(self._rng.paretovariate(1.2)), 20_000)

    def _seq(self) -> int:
        self.sequence += 1
        return self.sequence

    def _received(self, oid: str, ts: int) -> str:
        coid = f"c{self._ids:x}" if self._rng.random() < 0.9 else ""
        return (f'{self._head}received","data":{{"symbol":"{self.symbol}","sequence":{self._seq()},'
                f'"orderId":"{oid}","clientOid":"{coid}","ts":{ts}}}}}')

    def _open_msg(self, oid: str, side: str, ticks: int, size: int, ts: int) -> str:
        return (f'{self._head}open","data":{{"symbol":"{self.symbol}","sequence":{self._seq()},'
                f'"side":"{side}","orderTime":{ts - 41_000},"size":"{size}","orderId":"{oid}",'
                f'"price":"{self._price(ticks)}","ts":{ts}}}}}')

    def _done(self, oid: str, reason: str, ts: int) -> str:
        return (f'{self._head}done","data":{{"symbol":"{self.symbol}","reason":"{reason}",'
                f'"sequence":{self._seq()},"orderId":"{oid}","ts":{ts}}}}}')

    def _rest(self, oid: str, side: str, ticks: int, size: int, ts: int) -> None:
        self._orders[oid] = [side, ticks, size, ts]
        key = (side, ticks)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            bisect.insort(self._bid_ticks if side == "buy" else self._ask_ticks, ticks)
        queue.append(oid)

    def _unrest(self, oid: str) -> None:
        side, ticks, _, _ = self._orders.pop(oid)
        key = (side, ticks)
        queue = self._queues[key]
        queue.remove(oid)
        if not queue:
            del self._queues[key]
            ladder = self._bid_ticks if side == "buy" else self._ask_ticks
            del ladder[bisect.bisect_left(ladder, ticks)]

    # ------------------------------------------------------------------ actions

    def _action(self) -> list[str]:
        rng = self._rng
        self._mid += rng.choice((-1, 0, 0, 1))
        fill = len(self._orders) / self._target
        r = rng.random()
        if not self._orders or r < 0.42 / max(fill, 0.3):
            return self._maker()
        r = rng.random()
        if r < 0.45:
            return self._cancel()
        if r < 0.60:
            return self._update()
        if r < 0.95:
            return self._taker()
        return self._refused()

    def _maker(self) -> list[str]:
        rng = self._rng
        side = "buy" if rng.random() < 0.5 else "sell"
        offset = int(rng.expovariate(1 / (self._levels / 4))) % self._levels + 1
        if side == "buy":
            ticks = self._mid - offset
            if self._ask_ticks and ticks >= self._ask_ticks[0]:
                ticks = self._ask_ticks[0] - 1
        else:
            ticks = self._mid + offset
            if self._bid_ticks and ticks <= self._bid_ticks[-1]:
                ticks = self._bid_ticks[-1] + 1
        ticks = max(ticks, 1)
        oid = self._next_id()
        ts = self._tick_ts()
        size = self._size()
        out = [self._received(oid, ts)]
        self._rest(oid, side, ticks, size, ts)
        out.append(self._open_msg(oid, side, ticks, size, ts))
        return out

    def _pick_resting(self) -> str | None:
        if not self._orders:
            return None
        # Random choice over a dict without building a list each time.
        i = self._rng.randrange(len(self._orders))
        for j, oid in enumerate(self._orders):
            if j == i:
                return oid
        return None  # pragma: no cover

    def _cancel(self) -> list[str]:
        oid = self._pick_resting()
        if oid is None:
            return self._maker()
        self._unrest(oid)
        return [self._done(oid, "canceled", self._tick_ts())]

    def _update(self) -> list[str]:
        oid = self._pick_resting()
        if oid is None or self._orders[oid][2] < 2:
            return self._cancel()
        order = self._orders[oid]
        order[2] = self._rng.randint(1, order[2] - 1)
        ts = self._tick_ts()
        return [f'{self._head}update","data":{{"symbol":"{self.symbol}","sequence":{self._seq()},'
                f'"orderId":"{oid}","size":"{order[2]}","ts":{ts}}}}}']

    def _taker(self) -> list[str]:
        rng = self._rng
        side = "buy" if rng.random() < 0.5 else "sell"
        ladder = self._ask_ticks if side == "buy" else self._bid_ticks
        if not ladder:
            return self._maker()
        oid = self._next_id()
        ts = self._tick_ts()
        size = self._size() * rng.choice((1, 1, 2, 5))
        depth = rng.choice((0, 0, 1, 2, 4))
        best = ladder[0] if side == "buy" else ladder[-1]
        limit = best + depth if side == "buy" else best - depth
        out = [self._received(oid, ts)]
        remaining = size
        while remaining and ladder:
            level = ladder[0] if side == "buy" else ladder[-1]
            if (side == "buy" and level > limit) or (side == "sell" and level < limit):
                break
            maker_side = "sell" if side == "buy" else "buy"
            maker_id = self._queues[(maker_side, level)][0]
            maker = self._orders[maker_id]
            qty = min(remaining, maker[2])
            remaining -= qty
            maker[2] -= qty
            self._trades += 1
            out.append(
                f'{self._head}match","data":{{"symbol":"{self.symbol}","sequence":{self._seq()},'
                f'"side":"{side}","price":"{self._price(level)}","size":"{qty}",'
                f'"makerOrderId":"{maker_id}","takerOrderId":"{oid}",'
                f'"tradeId":"{self._seed & 0xFFFFFF:06x}{self._trades:018x}","ts":{ts}}}}}')
            if maker[2] == 0:
                self._unrest(maker_id)
                out.append(self._done(maker_id, "filled", ts))
        if remaining == 0:
            out.append(self._done(oid, "filled", ts))
        elif rng.random() < 0.3:  # an aggressive GTC limit: the rest rests at its limit
            self._rest(oid, side, limit, remaining, ts)
            out.append(self._open_msg(oid, side, limit, remaining, ts))
        else:  # IOC / market remainder
            out.append(self._done(oid, "canceled", ts))
        return out

    def _refused(self) -> list[str]:
        oid = self._next_id()
        ts = self._tick_ts()
        return [self._received(oid, ts), self._done(oid, "canceled", ts)]
