"""Matching engine of the sandbox exchange: one per symbol, pure, deterministic.

The engine keeps a price-time priority book and emits, for every state change,
the exact level3v2 envelopes of kumex-api.md §4::

    {"type": "message", "topic": "/contractMarket/level3v2:SYM",
     "subject": S, "data": {"symbol": ..., "sequence": n, ..., "ts": ns}}

``sequence`` is one counter per symbol, +1 per emitted message (no holes, no
message without one); ``ts`` is the caller's ``now_ns`` forced strictly
increasing, so that ordering a price level by ``ts`` (as a snapshot consumer
does) reproduces the FIFO queue exactly.

Message order for an incoming order:

1. ``received`` (orderId, clientOid), for every accepted order;
2. for each maker hit, in price-time priority: ``match`` (side = the taker's
   side, price = the maker's price, size = filled, makerOrderId,
   takerOrderId, tradeId) and, when that maker is now fully filled, its
   ``done`` (reason ``filled``);
3. for the taker: ``open`` for a resting GTC remainder, ``done`` ``canceled``
   for an IOC or market remainder, ``done`` ``filled`` when fully filled.

Rules chosen where the protocol leaves freedom:

* **postOnly** that would cross (against any resting order, hidden ones
  included) is accepted and then canceled, as the real venue does:
  ``received`` then ``done`` ``canceled``; the REST caller gets its orderId.
  ``postOnly`` with ``IOC`` or with a market order is refused (400100).
* **hidden** limit orders rest invisibly: no ``open``, no ``update`` (an amend
  of a hidden order changes its size silently), never in ``snapshot`` or
  ``book_l3``. They can be hit: the ``match`` names the hidden maker and a
  fully filled one gets its ``done`` (a ``done`` for an unknown order is normal
  for a consumer). At one price, visible orders have priority over hidden ones.
  ``best_bid``/``best_ask``/``mid`` describe the visible book.
* **iceberg** orders are refused with 400100: the level3v2 protocol has no
  message for an iceberg's refresh (new visible slice at the back of the
  queue), and inventing one would teach consumers something the real venue
  never sent.
* Limits: at most ``max_active_per_user`` resting orders per user (checked for
  every GTC limit order, before matching: 300001); an active order with the
  same clientOid for the same user: 300018. Self-trade is allowed.
* Validation happens before anything is emitted: 400100 for malformed input
  (side, type, timeInForce, clientOid, missing price, non-positive size,
  leverage), 300000 for values outside the contract (price not a tick
  multiple, price <= 0 or > maxPrice, size not a lot multiple or > maxOrderQty,
  leverage > maxLeverage). An unknown order id is a ``RejectError`` with
  HTTP 404 (code 100004, "order does not exist"); an order that is no longer
  active gives 100004 with HTTP 400.

Order ids and trade ids are 24 lowercase hex characters like the venue's
ObjectIds: 8 hex of ``now_ns`` seconds, 6 hex from ``(id_seed, symbol)``, 10
hex of a counter; unique per engine and deterministic given the inputs.
Done orders are kept for lookups up to ``max_done_orders``, oldest forgotten
first.
"""

from __future__ import annotations

import hashlib
import re
from bisect import insort
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from services.sandbox.contracts import Contract, format_price
from services.sandbox.positions import Position

__all__ = [
    "CANNOT_CANCEL",
    "DUPLICATE_CLIENT_OID",
    "ILLEGAL_PARAMETER",
    "INVALID_PARAMETER",
    "TOO_MANY_ACTIVE",
    "EngineOrder",
    "MatchingEngine",
    "Message",
    "OrderRequest",
    "RejectError",
    "duplicate_client_oid",
]

Message = dict[str, Any]
"""One level3v2 envelope, ready for ``json.dumps``."""

INVALID_PARAMETER = "400100"
ILLEGAL_PARAMETER = "300000"
TOO_MANY_ACTIVE = "300001"
DUPLICATE_CLIENT_OID = "300018"
CANNOT_CANCEL = "100004"

_CLIENT_OID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_MAX_REMARK = 100
_BUY = 0
_SELL = 1
_SIDE_INDEX = {"buy": _BUY, "sell": _SELL}
_EIGHT_DP = Decimal("1e-8")
_ZERO = Decimal(0)


#: Fills kept per user and contract for ``/api/v1/fills`` and ``/api/v1/recentFills``.
FILLS_KEPT: Final = 1000
_FEE_PLACES: Final = Decimal("1e-12")


class RejectError(Exception):
    """The engine refused a request; nothing was emitted and nothing changed.

    ``code`` is the KuMEX error code, ``msg`` the text for the REST body and
    ``http_status`` the HTTP status the server should answer with.
    """

    def __init__(self, code: str, msg: str, http_status: int = 400) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status


@dataclass(slots=True)
class OrderRequest:
    """An order as the REST layer received it (types already parsed)."""

    user_id: str
    client_oid: str
    side: str
    type: str = "limit"
    price: Decimal | None = None
    size: int = 0
    time_in_force: str = "GTC"
    post_only: bool = False
    hidden: bool = False
    iceberg: bool = False
    visible_size: int | None = None
    reduce_only: bool = False
    close_order: bool = False
    leverage: str | Decimal = "1"
    remark: str | None = None


def duplicate_client_oid(client_oid: str) -> RejectError:
    """The refusal of an order whose clientOid an active order of the user has (300018)."""
    return RejectError(DUPLICATE_CLIENT_OID,
                       f"an active order with clientOid {client_oid} already exists")


def _fmt_value(value: Decimal, inverse: bool) -> str:
    if inverse:
        return f"{value.quantize(_EIGHT_DP):f}"
    if not value:
        return "0"
    return f"{value.normalize():f}"


@dataclass(slots=True, eq=False)
class EngineOrder:
    """One order known to the engine (resting, or done and still remembered)."""

    id: str
    client_oid: str
    user_id: str
    symbol: str
    side: str
    type: str
    price: Decimal | None
    size: int
    filled_size: int
    filled_value: Decimal
    status: str
    is_active: bool
    cancel_exist: bool
    done_reason: str | None
    created_at: int
    updated_at: int
    order_time: int
    time_in_force: str
    post_only: bool
    hidden: bool
    iceberg: bool
    visible_size: int | None
    leverage: str
    remark: str | None
    reduce_only: bool
    close_order: bool
    settle_currency: str = ""
    is_inverse: bool = False
    multiplier: Decimal = field(default=Decimal(1))
    price_ticks: int = 0
    ts: int = 0
    """``ts`` of the order's ``open`` (its queue priority); 0 until it rests."""
    end_at: int | None = None

    @property
    def remaining_size(self) -> int:
        """Size still resting (or still to fill): ``size - filled_size``."""
        return self.size - self.filled_size

    def _value_of(self, size: int) -> Decimal:
        if self.price is None:
            return self.filled_value
        if self.is_inverse:
            return Decimal(size) / self.price
        return Decimal(size) * abs(self.multiplier) * self.price

    def to_api(self) -> dict[str, Any]:
        """The order as ``GET /api/v1/orders/{orderId}`` returns it (kumex-api.md §6)."""
        inverse = self.is_inverse
        filled_value = _fmt_value(self.filled_value, inverse)
        return {
            "id": self.id,
            "symbol": self.symbol,
            "type": self.type,
            "side": self.side,
            "price": None if self.price is None else f"{self.price:f}",
            "size": self.size,
            "value": _fmt_value(self._value_of(self.size), inverse),
            "dealValue": filled_value,
            "dealSize": self.filled_size,
            "stp": "",
            "stop": "",
            "stopPriceType": "",
            "stopTriggered": False,
            "stopPrice": None,
            "timeInForce": self.time_in_force,
            "postOnly": self.post_only,
            "hidden": self.hidden,
            "iceberg": self.iceberg,
            "leverage": self.leverage,
            "forceHold": False,
            "closeOrder": self.close_order,
            "visibleSize": self.visible_size,
            "clientOid": self.client_oid,
            "remark": self.remark,
            "tags": None,
            "isActive": self.is_active,
            "cancelExist": self.cancel_exist,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "endAt": self.end_at,
            "orderTime": self.order_time,
            "settleCurrency": self.settle_currency,
            "status": self.status,
            "filledValue": filled_value,
            "filledSize": self.filled_size,
            "reduceOnly": self.reduce_only,
        }


class _Level:
    """One price: visible orders first, then hidden ones, each FIFO by arrival."""

    __slots__ = ("hidden", "price", "text", "ticks", "visible")

    def __init__(self, ticks: int, price: Decimal, text: str) -> None:
        self.ticks = ticks
        self.price = price
        self.text = text
        self.visible: dict[str, EngineOrder] = {}
        self.hidden: dict[str, EngineOrder] = {}


def _id_part(id_seed: int, symbol: str, kind: str) -> int:
    digest = hashlib.sha256(f"{id_seed}:{symbol}:{kind}".encode()).digest()
    return int.from_bytes(digest[:3], "big")


class MatchingEngine:
    """Price-time priority matching for one contract, emitting level3v2 messages.

    ``sequence`` is the sequence of the last emitted message (``start_sequence``
    before any). Every public mutator either raises :class:`RejectError` with
    nothing changed, or applies the change and returns its messages.
    """

    def __init__(
        self,
        contract: Contract,
        *,
        id_seed: int = 0,
        start_sequence: int = 0,
        max_active_per_user: int = 100,
        max_done_orders: int = 50_000,
        fills_of: Collection[str] = (),
    ) -> None:
        self.contract = contract
        self.symbol = contract.symbol
        self.sequence = start_sequence
        self.max_active_per_user = max_active_per_user
        self.max_done_orders = max_done_orders
        self._topic = f"/contractMarket/level3v2:{contract.symbol}"
        self._tick = contract.tick_size
        self._multiplier = abs(contract.multiplier)
        self._inverse = contract.is_inverse
        self._last_ts = 0
        self._order_part = _id_part(id_seed, contract.symbol, "order")
        self._trade_part = _id_part(id_seed, contract.symbol, "trade")
        self._order_counter = 0
        self._trade_counter = 0
        # Per side: price ticks -> level, and sort keys (ticks for bids, -ticks
        # for asks) ascending, so that the best level is always keys[-1].
        self._levels: tuple[dict[int, _Level], dict[int, _Level]] = ({}, {})
        self._keys: tuple[list[int], list[int]] = ([], [])
        self._resting_count = [0, 0]
        self._resting_size = [0, 0]
        self._orders: dict[str, EngineOrder] = {}
        self._user_orders: dict[str, dict[str, EngineOrder]] = {}
        self._user_active: dict[str, dict[str, EngineOrder]] = {}
        self._by_client_oid: dict[tuple[str, str], EngineOrder] = {}
        self._done: deque[str] = deque()
        #: The fills of the users in ``fills_of`` (the API keys' users, not the synthetic
        #: flow's), newest last, :data:`FILLS_KEPT` a user.
        self.fills: dict[str, deque[dict[str, Any]]] = {u: deque(maxlen=FILLS_KEPT)
                                                        for u in fills_of}
        #: Their positions, from every fill (services.sandbox.positions).
        self.positions: dict[str, Position] = {}
        #: Their orders' changes for the private channel, oldest first: (user, ``data`` of
        #: an ``orderChange``); the exchange takes them after every action (:meth:`take_private`).
        self.private: list[tuple[str, dict[str, Any]]] = []

    # ------------------------------------------------------------------ ids, ts

    def _next_ts(self, now_ns: int) -> int:
        ts = now_ns if now_ns > self._last_ts else self._last_ts + 1
        self._last_ts = ts
        return ts

    def _new_order_id(self, now_ns: int) -> str:
        self._order_counter += 1
        secs = (now_ns // 1_000_000_000) & 0xFFFFFFFF
        return f"{secs:08x}{self._order_part:06x}{self._order_counter & 0xFFFFFFFFFF:010x}"

    def _new_trade_id(self, now_ns: int) -> str:
        self._trade_counter += 1
        secs = (now_ns // 1_000_000_000) & 0xFFFFFFFF
        return f"{secs:08x}{self._trade_part:06x}{self._trade_counter & 0xFFFFFFFFFF:010x}"

    # ------------------------------------------------------------------ messages

    def _envelope(self, subject: str, data: dict[str, Any]) -> Message:
        return {"type": "message", "topic": self._topic, "subject": subject, "data": data}

    def _msg_received(self, order: EngineOrder, now_ns: int) -> Message:
        self.sequence += 1
        ts = self._next_ts(now_ns)
        order.order_time = ts
        return self._envelope(
            "received",
            {
                "symbol": self.symbol,
                "sequence": self.sequence,
                "orderId": order.id,
                "clientOid": order.client_oid,
                "ts": ts,
            },
        )

    def _msg_open(self, order: EngineOrder, text: str, ts: int) -> Message:
        self.sequence += 1
        return self._envelope(
            "open",
            {
                "symbol": self.symbol,
                "sequence": self.sequence,
                "side": order.side,
                "orderTime": order.order_time,
                "size": str(order.size - order.filled_size),
                "orderId": order.id,
                "price": text,
                "ts": ts,
            },
        )

    def _msg_update(self, order: EngineOrder, now_ns: int) -> Message:
        self.sequence += 1
        return self._envelope(
            "update",
            {
                "symbol": self.symbol,
                "sequence": self.sequence,
                "orderId": order.id,
                "size": str(order.size - order.filled_size),
                "ts": self._next_ts(now_ns),
            },
        )

    def _msg_match(
        self, taker: EngineOrder, maker: EngineOrder, text: str, size: int, now_ns: int
    ) -> Message:
        self.sequence += 1
        return self._envelope(
            "match",
            {
                "symbol": self.symbol,
                "sequence": self.sequence,
                "side": taker.side,
                "price": text,
                "size": str(size),
                "makerOrderId": maker.id,
                "takerOrderId": taker.id,
                "tradeId": self._new_trade_id(now_ns),
                "ts": self._next_ts(now_ns),
            },
        )

    def _msg_done(self, order: EngineOrder, reason: str, now_ns: int) -> Message:
        self.sequence += 1
        return self._envelope(
            "done",
            {
                "symbol": self.symbol,
                "reason": reason,
                "sequence": self.sequence,
                "orderId": order.id,
                "ts": self._next_ts(now_ns),
            },
        )

    def _private(self, order: EngineOrder, kind: str, status: str, ts: int,
                 **extra: Any) -> None:
        """One change of ``order`` as the private channel tells its owner (docs/protocol.md §8):
        kept only for the users whose fills are kept (the API keys' users)."""
        if order.user_id not in self.fills:
            return
        data: dict[str, Any] = {
            "orderId": order.id, "symbol": self.symbol, "type": kind, "status": status,
            "orderType": order.type, "side": order.side,
            "price": "" if order.price is None else format_price(self.contract, order.price),
            "size": str(order.size),
            "remainSize": str(order.size - order.filled_size if order.is_active else 0),
            "filledSize": str(order.filled_size), "canceledSize": "0",
            "clientOid": order.client_oid, "orderTime": order.order_time, "ts": ts,
        }
        data.update(extra)
        self.private.append((order.user_id, data))

    def take_private(self) -> list[tuple[str, dict[str, Any]]]:
        """The private changes made since the last call, oldest first (and forget them)."""
        out, self.private = self.private, []
        return out

    def _end(self, order: EngineOrder, reason: str, now_ns: int) -> Message:
        """Finish ``order`` (:meth:`_finish`): its ``done``, and the owner's change."""
        self._finish(order, reason, now_ns)
        left = order.size - order.filled_size
        msg = self._msg_done(order, reason, now_ns)
        if reason == "canceled":
            self._private(order, "canceled", "done", msg["data"]["ts"], canceledSize=str(left))
        else:
            self._private(order, "filled", "done", msg["data"]["ts"])
        return msg

    # ------------------------------------------------------------------ validation

    def validate(self, req: OrderRequest) -> tuple[Decimal | None, int, str]:
        """Check ``req`` itself (not the book, not the user's other orders): return (price,
        price ticks, leverage text) or raise, as :meth:`place` would."""
        c = self.contract
        if req.side not in _SIDE_INDEX:
            raise RejectError(INVALID_PARAMETER, f"side must be buy or sell, not {req.side!r}")
        if req.type not in ("limit", "market"):
            raise RejectError(INVALID_PARAMETER, f"type must be limit or market, not {req.type!r}")
        if req.time_in_force not in ("GTC", "IOC"):
            raise RejectError(
                INVALID_PARAMETER, f"timeInForce must be GTC or IOC, not {req.time_in_force!r}"
            )
        if not isinstance(req.client_oid, str) or not _CLIENT_OID.fullmatch(req.client_oid):
            raise RejectError(
                INVALID_PARAMETER, "clientOid must be 1 to 40 characters of [A-Za-z0-9_-]"
            )
        if req.remark is not None and len(req.remark) > _MAX_REMARK:
            raise RejectError(INVALID_PARAMETER, f"remark longer than {_MAX_REMARK} characters")
        if req.iceberg:
            raise RejectError(
                INVALID_PARAMETER,
                "iceberg orders are not supported by the sandbox "
                "(use hidden for an invisible order)",
            )
        size = req.size
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise RejectError(INVALID_PARAMETER, "size must be a positive integer number of lots")
        if size > c.max_order_qty:
            raise RejectError(
                ILLEGAL_PARAMETER, f"size {size} exceeds maxOrderQty {c.max_order_qty}"
            )
        if size % c.lot_size:
            raise RejectError(
                ILLEGAL_PARAMETER, f"size {size} is not a multiple of lotSize {c.lot_size}"
            )
        try:
            leverage = Decimal(str(req.leverage))
        except (InvalidOperation, ValueError) as exc:
            raise RejectError(
                INVALID_PARAMETER, f"leverage {req.leverage!r} is not a number"
            ) from exc
        if not leverage.is_finite() or leverage <= 0:
            raise RejectError(INVALID_PARAMETER, f"leverage {req.leverage!r} must be positive")
        if leverage > c.max_leverage:
            raise RejectError(
                ILLEGAL_PARAMETER, f"leverage {req.leverage} exceeds maxLeverage {c.max_leverage}"
            )
        if req.type == "market":
            if req.post_only:
                raise RejectError(INVALID_PARAMETER, "postOnly is only valid for limit orders")
            if req.hidden:
                raise RejectError(INVALID_PARAMETER, "hidden is only valid for limit orders")
            return None, 0, str(req.leverage)
        if req.post_only and req.time_in_force == "IOC":
            raise RejectError(INVALID_PARAMETER, "postOnly cannot be combined with timeInForce IOC")
        price = req.price
        if price is None:
            raise RejectError(INVALID_PARAMETER, "price is required for limit orders")
        if not isinstance(price, Decimal):
            try:
                price = Decimal(str(price))
            except (InvalidOperation, ValueError) as exc:
                raise RejectError(INVALID_PARAMETER, f"price {price!r} is not a number") from exc
        if not price.is_finite():
            raise RejectError(INVALID_PARAMETER, f"price {price} is not a number")
        if price <= 0 or price > c.max_price:
            raise RejectError(
                ILLEGAL_PARAMETER, f"price {price} is out of range (0, {c.max_price}]"
            )
        if price % self._tick:
            raise RejectError(
                ILLEGAL_PARAMETER, f"price {price} is not a multiple of tickSize {c.tick_size}"
            )
        ticks = int(price / self._tick)
        return ticks * self._tick, ticks, str(req.leverage)

    # ------------------------------------------------------------------ order store

    def _store(self, order: EngineOrder) -> None:
        self._orders[order.id] = order
        self._user_orders.setdefault(order.user_id, {})[order.id] = order
        self._by_client_oid[(order.user_id, order.client_oid)] = order

    def _finish(self, order: EngineOrder, reason: str, now_ns: int) -> None:
        now_ms = now_ns // 1_000_000
        order.status = "done"
        order.is_active = False
        order.done_reason = reason
        if reason == "canceled":
            order.cancel_exist = True
        order.updated_at = now_ms
        order.end_at = now_ms
        active = self._user_active.get(order.user_id)
        if active is not None:
            active.pop(order.id, None)
        self._done.append(order.id)
        if len(self._done) > self.max_done_orders:
            self._forget(self._done.popleft())

    def _forget(self, order_id: str) -> None:
        order = self._orders.pop(order_id, None)
        if order is None:
            return
        user_orders = self._user_orders.get(order.user_id)
        if user_orders is not None:
            user_orders.pop(order_id, None)
            if not user_orders:
                del self._user_orders[order.user_id]
        key = (order.user_id, order.client_oid)
        if self._by_client_oid.get(key) is order:
            del self._by_client_oid[key]

    def _lookup(self, order_id: str, user_id: str | None = None) -> EngineOrder:
        order = self._orders.get(order_id)
        if order is None or (user_id is not None and order.user_id != user_id):
            raise RejectError(CANNOT_CANCEL, f"order {order_id} does not exist", http_status=404)
        return order

    # ------------------------------------------------------------------ book

    def _rest(self, order: EngineOrder, ts: int) -> None:
        side = _SIDE_INDEX[order.side]
        ticks = order.price_ticks
        levels = self._levels[side]
        level = levels.get(ticks)
        if level is None:
            price = ticks * self._tick
            level = _Level(ticks, price, format_price(self.contract, price))
            levels[ticks] = level
            insort(self._keys[side], ticks if side == _BUY else -ticks)
        order.ts = ts
        (level.hidden if order.hidden else level.visible)[order.id] = order
        self._resting_count[side] += 1
        self._resting_size[side] += order.size - order.filled_size
        self._user_active.setdefault(order.user_id, {})[order.id] = order

    def _unrest(self, order: EngineOrder) -> None:
        side = _SIDE_INDEX[order.side]
        ticks = order.price_ticks
        level = self._levels[side][ticks]
        del (level.hidden if order.hidden else level.visible)[order.id]
        self._resting_count[side] -= 1
        self._resting_size[side] -= order.size - order.filled_size
        if not level.visible and not level.hidden:
            self._drop_level(side, ticks)

    def _drop_level(self, side: int, ticks: int) -> None:
        del self._levels[side][ticks]
        keys = self._keys[side]
        key = ticks if side == _BUY else -ticks
        if keys[-1] == key:
            keys.pop()
        else:
            keys.remove(key)

    def _level_text(self, side: int, ticks: int) -> str:
        level = self._levels[side].get(ticks)
        if level is not None:
            return level.text
        return format_price(self.contract, ticks * self._tick)

    def _crosses(self, side: int, ticks: int) -> bool:
        """Would an order on ``side`` at ``ticks`` trade against any resting order?"""
        opp_keys = self._keys[1 - side]
        if not opp_keys:
            return False
        if side == _BUY:
            return -opp_keys[-1] <= ticks
        return opp_keys[-1] >= ticks

    def _match(
        self, taker: EngineOrder, limit: int | None, out: list[Message], now_ns: int
    ) -> None:
        side = _SIDE_INDEX[taker.side]
        opp = 1 - side
        keys = self._keys[opp]
        levels = self._levels[opp]
        now_ms = now_ns // 1_000_000
        remaining = taker.size - taker.filled_size
        inverse = self._inverse
        mult = self._multiplier
        while remaining and keys:
            key = keys[-1]
            ticks = key if opp == _BUY else -key
            if limit is not None and (ticks > limit if side == _BUY else ticks < limit):
                break
            level = levels[ticks]
            price = level.price
            for queue in (level.visible, level.hidden):
                while remaining and queue:
                    maker = next(iter(queue.values()))
                    maker_left = maker.size - maker.filled_size
                    fill = remaining if remaining < maker_left else maker_left
                    value = Decimal(fill) / price if inverse else Decimal(fill) * mult * price
                    maker.filled_size += fill
                    maker.filled_value += value
                    maker.updated_at = now_ms
                    taker.filled_size += fill
                    taker.filled_value += value
                    remaining -= fill
                    self._resting_size[opp] -= fill
                    match = self._msg_match(taker, maker, level.text, fill, now_ns)
                    out.append(match)
                    if self.fills:
                        data = match["data"]
                        for who, status, liquidity in ((taker, "match", "taker"),
                                                       (maker, "open", "maker")):
                            self._private(who, "match", status, data["ts"], matchSize=str(fill),
                                          matchPrice=level.text, tradeId=data["tradeId"],
                                          liquidity=liquidity)
                    if self.fills:
                        self._record_fill(taker, "taker", match["data"], fill, price, value)
                        self._record_fill(maker, "maker", match["data"], fill, price, value)
                    if fill == maker_left:
                        del queue[maker.id]
                        self._resting_count[opp] -= 1
                        out.append(self._end(maker, "filled", now_ns))
            if not level.visible and not level.hidden:
                del levels[ticks]
                keys.pop()
        taker.updated_at = now_ms

    def _record_fill(self, order: EngineOrder, liquidity: str, match: dict[str, Any], size: int,
                     price: Decimal, value: Decimal) -> None:
        """One fill of ``order`` as ``GET /api/v1/fills`` shows it (docs.kumex.com, "Get
        Fills"), if its user is one whose fills are kept."""
        fills = self.fills.get(order.user_id)
        if fills is None:
            return
        contract = self.contract
        rate = contract.taker_fee_rate if liquidity == "taker" else contract.maker_fee_rate
        position = self.positions.get(order.user_id)
        if position is None:
            position = self.positions[order.user_id] = self.position_of(order.user_id)
        position.fill(order.side, size, price, value * rate, match["ts"] // 1_000_000)
        fills.append({
            "symbol": self.symbol, "tradeId": match["tradeId"], "orderId": order.id,
            "side": order.side, "liquidity": liquidity, "price": match["price"], "size": size,
            "value": _fmt_value(value, self._inverse), "feeRate": str(rate), "fixFee": "0",
            "feeCurrency": contract.settle_currency, "stop": "",
            # Fees are fractions of a value: shown to 12 places, as the venue's are.
            "fee": f"{(value * rate).quantize(_FEE_PLACES).normalize():f}",
            "orderType": order.type,
            "tradeType": "trade", "createdAt": order.created_at,
            "settleCurrency": contract.settle_currency, "tradeTime": match["ts"],
        })

    # ------------------------------------------------------------------ public API

    def position_of(self, user_id: str) -> Position:
        """``user_id``'s position in this contract (a flat one if it never traded here)."""
        held = self.positions.get(user_id)
        if held is not None:
            return held
        return Position(self.symbol, self._inverse, self._multiplier,
                        self.contract.settle_currency)

    def new_order_id(self, now_ns: int) -> str:
        """A fresh orderId of this contract (one :meth:`place` would draw itself)."""
        return self._new_order_id(now_ns)

    def check(self, req: OrderRequest, *, resting: bool = True
              ) -> tuple[Decimal | None, int, str]:
        """Every check :meth:`place` makes, nothing placed: :meth:`validate`, then an
        active order of the user with the clientOid (300018), then (unless ``resting``
        is False: a stop order, not an order yet) the user's open-order limit (300001).
        Returns what :meth:`validate` does, or raises :class:`RejectError`."""
        price, ticks, leverage = self.validate(req)
        active = self._user_active.get(req.user_id)
        if active:
            existing = self._by_client_oid.get((req.user_id, req.client_oid))
            if existing is not None and existing.is_active:
                raise duplicate_client_oid(req.client_oid)
            if (resting and req.type == "limit" and req.time_in_force == "GTC"
                    and len(active) >= self.max_active_per_user):
                raise RejectError(
                    TOO_MANY_ACTIVE,
                    f"too many active orders: at most {self.max_active_per_user} open "
                    "limit orders per contract",
                )
        return price, ticks, leverage

    def place(self, req: OrderRequest, now_ns: int, *, order_id: str | None = None
              ) -> tuple[EngineOrder, list[Message]]:
        """Accept, match and rest (or finish) an order; return it and its messages.

        ``order_id``: the id it gets (one drawn earlier by :meth:`new_order_id`, e.g.
        a stop order's, which keeps its id when triggered); a fresh one by default.
        Raises :class:`RejectError` (nothing emitted) when the request breaks a rule
        (:meth:`check`).
        """
        price, ticks, leverage = self.check(req)
        is_limit = req.type == "limit"
        now_ms = now_ns // 1_000_000
        order = EngineOrder(
            id=order_id if order_id is not None else self._new_order_id(now_ns),
            client_oid=req.client_oid,
            user_id=req.user_id,
            symbol=self.symbol,
            side=req.side,
            type=req.type,
            price=price,
            size=req.size,
            filled_size=0,
            filled_value=_ZERO,
            status="open",
            is_active=True,
            cancel_exist=False,
            done_reason=None,
            created_at=now_ms,
            updated_at=now_ms,
            order_time=now_ns,
            time_in_force=req.time_in_force,
            post_only=req.post_only,
            hidden=req.hidden,
            iceberg=req.iceberg,
            visible_size=req.visible_size,
            leverage=leverage,
            remark=req.remark,
            reduce_only=req.reduce_only,
            close_order=req.close_order,
            settle_currency=self.contract.settle_currency,
            is_inverse=self._inverse,
            multiplier=self.contract.multiplier,
            price_ticks=ticks,
        )
        self._store(order)
        out = [self._msg_received(order, now_ns)]
        side = _SIDE_INDEX[req.side]
        if req.post_only and self._crosses(side, ticks):
            out.append(self._end(order, "canceled", now_ns))
            return order, out
        self._match(order, ticks if is_limit else None, out, now_ns)
        if order.filled_size == order.size:
            out.append(self._end(order, "filled", now_ns))
        elif is_limit and req.time_in_force == "GTC":
            ts = self._next_ts(now_ns)
            if not order.hidden:
                out.append(self._msg_open(order, self._level_text(side, ticks), ts))
            self._rest(order, ts)
            self._private(order, "open", "open", ts)
        else:
            out.append(self._end(order, "canceled", now_ns))
        return order, out

    def cancel(self, order_id: str, now_ns: int, user_id: str | None = None) -> list[Message]:
        """Cancel a resting order (of ``user_id`` when given): its ``done`` canceled.

        Unknown id (or another user's order): RejectError 100004 with HTTP 404;
        an order that is no longer active: RejectError 100004 with HTTP 400.
        """
        order = self._lookup(order_id, user_id)
        if not order.is_active:
            raise RejectError(
                CANNOT_CANCEL, f"order {order_id} cannot be canceled: it is {order.done_reason}"
            )
        self._unrest(order)
        return [self._end(order, "canceled", now_ns)]

    def cancel_by_client_oid(
        self, user_id: str, client_oid: str, now_ns: int
    ) -> tuple[EngineOrder, list[Message]]:
        """Cancel the latest order of ``user_id`` with ``client_oid`` (errors as :meth:`cancel`)."""
        order = self._by_client_oid.get((user_id, client_oid))
        if order is None:
            raise RejectError(
                CANNOT_CANCEL, f"order with clientOid {client_oid} does not exist", http_status=404
            )
        return order, self.cancel(order.id, now_ns, user_id)

    def cancel_all(self, user_id: str, now_ns: int) -> tuple[list[str], list[Message]]:
        """Cancel every open limit order of ``user_id``; return their ids and the messages."""
        ids = list(self._user_active.get(user_id, {}))
        out: list[Message] = []
        for order_id in ids:
            out.extend(self.cancel(order_id, now_ns))
        return ids, out

    def amend_size(self, order_id: str, new_size: int, now_ns: int) -> list[Message]:
        """Reduce a resting order's remaining size to ``new_size`` (``update``).

        ``new_size`` is the new resting size, as the ``update`` message carries
        it: 1 <= new_size < remaining size, else RejectError 400100. A hidden
        order is amended silently (no message).
        """
        order = self._lookup(order_id)
        if not order.is_active:
            raise RejectError(
                CANNOT_CANCEL, f"order {order_id} cannot be amended: it is {order.done_reason}"
            )
        left = order.size - order.filled_size
        if not isinstance(new_size, int) or isinstance(new_size, bool) or not 0 < new_size < left:
            raise RejectError(
                INVALID_PARAMETER, f"new size must be between 1 and {left - 1}, not {new_size!r}"
            )
        self._resting_size[_SIDE_INDEX[order.side]] -= left - new_size
        old_size = order.size
        order.size = order.filled_size + new_size
        order.updated_at = now_ns // 1_000_000
        out = [] if order.hidden else [self._msg_update(order, now_ns)]
        if self.fills:
            ts = out[0]["data"]["ts"] if out else self._next_ts(now_ns)
            self._private(order, "update", "open", ts, oldSize=str(old_size),
                          canceledSize=str(left - new_size))
        return out

    def get_order(self, order_id: str) -> EngineOrder | None:
        """The order with ``order_id``, or None (never seen, or forgotten)."""
        return self._orders.get(order_id)

    def get_by_client_oid(self, user_id: str, client_oid: str) -> EngineOrder | None:
        """The latest order of ``user_id`` with ``client_oid``, or None."""
        return self._by_client_oid.get((user_id, client_oid))

    def active_orders(self, user_id: str) -> list[EngineOrder]:
        """Resting orders of ``user_id``, oldest first."""
        return list(self._user_active.get(user_id, {}).values())

    def active_count(self, user_id: str) -> int:
        """Number of resting orders of ``user_id``."""
        active = self._user_active.get(user_id)
        return len(active) if active else 0

    def all_orders(self, user_id: str) -> list[EngineOrder]:
        """Every remembered order of ``user_id`` (active and done), oldest first."""
        return list(self._user_orders.get(user_id, {}).values())

    def resting_count(self, side: str | None = None) -> int:
        """Resting orders (hidden included) on ``side``, or on both sides."""
        if side is None:
            return self._resting_count[0] + self._resting_count[1]
        return self._resting_count[_SIDE_INDEX[side]]

    def resting_size(self, side: str) -> int:
        """Total resting size (hidden included) on ``side``."""
        return self._resting_size[_SIDE_INDEX[side]]

    def _visible_levels(self, side: int) -> list[_Level]:
        levels = self._levels[side]
        sign = 1 if side == _BUY else -1
        out = []
        for key in reversed(self._keys[side]):
            level = levels[key * sign]
            if level.visible:
                out.append(level)
        return out

    def snapshot(self, now_ns: int) -> dict[str, Any]:
        """The ``data`` of ``GET /api/v2/level3/snapshot``: visible orders, best first."""

        def rows(side: int) -> list[list[Any]]:
            return [
                [o.id, level.text, str(o.size - o.filled_size), o.ts]
                for level in self._visible_levels(side)
                for o in level.visible.values()
            ]

        return {
            "symbol": self.symbol,
            "sequence": self.sequence,
            "ts": now_ns,
            "asks": rows(_SELL),
            "bids": rows(_BUY),
        }

    def book_l3(self) -> dict[str, Any]:
        """The visible book as ``{"sequence", "bids", "asks"}``, best level first.

        Each level is ``(price_text, [(orderId, size, ts), ...])`` in queue order.
        """

        def side_levels(side: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
            return [
                (level.text, [(o.id, o.size - o.filled_size, o.ts) for o in level.visible.values()])
                for level in self._visible_levels(side)
            ]

        return {"sequence": self.sequence, "bids": side_levels(_BUY), "asks": side_levels(_SELL)}

    def _best_visible(self, side: int) -> Decimal | None:
        levels = self._levels[side]
        sign = 1 if side == _BUY else -1
        for key in reversed(self._keys[side]):
            level = levels[key * sign]
            if level.visible:
                return level.price
        return None

    def best_bid(self) -> Decimal | None:
        """Best visible bid price."""
        return self._best_visible(_BUY)

    def best_ask(self) -> Decimal | None:
        """Best visible ask price."""
        return self._best_visible(_SELL)

    def best_ticks(self, side: str) -> int | None:
        """Best price on ``side`` in ticks, hidden orders included (what would match)."""
        s = _SIDE_INDEX[side]
        keys = self._keys[s]
        if not keys:
            return None
        return keys[-1] if s == _BUY else -keys[-1]

    def mid(self) -> Decimal | None:
        """Midpoint of the visible best bid and ask, or None when a side is empty."""
        bid = self.best_bid()
        ask = self.best_ask()
        if bid is None or ask is None:
            return None
        return (bid + ask) / 2
