"""The grid strategy's I/O shell around :mod:`kumex_l3.grid`.

:class:`GridStrategy` (see :meth:`GridStrategy.run`):

1. **Rebuild** (:meth:`GridStrategy.start`): its persisted state
   (:mod:`services.strategy.state`), its own order hashes (the active set and
   every hash of its clientOid prefix) and the exchange's active orders
   (``GET /api/v1/orders?status=active``). Own orders the exchange has are
   adopted (a hash Redis lost is registered again and brought up to date from
   the exchange's record); a ``pending`` one the exchange does not list is
   asked for by clientOid. Write-ahead ``plan`` entries of a previous run are
   completed, then the order-events stream is replayed from the stored last
   id, then the grid's missing levels are placed: no order is placed twice.
2. **React** to ``kumex:{SYM}:order-events`` (XREAD from the stored last id):
   each own fill gives a counter-order one step away (:func:`kumex_l3.grid.on_fill`).
   What follows from an event is persisted (one HSET) before any order is
   registered or sent.
3. **Stop** (SIGTERM / Ctrl-C): cancel all orders on the symbol, confirm at
   the exchange that none of its own is still active (cancelling stragglers
   one by one), and return.
4. **Measure risk at the exchange too**: every ``position_check_s`` (and
   before the first placement) the account's position is read
   (``GET /api/v1/position``); the limit on the position uses it whenever it
   is beyond the grid's own count of its fills (:mod:`kumex_l3.grid`), and a
   difference is counted and logged.
5. **Keep** its state: should Redis lose it (a restart without persistence),
   the state is written again from memory and the open orders are adopted
   from the exchange, so that the order monitor tracks them again
   (:meth:`GridStrategy._keep_state`, checked every second).

Every decision is logged on one line (``decision`` with its reason). With
``dry_run`` nothing is registered, sent or written; decisions are only logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Final

import httpx
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kumex_l3 import keys, order_store
from kumex_l3.backoff import Backoff
from kumex_l3.errors import KumexError, StrategyError
from kumex_l3.grid import (
    Decision,
    Fill,
    GridConfig,
    GridOrder,
    GridPlan,
    GridState,
    initial_orders,
    on_fill,
    retry_refused,
)
from kumex_l3.logs import kv
from kumex_l3.orders import REASON_UNSEEN, OrderStatus, OwnOrder
from kumex_l3.redis_adapter import parse_stream_id
from kumex_l3.rest import CannotCancel, ExchangeOrder, KumexRestClient, RateLimited, RestError
from kumex_l3.tasks import cancel_and_wait
from kumex_l3.trading import ClientOidInUse, Trader, UnknownOrder
from services.strategy.metrics import StrategyMetrics
from services.strategy.settings import StrategySettings
from services.strategy.state import (
    PlannedOrder,
    StoredState,
    clear_plans,
    load_state,
    prune_filled,
    save_progress,
    strategy_state_key,
)

__all__ = ["GridStrategy", "StrategyError"]

_log = logging.getLogger("services.strategy")

_READ_COUNT: Final = 200
#: How often the run loop checks that Redis still holds the grid's state.
_STATE_CHECK_S: Final = 1.0
#: After restoring lost state, the open orders are adopted once more this much later:
#: the order monitor learns adopted orderIds at its next index refresh
#: (``MONITOR_REFRESH_S``, 5 s by default), and a fill in between is not on its hashes.
_READOPT_AFTER_S: Final = 6.0
_BOOK_ATTEMPTS: Final = 10
#: An order refused for now (rate limited) or never seen by the exchange is decided again
#: after the venue's Retry-After or a backoff from this long, up to :data:`_RETRY_MAX_S`.
_RETRY_AFTER_S: Final = 1.0
_RETRY_MAX_S: Final = 30.0
_CONFIRM_ROUNDS: Final = 3


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _qty(text: str | None) -> int:
    if not text:
        return 0
    return int(Decimal(text))


class GridStrategy:
    """One grid on one symbol (see the module docstring).

    ``rest`` may lack credentials only in dry-run (then the exchange's active
    orders are not read). ``book_transport`` swaps the httpx transport of the
    book service client (tests).
    """

    def __init__(
        self,
        settings: StrategySettings,
        redis: aioredis.Redis,
        rest: KumexRestClient,
        *,
        metrics: StrategyMetrics | None = None,
        book_transport: httpx.AsyncBaseTransport | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.symbol = settings.trade_symbol
        self.prefix = settings.client_oid_prefix
        self.dry_run = settings.dry_run
        self.redis = redis
        self.rest = rest
        self.metrics = metrics if metrics is not None else StrategyMetrics()
        self.trader = Trader(redis, rest, clock_ms=clock_ms)
        self.key = strategy_state_key(self.symbol, self.prefix)
        self.stream = keys.order_events(self.symbol)
        self._book_transport = book_transport
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._has_credentials = settings.api_key is not None
        self.config: GridConfig | None = None
        self.state = GridState()
        self.last_event_id = "0-0"
        self.ready = False
        self.stopped = False
        self._resolvers: set[asyncio.Task[None]] = set()
        self._state_check_at = 0.0
        self._readopt_at: float | None = None
        #: (due ``time.monotonic()``, clientOid, why) of orders to decide again (refused for
        #: now, or never seen by the exchange); the backoff grows until one is accepted.
        self._retries: list[tuple[float, str, str, bool]] = []
        self._retry_backoff = Backoff(initial=_RETRY_AFTER_S, max_delay=_RETRY_MAX_S)
        self._position_at = 0.0
        #: The last difference (exchange - own) logged: a lasting one is logged once.
        self._position_gap = 0

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What ``GET /state`` shows."""
        config = self.config
        return {
            "symbol": self.symbol,
            "ready": self.ready,
            "dryRun": self.dry_run,
            "clientOidPrefix": self.prefix,
            "centre": None if config is None else f"{config.centre:f}",
            "step": None if config is None else f"{config.step:f}",
            "position": self.state.position,
            "exchangePosition": self.state.exchange_position,
            "openOrders": self.state.open_count,
            "nextSeq": self.state.next_seq,
            "lastEventId": self.last_event_id,
            "orders": [
                {"clientOid": o.client_oid, "side": o.side, "price": f"{o.price:f}",
                 "size": o.size, "filled": o.filled, "status": o.status}
                for o in self.state.open_orders()
            ],
        }

    def _gauges(self) -> None:
        self.metrics.open_orders.set(self.state.open_count)
        self.metrics.position.set(self.state.position)

    # ------------------------------------------------------------------ start

    async def _centre(self, stored: Decimal | None, tick: Decimal) -> Decimal:
        source = "settings"
        centre = self.settings.centre_price
        if centre is None and stored is not None:
            centre, source = stored, "stored state"
        if centre is None:
            centre, source = await self._book_mid(), "book mid"
        quantized = (centre / tick).to_integral_value(ROUND_FLOOR) * tick
        _log.info("grid centre", extra=kv(symbol=self.symbol, centre=f"{quantized:f}",
                                           source=source))
        return quantized

    async def _book_mid(self) -> Decimal:
        url = f"{self.settings.book_url}/book/{self.symbol}"
        policy = Backoff(initial=0.5, max_delay=5.0)
        last_error = ""
        async with httpx.AsyncClient(timeout=self.settings.request_timeout,
                                     transport=self._book_transport) as http:
            for _ in range(_BOOK_ATTEMPTS):
                try:
                    response = await http.get(url, params={"depth": 1})
                    if response.status_code == 200:
                        body = response.json()
                        bids, asks = body.get("bids") or [], body.get("asks") or []
                        best = [Decimal(str(side[0][0])) for side in (bids, asks) if side]
                        if best:
                            return sum(best, Decimal(0)) / len(best)
                        last_error = "empty book"
                    else:
                        last_error = f"HTTP {response.status_code}"
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                delay = policy.next_delay()
                _log.warning("book service not ready", extra=kv(
                    url=url, error=last_error, retry_in=f"{delay:.1f}"))
                await asyncio.sleep(delay)
        raise StrategyError(f"no centre price: the book service at {url} failed "
                            f"({last_error}); set STRATEGY_CENTRE_PRICE")

    async def _tail_id(self) -> str:
        last = await self.redis.xrevrange(self.stream, "+", "-", count=1)
        return _text(last[0][0]) if last else "0-0"

    async def _first_id(self) -> str | None:
        first = await self.redis.xrange(self.stream, "-", "+", count=1)
        return _text(first[0][0]) if first else None

    async def _own_hash_oids(self, config: GridConfig) -> set[str]:
        found: set[str] = set()
        for coid in await order_store.active(self.redis, self.symbol):
            if config.owns(coid):
                found.add(coid)
        pattern = keys.order(self.symbol, f"{self.prefix}-*")
        head = len(keys.order(self.symbol, ""))
        async for key in self.redis.scan_iter(match=pattern, count=500):
            coid = _text(key)[head:]
            if config.owns(coid):
                found.add(coid)
        return found

    async def _adopt(self, coid: str, record: ExchangeOrder,
                     hashes: dict[str, OwnOrder]) -> None:
        """Bring ``coid``'s hash in line with the exchange's record (register it if lost)."""
        if self.dry_run:
            return
        if coid not in hashes:
            if record.price is None:
                return
            await order_store.register(
                self.redis, self.symbol, coid, side=record.side, price=f"{record.price:f}",
                size=record.size, now_ms=self._clock_ms(),
                extra={"leverage": record.leverage or str(self.settings.leverage)})
            _log.warning("own order missing from Redis, registered from the exchange",
                         extra=kv(clientOid=coid, orderId=record.id))
        order = await self.trader.adopt(self.symbol, coid, record)
        if order is not None:
            hashes[coid] = order

    async def start(self) -> None:
        """Rebuild state, finish what a previous run left, replay events, place the grid."""
        stored = await load_state(self.redis, self.key)
        tail = await self._tail_id()
        contract = await self.rest.contract(self.symbol)
        tick = Decimal(str(contract["tickSize"]))
        centre = await self._centre(stored.centre, tick)
        s = self.settings
        config = GridConfig(
            symbol=self.symbol, centre=centre, step_ticks=s.step_ticks, tick_size=tick,
            levels=s.levels, size=s.size, max_position=s.max_position,
            max_open_orders=s.max_open_orders, leverage=s.leverage,
            client_oid_prefix=self.prefix)
        self.config = config

        coids = await self._own_hash_oids(config) | set(stored.plans)
        hashes = await order_store.load_many(self.redis, self.symbol, sorted(coids))
        adopted = await self._reconcile(config, stored, hashes)
        # A grid keeps its salt for life; one without (new, or state lost) draws one:
        # its clientOids can then never be those of an earlier life.
        salt = stored.salt or secrets.token_urlsafe(24)
        filled = self._rebuild(stored, hashes, salt, tail)
        _log.info("state rebuilt", extra=kv(
            symbol=self.symbol, ownOrders=len(hashes), openOrders=self.state.open_count,
            adoptedFromExchange=adopted, position=self.state.position,
            nextSeq=self.state.next_seq, plans=len(stored.plans), resumeFrom=self.last_event_id,
            fresh=not stored.exists))
        if not self.dry_run:
            await self._resume(stored, hashes, centre, salt, filled)
        self._gauges()

        # Events since the last one acted upon (including those of the adoptions above).
        first = await self._first_id()
        trimmed = (first is not None and self.last_event_id != "0-0"
                   and parse_stream_id(first) > parse_stream_id(self.last_event_id))
        while await self._read_events(block_ms=None):
            pass
        if trimmed:
            await self._catch_up()
        await self._check_position(force=True)
        await self._apply(initial_orders(config, self.state), event_id=None)
        self.ready = True

    async def _reconcile(self, config: GridConfig, stored: StoredState,
                         hashes: dict[str, OwnOrder]) -> int:
        """Take the exchange's word for our orders it knows better than Redis; how many of
        our orders it lists as active."""
        exchange: dict[str, ExchangeOrder] = {}
        if self._has_credentials:
            exchange = {o.client_oid: o for o in await self.rest.active_orders(self.symbol)
                        if config.owns(o.client_oid)}
        for coid, record in exchange.items():
            known = hashes.get(coid)
            # Unknown, not sent as far as the hash knows, or known only from our REST
            # reply (no stream message yet): the exchange's record says more.
            if known is None or known.status in (OrderStatus.PENDING, OrderStatus.RECEIVED):
                await self._adopt(coid, record, hashes)
        if self._has_credentials and not self.dry_run:
            for coid, order in list(hashes.items()):
                if coid in exchange or coid in stored.plans or order.finished:
                    continue
                # Open in Redis, not active at the exchange: its end was missed, or it
                # never arrived. Ask; the answer goes through the hash (and an event).
                found = await self.rest.get_order_by_client_oid(coid, self.symbol)
                if found is not None:
                    await self._adopt(coid, found, hashes)
        return len(exchange)

    def _rebuild(self, stored: StoredState, hashes: dict[str, OwnOrder], salt: str,
                 tail: str) -> dict[str, int]:
        """The grid's state from the stored progress and the orders' hashes; the filled
        sizes it starts from."""
        if stored.exists:
            filled = dict(stored.filled)
            position, next_seq = stored.position, stored.next_seq
            self.last_event_id = stored.last_event_id
        else:
            # First start: earlier fills (if any) are history, not something to react to.
            filled = {coid: int(o.filled_size) for coid, o in hashes.items() if o.filled_size}
            position = sum(int(o.filled_size) * (1 if o.side == "buy" else -1)
                           for o in hashes.values())
            next_seq = 1
            self.last_event_id = tail
        orders = [GridOrder(coid, "buy" if o.side == "buy" else "sell", Decimal(o.price),
                            int(o.size), filled.get(coid, 0), o.status.value)
                  for coid, o in hashes.items() if o.price]
        orders += [GridOrder(coid, "buy" if p.side == "buy" else "sell", p.price, p.size)
                   for coid, p in stored.plans.items() if coid not in hashes]
        self.state = GridState.rebuild(orders, position=position, salt=salt,
                                       next_seq=next_seq)
        return filled

    async def _resume(self, stored: StoredState, hashes: dict[str, OwnOrder], centre: Decimal,
                      salt: str, filled: dict[str, int]) -> None:
        """Save the rebuilt progress, and send the orders a previous run planned."""
        gone = [c for c in stored.filled if c not in hashes and c not in stored.plans]
        await prune_filled(self.redis, self.key, gone)
        await save_progress(
            self.redis, self.key, last_event_id=self.last_event_id,
            position=self.state.position, next_seq=self.state.next_seq, centre=centre,
            salt=salt, filled=None if stored.exists else filled)
        for coid, plan in stored.plans.items():
            _log.info("completing an order planned by a previous run",
                      extra=kv(clientOid=coid, plan=plan.encode()))
            await self._send(coid, plan)

    async def _catch_up(self) -> None:
        """The stream lost entries we had not read: compare hashes with what was acted upon."""
        assert self.config is not None
        _log.warning("order-events stream trimmed past our last id; catching up from hashes",
                     extra=kv(symbol=self.symbol, lastEventId=self.last_event_id))
        hashes = await order_store.load_many(self.redis, self.symbol, list(self.state.orders))
        for coid, order in hashes.items():
            known = self.state.orders[coid]
            if int(order.filled_size) > known.filled or order.status.value != known.status:
                fill = Fill(coid, int(order.filled_size), order.status.value)
                await self._on_fill(fill, event_id=None)

    # ------------------------------------------------------------------ acting

    def _log_decision(self, decision: Decision) -> None:
        if decision.action == "place":
            _log.info("decision place", extra=kv(
                symbol=self.symbol, clientOid=decision.client_oid, side=decision.side,
                price=f"{decision.price:f}" if decision.price is not None else "",
                size=decision.size, reason=decision.reason, dryRun=self.dry_run))
        else:
            self.metrics.skipped.inc()
            _log.info("decision skip", extra=kv(symbol=self.symbol, reason=decision.reason))

    async def _apply(self, plan: GridPlan, *, event_id: str | None,
                     filled: Mapping[str, int] | None = None) -> None:
        """Adopt ``plan``'s state, persist what follows from it, then send its orders."""
        self.state = plan.state
        for decision in plan.decisions:
            self._log_decision(decision)
        planned = {
            d.client_oid: PlannedOrder(d.side, d.price, d.size)
            for d in plan.places
            if d.client_oid is not None and d.side is not None and d.price is not None
        }
        if not self.dry_run and (planned or filled or event_id is not None):
            await save_progress(self.redis, self.key, last_event_id=event_id,
                                position=self.state.position, next_seq=self.state.next_seq,
                                filled=filled, plans=planned)
        if not self.dry_run:
            for coid, order in planned.items():
                await self._send(coid, order)
        self._gauges()

    def _set_status(self, coid: str, status: str) -> None:
        assert self.config is not None
        known = self.state.orders.get(coid)
        if known is not None:
            self.state = on_fill(self.config, self.state,
                                 Fill(coid, known.filled, status)).state

    async def _send(self, coid: str, plan: PlannedOrder) -> None:
        """Register and send one planned order; then drop its write-ahead entry."""
        try:
            await self.trader.place_order(
                self.symbol, plan.side, plan.price, plan.size, leverage=self.settings.leverage,
                client_oid=coid, extra={"strategy": self.prefix})
        except ClientOidInUse:
            # Registered by an earlier attempt that may not have sent it: check first.
            try:
                resolution = await self.trader.resolve_after_timeout(self.symbol, coid,
                                                                     resend=True)
            except RestError as exc:
                self._refused_or_unknown(coid, exc)
            except UnknownOrder:  # its hash vanished meanwhile: nothing left to resolve
                _log.warning("planned order vanished from Redis", extra=kv(clientOid=coid))
            else:
                _log.info("planned order resolved", extra=kv(
                    clientOid=coid, outcome=resolution.outcome,
                    status=resolution.order.status.value if resolution.order else ""))
                if resolution.outcome == "resent":
                    self.metrics.placed.inc()
        except RestError as exc:
            self._refused_or_unknown(coid, exc)
        else:
            self.metrics.placed.inc()
            self._retry_backoff.reset()
        await clear_plans(self.redis, self.key, [coid])

    def _refused_or_unknown(self, coid: str, exc: RestError) -> None:
        if exc.refused:
            code = getattr(exc, "code", "") or type(exc).__name__
            self.metrics.refused.labels(code=code).inc()
            _log.warning("order refused", extra=kv(clientOid=coid, error=str(exc)))
            self._set_status(coid, OrderStatus.REJECTED.value)
            if isinstance(exc, RateLimited):
                # Refused for now, never accepted: decided again after the wait.
                self._retry_later(coid, str(exc)[:200], exc.retry_after)
        else:
            self.metrics.timeouts.inc()
            _log.warning("order outcome unknown; left pending", extra=kv(
                clientOid=coid, error=type(exc).__name__))
            task = asyncio.create_task(self._resolve_later(coid), name=f"resolve-{coid}")
            self._resolvers.add(task)
            task.add_done_callback(self._resolvers.discard)

    def _retry_later(self, coid: str, why: str, at_least: float | None = None, *,
                     check_first: bool = False) -> None:
        """Decide ``coid`` again after a backoff, on the run loop (where the state changes);
        with ``check_first``, only once the exchange confirms it has no such order."""
        wait = min(max(at_least or 0.0, self._retry_backoff.next_delay()), _RETRY_MAX_S)
        self._retries.append((time.monotonic() + wait, coid, why, check_first))

    async def _resolve_later(self, coid: str) -> None:
        """After a timeout: ask the exchange by clientOid (the answer updates the hash)."""
        await asyncio.sleep(self.settings.resolve_after)
        try:
            resolution = await self.trader.resolve_after_timeout(self.symbol, coid)
        except (RestError, KumexError) as exc:
            _log.warning("resolving a timed-out order failed", extra=kv(
                clientOid=coid, error=str(exc)))
            return
        _log.info("timed-out order resolved", extra=kv(
            clientOid=coid, outcome=resolution.outcome,
            status=resolution.order.status.value if resolution.order else ""))

    # ------------------------------------------------------------------ events

    async def _xread(self, block_ms: int | None) -> Any:
        return await self.redis.xread({self.stream: self.last_event_id}, count=_READ_COUNT,
                                      block=block_ms)

    async def _read_events(self, *, block_ms: int | None) -> int:
        """Read and act on one batch of the order-events stream; how many entries were read."""
        return await self._act_on(await self._xread(block_ms))

    async def _act_on(self, reply: Any) -> int:
        """Act on the entries of one XREAD reply, in order; persist the last id read."""
        count = 0
        for _, entries in reply or []:
            for entry_id, raw in entries:
                fields = {_text(k): _text(v) for k, v in raw.items()}
                await self._on_event(_text(entry_id), fields)
                count += 1
        if count and not self.dry_run:
            await save_progress(self.redis, self.key, last_event_id=self.last_event_id)
        return count

    async def _on_event(self, entry_id: str, fields: dict[str, str]) -> None:
        assert self.config is not None
        self.last_event_id = entry_id
        self.metrics.events.inc()
        coid = fields.get("clientOid", "")
        if not self.config.owns(coid):
            return
        if coid not in self.state.orders:
            _log.warning("event of an own-prefix order this grid does not hold; ignored",
                         extra=kv(clientOid=coid, eventId=entry_id))
            return
        fill = Fill(coid, _qty(fields.get("filledSize")), fields.get("status") or None)
        unseen = (fill.status == OrderStatus.REJECTED.value
                  and fields.get("reason") == REASON_UNSEEN
                  and self.state.orders[coid].is_open and not fill.filled_size)
        await self._on_fill(fill, event_id=entry_id)
        if unseen:
            # Never reached the exchange (the monitor asked it by clientOid, and the stream
            # went past it): the same order again, under a new clientOid.
            self._retry_later(coid, "never seen by the exchange", check_first=True)

    async def _on_fill(self, fill: Fill, *, event_id: str | None) -> None:
        assert self.config is not None
        before = self.state.orders[fill.client_oid]
        plan = on_fill(self.config, self.state, fill)
        after = plan.state.orders[fill.client_oid]
        delta = after.filled - before.filled
        if delta > 0:
            self.metrics.fills.inc()
            self.metrics.filled_contracts.labels(side=before.side).inc(delta)
            self.metrics.counter_orders.inc(len(plan.places))
            _log.info("fill", extra=kv(
                symbol=self.symbol, clientOid=fill.client_oid, side=before.side,
                price=f"{before.price:f}", filled=f"{after.filled}/{after.size}",
                delta=delta, position=plan.state.position, eventId=event_id or ""))
            await self._apply(plan, event_id=event_id, filled={fill.client_oid: after.filled})
        elif delta < 0:
            # The exchange's final word below what was counted (a fill guessed after a
            # loss): the position is corrected, and kept so.
            _log.warning("fill corrected down", extra=kv(
                symbol=self.symbol, clientOid=fill.client_oid, was=before.filled,
                now=after.filled, position=plan.state.position, eventId=event_id or ""))
            await self._apply(plan, event_id=event_id, filled={fill.client_oid: after.filled})
        else:
            await self._apply(plan, event_id=None)

    # ------------------------------------------------------------------ run / stop

    async def run(self, stop: asyncio.Event) -> None:
        """Start, react to events until ``stop`` is set, then cancel own orders.

        A Redis error while waiting is retried; one while acting on an entry
        leaves it half-applied, so the grid recovers as a restart would
        (:meth:`_recover`) rather than going on from a half-applied event.
        """
        try:
            await self.start()
        except BaseException:
            await self._cancel_resolvers()
            raise
        policy = Backoff(initial=0.5, max_delay=10.0)
        block_ms = max(1, int(self.settings.read_block * 1000))
        try:
            while not stop.is_set():
                try:
                    await self._keep_state()
                    await self._check_position()
                    await self._retry_due()
                    # Only the wait for entries is interrupted by a stop, never the acting.
                    reply = await self._read_or_stop(block_ms, stop)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    delay = policy.next_delay()
                    _log.warning("redis error; retrying", extra=kv(
                        error=type(exc).__name__, retry_in=f"{delay:.1f}"))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                policy.reset()
                if stop.is_set():
                    break
                try:
                    await self._act_on(reply)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    # Half-applied: recover as a restart would (persisted state, plans,
                    # the exchange's active orders), in this process, once Redis is back.
                    _log.warning("redis error while acting on an event; recovering",
                                 extra=kv(error=type(exc).__name__))
                    await self._recover(stop, policy)
        finally:
            await self.shutdown()

    async def _check_position(self, *, force: bool = False) -> None:
        """Every ``position_check_s``: the account's position at the exchange, for the risk
        limit (see the module doc). A failed read keeps the last one (logged)."""
        every = self.settings.position_check_s
        now = time.monotonic()
        if (self.dry_run or not self._has_credentials or every <= 0
                or (not force and now < self._position_at)):
            return
        self._position_at = now + every
        try:
            qty = await self.rest.position(self.symbol)
        except RestError as exc:
            _log.warning("cannot read the position at the exchange; keeping the last one",
                         extra=kv(symbol=self.symbol, error=str(exc),
                                  last=self.state.exchange_position))
            return
        self.state = replace(self.state, exchange_position=qty)
        self.metrics.exchange_position.set(qty)
        gap = qty - self.state.position
        if gap:
            self.metrics.position_mismatches.inc()
        if gap != self._position_gap:
            self._position_gap = gap
            log = _log.warning if gap else _log.info
            log("position at the exchange " + ("differs from the grid's" if gap
                                               else "agrees with the grid's again"),
                extra=kv(symbol=self.symbol, exchange=qty, grid=self.state.position))

    async def _retry_due(self) -> None:
        """Decide again the rate-limited orders whose wait is over (new clientOids)."""
        if not self._retries or self.config is None:
            return
        now = time.monotonic()
        due = [r for r in self._retries if r[0] <= now]
        if not due:
            return
        self._retries = [r for r in self._retries if r[0] > now]
        for _, coid, why, check_first in due:
            if check_first and not await self._absent(coid, why):
                continue
            plan = retry_refused(self.config, self.state, coid, why)
            self.metrics.retried.inc(len(plan.places))
            await self._apply(plan, event_id=None)

    async def _absent(self, coid: str, why: str) -> bool:
        """Whether the exchange confirms it has no order ``coid`` (asked again later if it
        cannot answer now)."""
        try:
            found = await self.rest.get_order_by_client_oid(coid, self.symbol)
        except RestError as exc:
            _log.warning("cannot confirm an order is absent; asking again later",
                         extra=kv(clientOid=coid, error=str(exc)))
            self._retry_later(coid, why, check_first=True)
            return False
        if found is not None:
            _log.error("an order rejected as unseen exists at the exchange: not sent again",
                       extra=kv(clientOid=coid, orderId=found.id, status=found.status))
            return False
        return True

    async def _recover(self, stop: asyncio.Event, policy: Backoff) -> None:
        """Wait for Redis, restore lost state if needed, then rebuild as :meth:`start` does."""
        while not stop.is_set():
            delay = policy.next_delay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            try:
                await self.redis.ping()
                self._state_check_at = 0.0
                await self._keep_state()
                await self.start()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                _log.warning("redis still unavailable; retrying",
                             extra=kv(error=type(exc).__name__))
                continue
            policy.reset()
            _log.info("recovered after a redis error", extra=kv(symbol=self.symbol))
            return

    async def _keep_state(self) -> None:
        """Every :data:`_STATE_CHECK_S`: restore the grid's state if Redis lost it.

        Redis restarted without persistence (or flushed) has lost the state
        hash and every own-order hash: the order monitor then tracks nothing
        and no fill would ever reach the grid again. The state is written
        again from memory, and the open orders are adopted from the exchange
        (their hashes registered again and brought up to date, each change an
        event this loop then acts upon); once more :data:`_READOPT_AFTER_S`
        later for the fills that came before the monitor saw the new hashes.
        A REST failure is retried at the next check.
        """
        now = time.monotonic()
        if self.dry_run or self.config is None or now < self._state_check_at:
            return
        self._state_check_at = now + _STATE_CHECK_S
        config = self.config
        try:
            if self._readopt_at is not None and now >= self._readopt_at:
                await self._adopt_open_orders()
                self._readopt_at = None
            # ``centre`` is written at start and never by an event: absent = state lost.
            if await self.redis.hexists(self.key, "centre"):
                return
            _log.warning("grid state missing from Redis (restarted without persistence?): "
                         "restoring it and adopting own orders from the exchange",
                         extra=kv(symbol=self.symbol, key=self.key))
            adopted = await self._adopt_open_orders()
        except RestError as exc:
            _log.warning("cannot read own orders at the exchange; will retry",
                         extra=kv(symbol=self.symbol, error=str(exc)))
            return
        filled = {c: o.filled for c, o in self.state.orders.items() if o.filled}
        await save_progress(self.redis, self.key, last_event_id=self.last_event_id,
                            position=self.state.position, next_seq=self.state.next_seq,
                            centre=config.centre, filled=filled)
        self._readopt_at = time.monotonic() + _READOPT_AFTER_S
        _log.info("grid state restored", extra=kv(symbol=self.symbol, adopted=adopted,
                                                  position=self.state.position))

    async def _adopt_open_orders(self) -> int:
        """Adopt from the exchange every own order it has active or the grid holds open."""
        assert self.config is not None
        config = self.config
        records = {o.client_oid: o for o in await self.rest.active_orders(self.symbol)
                   if config.owns(o.client_oid)}
        for order in self.state.open_orders():
            if order.client_oid not in records:
                found = await self.rest.get_order_by_client_oid(order.client_oid, self.symbol)
                if found is not None:
                    records[order.client_oid] = found
        hashes = await order_store.load_many(self.redis, self.symbol, sorted(records))
        for coid, record in records.items():
            await self._adopt(coid, record, hashes)
        return len(records)

    async def _cancel_resolvers(self) -> None:
        await cancel_and_wait(*self._resolvers)

    async def _read_or_stop(self, block_ms: int, stop: asyncio.Event) -> Any:
        """One blocking XREAD, abandoned as soon as ``stop`` is set."""
        read = asyncio.ensure_future(self._xread(block_ms))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(read, stopped)
        return read.result() if read.done() and not read.cancelled() else None

    async def shutdown(self) -> None:
        """Cancel every order of the symbol and confirm none of its own is still active."""
        self.ready = False
        await self._cancel_resolvers()
        if self.dry_run or self.config is None or self.stopped:
            self.stopped = True
            return
        self.stopped = True
        config = self.config
        try:
            cancelled = await self.trader.cancel_all(self.symbol)
            _log.info("cancel all sent", extra=kv(symbol=self.symbol, accepted=len(cancelled)))
        except RestError as exc:
            _log.error("cancel all failed", extra=kv(symbol=self.symbol, error=str(exc)))
        remaining: list[ExchangeOrder] = []
        for _ in range(_CONFIRM_ROUNDS):
            try:
                remaining = [o for o in await self.rest.active_orders(self.symbol)
                             if config.owns(o.client_oid)]
            except RestError as exc:
                _log.error("cannot confirm cancels", extra=kv(error=str(exc)))
                return
            if not remaining:
                break
            for order in remaining:
                with contextlib.suppress(CannotCancel):
                    await self.rest.cancel_order(order.id)
        if remaining:
            _log.error("own orders still active after cancel", extra=kv(
                symbol=self.symbol, clientOids=",".join(o.client_oid for o in remaining)))
        else:
            _log.info("no own order active at the exchange", extra=kv(symbol=self.symbol))
        self._gauges()
