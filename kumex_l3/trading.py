"""The strategy SDK: place and cancel orders, and learn their fate from the L3 stream.

:class:`Trader` ties the REST client (:mod:`kumex_l3.rest`) to the own-order
store (:mod:`kumex_l3.order_store`):

* :meth:`Trader.place_order` first registers the clientOid in Redis (a
  ``pending`` hash: the order monitor will recognise it on the stream, often
  before the REST reply), then sends it. An answered refusal marks it
  ``rejected``. A timeout (or any answer that leaves the outcome unknown)
  leaves it ``pending``: the order monitor resolves it from the stream, and
  :meth:`Trader.resolve_after_timeout` asks ``GET byClientOid`` before
  anything is sent again. A ``POST /orders`` is never blindly re-sent.
* :meth:`Trader.wait_for` and :meth:`Trader.follow` read the order-events
  stream (``XREAD BLOCK``) and the order's hash: no REST polling.

Errors: the :class:`~kumex_l3.errors.TradingError` branch of :mod:`kumex_l3.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal

import redis.asyncio as aioredis

from kumex_l3 import keys, order_store
from kumex_l3.errors import ClientOidInUse, TradingError, UnknownOrder
from kumex_l3.orders import Change, OrderStatus, OwnOrder, reconcile
from kumex_l3.rest import (
    ApiError,
    CannotCancel,
    DuplicateClientOid,
    ExchangeOrder,
    KumexRestClient,
    PlacedOrder,
    RestError,
)

__all__ = [
    "FINAL_STATUSES",
    "ClientOidInUse",
    "Resolution",
    "Trader",
    "TradingError",
    "UnknownOrder",
    "new_client_oid",
]

_log = logging.getLogger(__name__)

#: The statuses an order ends in.
FINAL_STATUSES: Final = frozenset(
    {OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.REJECTED})
_READ_COUNT: Final = 200
_MAX_BLOCK_MS: Final = 1000
_SAVE_ATTEMPTS: Final = 5


def new_client_oid() -> str:
    """A random clientOid (32 hex characters)."""
    return uuid.uuid4().hex


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _price_text(price: Decimal | str | int) -> str:
    return f"{price:f}" if isinstance(price, Decimal) else str(price)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What :meth:`Trader.resolve_after_timeout` found.

    ``outcome``: ``settled`` (the stream already told: ``order`` is not
    pending), ``found`` (the exchange has it; the hash was brought up to date),
    ``absent`` (the exchange does not know it; left ``pending`` for the order
    monitor) or ``resent`` (absent, and sent again with the same clientOid).
    """

    outcome: Literal["settled", "found", "absent", "resent"]
    order: OwnOrder | None
    exchange_order: ExchangeOrder | None = None
    placed: PlacedOrder | None = None


class Trader:
    """Places and cancels own orders, keeping their state in Redis (see the module docstring).

    ``redis``: a ``redis.asyncio`` client (bytes or decoded responses);
    ``rest``: a client with credentials. ``clock_ms`` stamps registrations.
    """

    def __init__(self, redis: aioredis.Redis, rest: KumexRestClient, *,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.redis = redis
        self.rest = rest
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)

    # ------------------------------------------------------------------ orders

    async def place_order(
        self,
        symbol: str,
        side: str,
        price: Decimal | str | None,
        size: int,
        *,
        leverage: int | str | Decimal,
        client_oid: str | None = None,
        order_type: str = "limit",
        time_in_force: str | None = None,
        post_only: bool | None = None,
        hidden: bool | None = None,
        reduce_only: bool | None = None,
        remark: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> PlacedOrder:
        """Register ``client_oid`` (random when None) as ``pending``, then send the order.

        Raises :class:`ClientOidInUse` (nothing sent) when it is registered
        already. When the exchange refuses (``error.refused``), the order is
        marked ``rejected`` and the error re-raised. When the outcome is
        unknown (timeout, broken connection, server error) the order stays
        ``pending`` and the error is re-raised: wait for the stream
        (:meth:`wait_for`) or call :meth:`resolve_after_timeout`; never send
        it again blindly.
        """
        coid = client_oid or new_client_oid()
        price_text = "" if price is None else _price_text(price)
        # Kept with the order so that resolve_after_timeout can send the same order again.
        fields = {"leverage": _price_text(leverage) if isinstance(leverage, Decimal)
                  else str(leverage), **(extra or {})}
        registered = await order_store.register(
            self.redis, symbol, coid, side=side, price=price_text, size=size,
            now_ms=self._clock_ms(), extra=fields)
        if not registered:
            raise ClientOidInUse(symbol, coid)
        try:
            placed = await self.rest.place_order(
                client_oid=coid, symbol=symbol, side=side, size=size, leverage=leverage,
                price=price, order_type=order_type, time_in_force=time_in_force,
                post_only=post_only, hidden=hidden, reduce_only=reduce_only, remark=remark)
        except DuplicateClientOid:
            # The exchange has an active order with this clientOid that Redis did not
            # know (lost state, or placed elsewhere): adopt its record, do not reject.
            record = await self.rest.get_order_by_client_oid(coid, symbol)
            if record is not None:
                await self.adopt(symbol, coid, record)
            raise
        except RestError as exc:
            if exc.refused:
                code = exc.code if isinstance(exc, ApiError) else "not-sent"
                msg = exc.msg if isinstance(exc, ApiError) else type(exc).__name__
                await order_store.mark_rejected(self.redis, symbol, coid, code=code, msg=msg,
                                                now_ms=self._clock_ms())
            else:
                _log.warning("order %s %s: outcome unknown (%s); left pending", symbol, coid,
                             type(exc).__name__)
            raise
        await self.confirm(symbol, coid, placed.order_id)
        return placed

    async def confirm(self, symbol: str, client_oid: str, order_id: str) -> None:
        """Our own REST reply named ``order_id``: link or confirm the hash; on a conflict
        (the stream linked it to another order), ask the exchange and relink it."""
        transition = await order_store.confirm_order_id(self.redis, symbol, client_oid,
                                                        order_id, now_ms=self._clock_ms())
        if transition is None or transition.change is not Change.CONFLICT:
            return
        _log.warning("order %s %s: the stream linked it to another order than our REST reply "
                     "named (%s): asking the exchange", symbol, client_oid, order_id)
        record = await self.rest.get_order_by_client_oid(client_oid, symbol)
        if record is not None:
            await self.adopt(symbol, client_oid, record)

    async def resolve_after_timeout(self, symbol: str, client_oid: str, *,
                                    resend: bool = False) -> Resolution:
        """After an unknown outcome: what became of ``client_oid``? Checks before any re-send.

        1. The hash no longer ``pending``: the stream told (``settled``).
        2. ``GET byClientOid``: the exchange has it: the hash adopts the
           exchange's record (``found``).
        3. Neither: ``absent``; with ``resend`` the same order is sent again
           under the same clientOid (``resent``). The clientOid stays the
           idempotency key: should the first request still arrive, the exchange
           refuses a second active order with it (300018).
        """
        order = await order_store.load(self.redis, symbol, client_oid)
        if order is None:
            raise UnknownOrder(symbol, client_oid)
        if order.status is not OrderStatus.PENDING:
            return Resolution("settled", order)
        record = await self.rest.get_order_by_client_oid(client_oid, symbol)
        if record is not None:
            order = await self.adopt(symbol, client_oid, record)
            return Resolution("found", order, exchange_order=record)
        if not resend:
            return Resolution("absent", order)
        leverage = order.extra.get("leverage") or "1"
        try:
            placed = await self.rest.place_order(
                client_oid=client_oid, symbol=symbol, side=order.side, size=int(order.size),
                leverage=leverage, price=order.price or None,
                order_type="limit" if order.price else "market")
        except RestError as exc:
            if exc.refused and not isinstance(exc, DuplicateClientOid):
                await order_store.mark_rejected(
                    self.redis, symbol, client_oid,
                    code=exc.code if isinstance(exc, ApiError) else "not-sent",
                    msg=exc.msg if isinstance(exc, ApiError) else type(exc).__name__,
                    now_ms=self._clock_ms())
            raise
        return Resolution("resent", await order_store.load(self.redis, symbol, client_oid),
                          placed=placed)

    async def adopt(self, symbol: str, client_oid: str,
                    record: ExchangeOrder) -> OwnOrder | None:
        """Bring the hash of ``client_oid`` up to date with the exchange's ``record``.

        The status and filled size only move forward; a change is written with
        its event (``reconciled``) like any other. None when no hash exists.
        """
        for _ in range(_SAVE_ATTEMPTS):
            order = await order_store.load(self.redis, symbol, client_oid)
            if order is None:
                return None
            transition = reconcile(order, record.raw, self._clock_ms())
            if not transition.changed:
                return order
            if await order_store.save_change(self.redis, order, transition, stream_id=None):
                return order
        return await order_store.load(self.redis, symbol, client_oid)

    async def cancel_order(self, symbol: str, client_oid: str) -> bool:
        """Ask the exchange to cancel ``client_oid``; False when it cannot (already done).

        The cancel is confirmed by the stream (``done`` ``canceled``): use
        :meth:`wait_for`. Uses the orderId when known, else the clientOid.
        """
        order = await order_store.load(self.redis, symbol, client_oid)
        try:
            if order is not None and order.order_id:
                await self.rest.cancel_order(order.order_id)
            else:
                await self.rest.cancel_by_client_oid(client_oid, symbol)
        except CannotCancel:
            return False
        return True

    async def cancel_all(self, symbol: str) -> list[str]:
        """Cancel every open limit order of the account on ``symbol``: the orderIds accepted."""
        return await self.rest.cancel_all(symbol)

    # ------------------------------------------------------------------ the stream

    async def _tail_id(self, stream: str) -> str:
        last = await self.redis.xrevrange(stream, "+", "-", count=1)
        return _text(last[0][0]) if last else "0-0"

    async def follow(self, symbol: str, client_oid: str, *,
                     idle_timeout: float | None = None) -> AsyncGenerator[dict[str, str], None]:
        """The order's events as they come, starting with its current state.

        The first item is the hash now (``change`` = ``state``); then each entry
        of the order-events stream about this order. Ends after a final status
        (filled, canceled, rejected). ``idle_timeout``: raise ``TimeoutError``
        when no event comes for that long.
        """
        stream = keys.order_events(symbol)
        last = await self._tail_id(stream)
        order = await order_store.load(self.redis, symbol, client_oid)
        if order is None:
            raise UnknownOrder(symbol, client_oid)
        yield {**order.to_hash(), "change": "state"}
        if order.status in FINAL_STATUSES:
            return
        loop = asyncio.get_running_loop()
        deadline = None if idle_timeout is None else loop.time() + idle_timeout
        while True:
            block = _MAX_BLOCK_MS
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"{symbol}: no event for {client_oid} in {idle_timeout}s")
                block = max(1, min(_MAX_BLOCK_MS, int(remaining * 1000)))
            reply: Any = await self.redis.xread({stream: last}, count=_READ_COUNT, block=block)
            for _, entries in reply or []:
                for entry_id, raw in entries:
                    last = _text(entry_id)
                    fields = {_text(k): _text(v) for k, v in raw.items()}
                    if fields.get("clientOid") != client_oid:
                        continue
                    if deadline is not None and idle_timeout is not None:
                        deadline = loop.time() + idle_timeout
                    yield fields
                    if fields.get("status") in FINAL_STATUSES:
                        return

    async def wait_for(self, symbol: str, client_oid: str,
                       statuses: Iterable[str] = FINAL_STATUSES,
                       timeout: float = 30.0) -> OwnOrder:
        """The order once it reaches one of ``statuses`` (or any final status).

        Reads the hash, then the order-events stream from where it stood
        before the read (no event can slip between). Raises ``TimeoutError``
        after ``timeout`` seconds, :class:`UnknownOrder` when nothing is
        registered under ``client_oid``.
        """
        wanted = {str(s) for s in statuses}
        try:
            async with asyncio.timeout(timeout), \
                    contextlib.aclosing(self.follow(symbol, client_oid)) as events:
                async for event in events:
                    status = event.get("status", "")
                    if status in wanted or status in FINAL_STATUSES:
                        break
        except TimeoutError:
            raise TimeoutError(
                f"{symbol}: {client_oid} not in {sorted(wanted)} after {timeout}s") from None
        order = await order_store.load(self.redis, symbol, client_oid)
        if order is None:
            raise UnknownOrder(symbol, client_oid)
        return order
