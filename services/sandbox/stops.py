"""Stop orders of one contract, held off the book until the last trade reaches them. Pure.

A stop order (``POST /api/v1/orders`` with ``stop``, ``stopPrice`` and
``stopPriceType``) waits in a :class:`StopBook`, not in the matching engine:
it is not in the book, not on the L3 feed, and listed by
``GET /api/v1/stopOrders``. Its trigger is the last trade price (``TP``):

* ``down`` fires when a trade's price is at or below ``stopPrice``;
* ``up`` fires when a trade's price is at or above ``stopPrice``.

:meth:`StopBook.fire` takes one trade price and hands out every stop it
reaches, in the order they were created (they fire "at once": the older
goes first, as in a queue). The caller places each through the engine with
the orderId drawn at creation, from then on an ordinary order; a stop the
engine refuses then is finished as canceled (:meth:`StopBook.refused`).

``MP`` (mark price) and ``IP`` (index price) triggers are refused: the
sandbox's mark is its own mid and it has no index, so a trigger on them
would teach a client nothing true about the venue.

Limits as the venue's: at most :data:`MAX_STOPS_PER_CONTRACT` untriggered stop
orders per account and contract (300001); an untriggered stop's clientOid is
as taken as an active order's (300018, checked by the caller across both).
Finished stops (triggered or canceled) are remembered for lookups, the
oldest forgotten first past ``max_done``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from services.sandbox.contracts import Contract, format_price
from services.sandbox.engine import (
    CANNOT_CANCEL,
    ILLEGAL_PARAMETER,
    TOO_MANY_ACTIVE,
    OrderRequest,
    RejectError,
    duplicate_client_oid,
)

__all__ = [
    "MAX_STOPS_PER_CONTRACT",
    "STOP_DIRECTIONS",
    "STOP_PRICE_TYPES",
    "StopBook",
    "StopOrder",
    "StopSpec",
    "new_stop",
    "stop_ticks",
]

#: Untriggered stop orders an account may hold per contract (the venue's limit).
MAX_STOPS_PER_CONTRACT: Final = 50
#: ``stop`` values: the side of the stop price the last trade must reach.
STOP_DIRECTIONS: Final = ("down", "up")
#: ``stopPriceType`` values of the venue, and what each triggers on.
STOP_PRICE_TYPES: Final = {"TP": "last trade price", "MP": "mark price", "IP": "index price"}

_OPEN: Final = "open"
_TRIGGERED: Final = "triggered"
_CANCELED: Final = "canceled"
# Above every real sequence number: a bisect key after all entries at one price.
_LAST: Final = 1 << 62


@dataclass(frozen=True, slots=True)
class StopSpec:
    """The stop fields of an order request, their format checked."""

    stop: str
    stop_price: Decimal
    stop_price_type: str = "TP"


def stop_ticks(contract: Contract, spec: StopSpec) -> int:
    """``spec``'s stop price in ticks of ``contract``, or :class:`RejectError` 300000 when
    it is outside the contract (as an order price would be)."""
    price = spec.stop_price
    if price <= 0 or price > contract.max_price:
        raise RejectError(
            ILLEGAL_PARAMETER, f"stopPrice {price} is out of range (0, {contract.max_price}]"
        )
    if price % contract.tick_size:
        raise RejectError(
            ILLEGAL_PARAMETER,
            f"stopPrice {price} is not a multiple of tickSize {contract.tick_size}",
        )
    return int(price / contract.tick_size)


@dataclass(slots=True, eq=False)
class StopOrder:
    """One stop order: its request (placed as is when it fires) and its stop.

    ``status``: ``open`` (waiting), ``triggered`` (placed through the engine:
    the engine's record is the order's from then on) or ``canceled`` (before
    it fired, or refused by the engine when it fired: ``triggered`` tells).
    """

    id: str
    request: OrderRequest
    symbol: str
    settle_currency: str
    price: Decimal | None
    """The limit price as the engine checked it (None for a market order)."""
    leverage: str
    stop: str
    stop_price: Decimal
    ticks: int
    stop_price_type: str
    stop_price_text: str
    created_at: int
    updated_at: int
    seq: int = 0
    status: str = _OPEN
    triggered: bool = False
    end_at: int | None = None
    reason: str | None = None
    """Why a triggered stop was canceled (the engine's refusal)."""

    @property
    def user_id(self) -> str:
        """The account that placed it."""
        return self.request.user_id

    @property
    def client_oid(self) -> str:
        """Its clientOid."""
        return self.request.client_oid

    @property
    def side(self) -> str:
        """``buy`` or ``sell``."""
        return self.request.side

    @property
    def type(self) -> str:
        """``limit`` or ``market``."""
        return self.request.type

    @property
    def is_open(self) -> bool:
        """Waiting for its trigger."""
        return self.status == _OPEN

    @property
    def is_active(self) -> bool:
        """As the API's ``isActive``: waiting (a placed stop's record is the engine's)."""
        return self.is_open

    @property
    def placed(self) -> bool:
        """Fired and accepted by the engine (its record is the engine's)."""
        return self.status == _TRIGGERED

    def reached_by(self, ticks: int) -> bool:
        """Whether a trade at ``ticks`` reaches this stop."""
        return ticks <= self.ticks if self.stop == "down" else ticks >= self.ticks

    def stop_fields(self) -> dict[str, Any]:
        """The stop part of the order's record (``GET /api/v1/orders/{orderId}``)."""
        return {"stop": self.stop, "stopPrice": self.stop_price_text,
                "stopPriceType": self.stop_price_type, "stopTriggered": self.triggered}

    def to_api(self) -> dict[str, Any]:
        """The order as ``GET /api/v1/orders/{orderId}`` and ``GET /api/v1/stopOrders``
        show a stop order that is not in the engine (waiting, or canceled): the fields
        of an ordinary order, nothing dealt, no ``orderTime`` yet (docs.kumex.com, "Get
        Untriggered Stop Order List")."""
        req = self.request
        return {
            "id": self.id,
            "symbol": self.symbol,
            "type": req.type,
            "side": req.side,
            "price": None if self.price is None else f"{self.price:f}",
            "size": req.size,
            "value": "0",
            "dealValue": "0",
            "dealSize": 0,
            "stp": "",
            **self.stop_fields(),
            "timeInForce": req.time_in_force,
            "postOnly": req.post_only,
            "hidden": req.hidden,
            "iceberg": req.iceberg,
            "leverage": self.leverage,
            "forceHold": False,
            "closeOrder": req.close_order,
            "visibleSize": req.visible_size,
            "clientOid": req.client_oid,
            "remark": req.remark,
            "tags": None,
            "isActive": self.is_active,
            "cancelExist": self.status == _CANCELED,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "endAt": self.end_at,
            "orderTime": None,
            "settleCurrency": self.settle_currency,
            "status": "open" if self.is_open else "done",
            "filledValue": "0",
            "filledSize": 0,
            "reduceOnly": req.reduce_only,
        }


def new_stop(order_id: str, request: OrderRequest, contract: Contract, spec: StopSpec,
             price: Decimal | None, leverage: str, now_ms: int) -> StopOrder:
    """A waiting stop order of ``contract`` (``price``, ``leverage``: as the engine
    checked them; the stop price is checked here, :func:`stop_ticks`)."""
    ticks = stop_ticks(contract, spec)
    return StopOrder(
        id=order_id, request=request, symbol=contract.symbol,
        settle_currency=contract.settle_currency, price=price, leverage=leverage,
        stop=spec.stop, stop_price=ticks * contract.tick_size, ticks=ticks,
        stop_price_type=spec.stop_price_type,
        stop_price_text=format_price(contract, ticks * contract.tick_size),
        created_at=now_ms, updated_at=now_ms)


_Key = tuple[int, int, str]


class StopBook:
    """The stop orders of one contract: waiting ones by trigger price, finished ones kept.

    Waiting ``down`` stops sit in ascending (ticks, seq) order and fire from the
    top (a trade at or below the highest first reaches it); ``up`` stops
    likewise and fire from the bottom. ``len(book)`` is the number waiting.
    """

    def __init__(self, symbol: str, *, max_per_user: int = MAX_STOPS_PER_CONTRACT,
                 max_done: int = 10_000) -> None:
        self.symbol = symbol
        self.max_per_user = max_per_user
        self.max_done = max_done
        self._seq = 0
        self._down: list[_Key] = []
        self._up: list[_Key] = []
        self._open: dict[str, StopOrder] = {}
        self._by_user: dict[str, dict[str, StopOrder]] = {}
        self._done: dict[str, StopOrder] = {}
        #: (user, clientOid) -> the latest remembered stop with it (lookups without a scan).
        self._done_by_coid: dict[tuple[str, str], StopOrder] = {}

    def __len__(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ changes

    def add(self, stop: StopOrder) -> None:
        """Hold ``stop`` until a trade reaches it.

        :class:`RejectError` 300001 when its account already holds
        ``max_per_user`` here, 300018 when one of them has its clientOid.
        """
        if stop.id in self._open or stop.id in self._done:
            raise ValueError(f"stop order {stop.id} is already known")
        self.admit(stop.user_id, stop.client_oid)
        self._seq += 1
        stop.seq = self._seq
        stop.status = _OPEN
        self._open[stop.id] = stop
        self._by_user.setdefault(stop.user_id, {})[stop.id] = stop
        insort(self._down if stop.stop == "down" else self._up, self._key(stop))

    def admit(self, user_id: str, client_oid: str, *, stop: bool = True) -> None:
        """:class:`RejectError` 300018 when a waiting stop of ``user_id`` has ``client_oid``;
        for a ``stop`` to add, 300001 when the account holds ``max_per_user`` here."""
        mine = self._by_user.get(user_id, {})
        if any(s.client_oid == client_oid for s in mine.values()):
            raise duplicate_client_oid(client_oid)
        if stop and len(mine) >= self.max_per_user:
            raise RejectError(
                TOO_MANY_ACTIVE,
                f"too many untriggered stop orders: at most {self.max_per_user} per contract",
            )

    def cancel(self, order_id: str, user_id: str, now_ms: int) -> StopOrder:
        """Cancel ``user_id``'s waiting stop ``order_id``.

        Unknown (or another account's): :class:`RejectError` 100004, HTTP 404;
        no longer waiting: 100004, HTTP 400.
        """
        stop = self.get(order_id)
        if stop is None or stop.user_id != user_id:
            raise RejectError(CANNOT_CANCEL, f"order {order_id} does not exist", http_status=404)
        if not stop.is_open:
            state = "triggered" if stop.triggered else "canceled"
            raise RejectError(CANNOT_CANCEL,
                              f"order {order_id} cannot be canceled: it is {state}")
        self._take(stop)
        stop.status = _CANCELED
        stop.updated_at = stop.end_at = now_ms
        self._remember(stop)
        return stop

    def cancel_all(self, user_id: str, now_ms: int) -> list[str]:
        """Cancel every waiting stop of ``user_id``; their ids, oldest first."""
        ids = list(self._by_user.get(user_id, {}))
        for order_id in ids:
            self.cancel(order_id, user_id, now_ms)
        return ids

    def fire(self, ticks: int, now_ms: int) -> list[StopOrder]:
        """The waiting stops a trade at ``ticks`` reaches, taken out in creation order
        and marked triggered; the caller places each (or calls :meth:`refused`)."""
        fired: list[StopOrder] = []
        down = self._down
        while down and down[-1][0] >= ticks:
            fired.append(self._open[down.pop()[2]])
        up = self._up
        reached = bisect_right(up, (ticks, _LAST, ""))
        if reached:
            fired.extend(self._open[key[2]] for key in up[:reached])
            del up[:reached]
        fired.sort(key=lambda s: s.seq)
        for stop in fired:
            del self._open[stop.id]
            self._drop_user(stop)
            stop.status = _TRIGGERED
            stop.triggered = True
            stop.updated_at = now_ms
            self._remember(stop)
        return fired

    def refused(self, stop: StopOrder, reason: str, now_ms: int) -> None:
        """A fired ``stop`` the engine refused: finished as canceled, ``reason`` kept."""
        stop.status = _CANCELED
        stop.reason = reason
        stop.updated_at = stop.end_at = now_ms

    # ------------------------------------------------------------------ lookups

    def get(self, order_id: str) -> StopOrder | None:
        """The stop ``order_id``, waiting or remembered, or None."""
        return self._open.get(order_id) or self._done.get(order_id)

    def by_client_oid(self, user_id: str, client_oid: str) -> StopOrder | None:
        """``user_id``'s waiting stop with ``client_oid``, else its latest finished one."""
        for stop in self._by_user.get(user_id, {}).values():
            if stop.client_oid == client_oid:
                return stop
        return self._done_by_coid.get((user_id, client_oid))

    def open_orders(self, user_id: str) -> list[StopOrder]:
        """``user_id``'s waiting stops, oldest first."""
        return list(self._by_user.get(user_id, {}).values())

    def finished(self, user_id: str) -> Iterator[StopOrder]:
        """``user_id``'s remembered stops that never became engine orders (canceled
        waiting, or refused when they fired), oldest first."""
        return (s for s in self._done.values()
                if s.user_id == user_id and s.status == _CANCELED)

    def check(self) -> None:
        """Assert the book's invariants (tests)."""
        keys = sorted(self._down + self._up)
        assert keys == sorted(self._key(s) for s in self._open.values())
        assert self._down == sorted(self._down) and self._up == sorted(self._up)
        assert all(self._open[k[2]].stop == "down" for k in self._down)
        assert all(self._open[k[2]].stop == "up" for k in self._up)
        users = {oid: s for mine in self._by_user.values() for oid, s in mine.items()}
        assert users == self._open and all(self._by_user.values())
        assert all(s.is_open for s in self._open.values())
        assert not any(s.is_open for s in self._done.values())
        latest = {(s.user_id, s.client_oid): s for s in self._done.values()}
        assert self._done_by_coid == latest
        assert len(self._done) <= self.max_done

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _key(stop: StopOrder) -> _Key:
        return (stop.ticks, stop.seq, stop.id)

    def _take(self, stop: StopOrder) -> None:
        keys = self._down if stop.stop == "down" else self._up
        key = self._key(stop)
        i = bisect_left(keys, key)
        assert keys[i] == key
        del keys[i]
        del self._open[stop.id]
        self._drop_user(stop)

    def _drop_user(self, stop: StopOrder) -> None:
        mine = self._by_user[stop.user_id]
        del mine[stop.id]
        if not mine:
            del self._by_user[stop.user_id]

    def _remember(self, stop: StopOrder) -> None:
        self._done[stop.id] = stop
        self._done_by_coid[(stop.user_id, stop.client_oid)] = stop
        while len(self._done) > self.max_done:
            old = self._done.pop(next(iter(self._done)))
            key = (old.user_id, old.client_oid)
            if self._done_by_coid.get(key) is old:
                del self._done_by_coid[key]
