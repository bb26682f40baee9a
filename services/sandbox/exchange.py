"""The sandbox exchange's state and its I/O shell around the pure engines.

:class:`Exchange` owns one :class:`~services.sandbox.engine.MatchingEngine`
per configured symbol, the :class:`~services.sandbox.flow.SyntheticFlow`
driving them, the WebSocket :class:`~services.sandbox.hub.Hub` and the
:class:`~services.sandbox.faults.FaultState`. Every engine action (a REST
order, a cancel, a flow step) goes through :meth:`Exchange._publish`, which
hands the messages it emitted to the hub at once and in order: nothing awaits
between an engine action and its publication, so the L3 stream always
carries exactly the engine's sequence.

The flow runs in one asyncio task (:meth:`Exchange.start`) at
``flow_rate`` actions a second (negative = as fast as possible), pausable and
re-rated at run time; it uses the event loop's clock. With
``SANDBOX_REPLAY`` set, a :class:`~services.sandbox.replay.Replayer` sends a
capture instead, and trading is disabled (its sequences belong to the
capture).

Stop orders wait off the book in one :class:`~services.sandbox.stops.StopBook`
per symbol; :meth:`Exchange._publish` hands every batch to :meth:`Exchange._reach`,
which places (through the engine, keeping their orderIds) the stops its trades
reach, one after the other, each batch published before the next placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from kumex_l3.tasks import cancel_and_wait
from services.sandbox.account import Holding, OpenOrder, account_overview
from services.sandbox.auth import ApiCredential
from services.sandbox.contracts import CONTRACTS, Contract
from services.sandbox.engine import (
    CANNOT_CANCEL,
    INVALID_PARAMETER,
    EngineOrder,
    MatchingEngine,
    Message,
    OrderRequest,
    RejectError,
)
from services.sandbox.faults import FaultState
from services.sandbox.flow import SyntheticFlow
from services.sandbox.hub import Hub
from services.sandbox.settings import SandboxSettings
from services.sandbox.stops import StopBook, StopOrder, StopSpec, new_stop, stop_ticks

if TYPE_CHECKING:
    from services.sandbox.replay import Replayer

__all__ = ["INVALID_SYMBOL", "Exchange", "SnapshotLimiter", "UnknownSymbol"]

_log = logging.getLogger(__name__)

#: Error code of an unknown contract symbol.
INVALID_SYMBOL: Final = "200003"
#: Longest time the flow runner works before yielding to the loop, in "max" mode.
_MAX_BURST_S: Final = 0.005
#: Longest sleep of the flow runner between checks of its rate.
_MAX_SLEEP_S: Final = 0.1
#: A paced flow never catches up more than this many seconds of backlog.
_MAX_BACKLOG_S: Final = 1.0
#: In "max" mode, how long the flow waits for a slow client before going on without it.
_STALL_S: Final = 5.0
#: Poll period while waiting for client queues to drain.
_POLL_S: Final = 0.002


#: Trades kept per symbol for ``/api/v1/ticker`` and ``/api/v1/trade/history``.
TRADES_KEPT: Final = 100


class UnknownSymbol(RejectError):
    """A symbol the sandbox does not list (code 200003)."""

    def __init__(self, symbol: str, http_status: int = 400) -> None:
        super().__init__(INVALID_SYMBOL, f"contract {symbol!r} does not exist", http_status)
        self.symbol = symbol


class SnapshotLimiter:
    """Per-client token buckets for the L3 snapshot (pure: time comes in).

    A client may burst ``max(1, rate_per_min)`` requests, refilled at
    ``rate_per_min`` a minute; ``rate_per_min`` 0 means no limit.
    """

    _MAX_CLIENTS: Final = 10_000

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, rate_per_min: float, now_s: float) -> bool:
        """Take one token of ``client``'s bucket at ``now_s`` (monotonic seconds)."""
        if rate_per_min <= 0:
            return True
        capacity = max(1.0, rate_per_min)
        tokens, last = self._buckets.get(client, (capacity, now_s))
        tokens = min(capacity, tokens + max(0.0, now_s - last) * rate_per_min / 60.0)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= self._MAX_CLIENTS and client not in self._buckets:
            self._buckets.clear()  # bounded memory; forgetting only ever allows more
        self._buckets[client] = (tokens, now_s)
        return allowed

    def retry_after(self, client: str, rate_per_min: float, now_s: float) -> float:
        """Seconds until ``client`` may ask again (0 when it may now)."""
        if rate_per_min <= 0 or client not in self._buckets:
            return 0.0
        tokens, last = self._buckets[client]
        tokens += max(0.0, now_s - last) * rate_per_min / 60.0
        return max(0.0, (1.0 - tokens) * 60.0 / rate_per_min)

    def reset(self) -> None:
        """Forget every bucket."""
        self._buckets.clear()


class Exchange:
    """The sandbox: engines, flow, hub and faults of one process.

    Built from the settings; :meth:`start` / :meth:`stop` run its background
    tasks (the app's lifespan calls them). All methods run on the event loop's
    thread.
    """

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.faults = FaultState(
            drop_rate=settings.drop_rate,
            duplicate_rate=settings.duplicate_rate,
            reorder_rate=settings.reorder_rate,
            delay_ms=settings.delay_ms,
            delay_jitter_ms=settings.delay_jitter_ms,
            disconnect_every_s=settings.disconnect_every_s,
            disconnect_every_max_s=settings.disconnect_every_max_s,
            outage_every_s=settings.outage_every_s,
            outage_s=settings.outage_s,
            refuse_snapshots=settings.refuse_snapshots,
            rest_latency_ms=settings.rest_latency_ms,
            snapshot_rate_per_min=settings.snapshot_rate_per_min,
        )
        self.replay_mode = settings.replay is not None
        self.hub = Hub(
            self.faults,
            symbols=None if self.replay_mode else settings.symbol_list,
            seed=settings.seed,
            queue_limit=settings.client_queue_limit,
            ping_timeout_s=settings.ws_idle_timeout_s,
        )
        self.credentials: dict[str, ApiCredential] = {
            k.key: ApiCredential(
                key=k.key, secret=k.secret, passphrase=k.passphrase, user_id=k.user_id
            )
            for k in settings.api_keys
        }
        start_sequence = settings.start_sequence
        if start_sequence is None:
            start_sequence = time.time_ns() // 1_000_000
        self.contracts: dict[str, Contract] = {s: CONTRACTS[s] for s in settings.symbol_list}
        self.engines: dict[str, MatchingEngine] = {
            symbol: MatchingEngine(
                contract,
                id_seed=settings.seed,
                start_sequence=start_sequence,
                max_active_per_user=settings.max_active_orders,
                fills_of={c.user_id for c in self.credentials.values()},
            )
            for symbol, contract in self.contracts.items()
        }
        self.flow = SyntheticFlow(self.engines, seed=settings.seed)
        self.snapshot_limiter = SnapshotLimiter()
        self.replayer: Replayer | None = None
        self._rate = settings.flow_rate
        self._paused = settings.flow_rate == 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_ns = 0
        self.flow_steps = 0
        self.flow_error: str | None = None
        self.primed = False
        #: Per symbol: (sequence, JSON text) of the last engine messages, before faults.
        self.journal: dict[str, deque[tuple[int, str]]] = {
            symbol: deque(maxlen=settings.journal_size) for symbol in self.engines
        } if settings.journal_size else {}
        #: Per symbol: the last trades (the ``data`` of ``match`` messages), newest last.
        self.trades: dict[str, deque[dict[str, Any]]] = {}
        #: Per symbol: the stop orders waiting for a trade (services.sandbox.stops); and
        #: the fired ones waiting for their turn to be placed (:meth:`_reach`).
        self.stop_books: dict[str, StopBook] = {s: StopBook(s) for s in self.engines}
        self._stop_queue: deque[StopOrder] = deque()
        self._firing = False
        #: (user, symbol) -> leverage of the user's latest order placed there (its margin).
        self._leverage: dict[tuple[str, str], Decimal] = {}

    # ------------------------------------------------------------------ clock

    def now_ns(self) -> int:
        """Wall-clock nanoseconds, strictly increasing within this process."""
        now = time.time_ns()
        if now <= self._last_ns:
            now = self._last_ns + 1
        self._last_ns = now
        return now

    # ------------------------------------------------------------------ publishing

    def _publish(self, symbol: str, messages: list[Message]) -> None:
        """The one place engine output leaves: to the hub, at once, in order."""
        if messages:
            trades = self.trades.get(symbol)
            for m in messages:
                if m.get("subject") == "match":
                    if trades is None:
                        trades = self.trades[symbol] = deque(maxlen=TRADES_KEPT)
                    trades.append(m["data"])
            journal = self.journal.get(symbol)
            if journal is not None:
                journal.extend((m["data"]["sequence"], json.dumps(m, separators=(",", ":")))
                               for m in messages)
            self.hub.publish(symbol, messages)
        engine = self.engines.get(symbol)
        if engine is not None and engine.private:
            changes = engine.take_private()
            self.hub.publish_private(symbol, changes)
            self._tell_positions(engine, changes)
        self._reach(symbol, messages)

    def _tell_positions(self, engine: MatchingEngine,
                        changes: list[tuple[str, dict[str, Any]]]) -> None:
        """Each account that traded in these changes: its position now, on its
        ``/contract/position:{symbol}`` channel (``changeReason`` ``positionChange``)."""
        traders = dict.fromkeys(user for user, data in changes if data["type"] == "match")
        if not traders:
            return
        for user in traders:
            (data,) = self.positions(user, engine.symbol)
            data["changeReason"] = "positionChange"
            self.hub.publish_position(engine.symbol, user, data)

    def journal_after(self, symbol: str, after: int, limit: int) -> dict[str, Any]:
        """Journalled messages of ``symbol`` with a sequence above ``after`` (oldest first)."""
        journal = self.journal.get(symbol)
        if journal is None:
            raise UnknownSymbol(symbol, 404)
        out = [text for seq, text in journal if seq > after][:limit]
        first = journal[0][0] if journal else None
        return {"symbol": symbol, "first": first, "messages": out}

    def _publish_all(self, batches: Iterable[tuple[str, list[Message]]]) -> int:
        count = 0
        for symbol, messages in batches:
            self._publish(symbol, messages)
            count += len(messages)
        return count

    # ------------------------------------------------------------------ lookups

    def contract(self, symbol: str, *, http_status: int = 400) -> Contract:
        """The listed contract ``symbol``, or :class:`UnknownSymbol`."""
        contract = self.contracts.get(symbol)
        if contract is None:
            raise UnknownSymbol(symbol, http_status)
        return contract

    def engine(self, symbol: str, *, http_status: int = 400) -> MatchingEngine:
        """The engine of ``symbol``, or :class:`UnknownSymbol`."""
        engine = self.engines.get(symbol)
        if engine is None:
            raise UnknownSymbol(symbol, http_status)
        return engine

    def _engines_for(self, symbol: str | None) -> list[MatchingEngine]:
        if symbol is None:
            return list(self.engines.values())
        return [self.engine(symbol)]

    def _trading(self) -> None:
        if self.replay_mode:
            raise RejectError(
                INVALID_PARAMETER, "trading is disabled while the sandbox replays a capture"
            )

    # ------------------------------------------------------------------ orders

    def place(self, symbol: str, request: OrderRequest) -> EngineOrder:
        """Place an order for ``request.user_id``; its messages are published."""
        self._trading()
        engine = self.engine(symbol)
        order, messages = engine.place(request, self.now_ns())
        self._publish(symbol, messages)
        return order

    def get_order(self, user_id: str, order_id: str) -> EngineOrder | None:
        """``user_id``'s order ``order_id`` on any symbol, or None."""
        for engine in self.engines.values():
            order = engine.get_order(order_id)
            if order is not None and order.user_id == user_id:
                return order
        return None

    def get_by_client_oid(
        self, user_id: str, client_oid: str, symbol: str | None = None
    ) -> EngineOrder | None:
        """``user_id``'s latest order with ``client_oid`` (on ``symbol``, or any), or None."""
        found = [
            order
            for engine in self._engines_for(symbol)
            if (order := engine.get_by_client_oid(user_id, client_oid)) is not None
        ]
        if not found:
            return None
        return max(found, key=lambda o: (o.is_active, o.created_at, o.order_time))

    def cancel(self, user_id: str, order_id: str) -> list[str]:
        """Cancel ``user_id``'s order ``order_id``: the ids whose cancel was accepted."""
        self._trading()
        order = self.get_order(user_id, order_id)
        if order is None:
            raise RejectError(CANNOT_CANCEL, f"order {order_id} does not exist", http_status=404)
        messages = self.engines[order.symbol].cancel(order_id, self.now_ns(), user_id)
        self._publish(order.symbol, messages)
        return [order_id]

    def cancel_by_client_oid(
        self, user_id: str, client_oid: str, symbol: str | None = None
    ) -> EngineOrder:
        """Cancel ``user_id``'s order with ``client_oid`` (on ``symbol``, or wherever it is)."""
        self._trading()
        if symbol is None:
            found = self.get_by_client_oid(user_id, client_oid)
            if found is None:
                raise RejectError(
                    CANNOT_CANCEL,
                    f"order with clientOid {client_oid} does not exist",
                    http_status=404,
                )
            symbol = found.symbol
        engine = self.engine(symbol)
        order, messages = engine.cancel_by_client_oid(user_id, client_oid, self.now_ns())
        self._publish(symbol, messages)
        return order

    def cancel_all(self, user_id: str, symbol: str | None = None) -> list[str]:
        """Cancel every open limit order of ``user_id`` (on ``symbol``, or all symbols)."""
        self._trading()
        ids: list[str] = []
        for engine in self._engines_for(symbol):
            cancelled, messages = engine.cancel_all(user_id, self.now_ns())
            self._publish(engine.symbol, messages)
            ids.extend(cancelled)
        return ids

    def orders(self, user_id: str, *, active: bool, symbol: str | None = None) -> list[EngineOrder]:
        """``user_id``'s active (or done) orders, newest first."""
        out: list[EngineOrder] = []
        for engine in self._engines_for(symbol):
            if active:
                out.extend(engine.active_orders(user_id))
            else:
                out.extend(o for o in engine.all_orders(user_id) if not o.is_active)
        out.sort(key=lambda o: (o.created_at, o.order_time), reverse=True)
        return out

    # ------------------------------------------------------------------ market data

    def fills(self, user_id: str, symbol: str | None = None) -> list[dict[str, Any]]:
        """``user_id``'s fills (the last ``FILLS_KEPT`` a contract), newest first."""
        out = [f for engine in self._engines_for(symbol) for f in engine.fills.get(user_id, ())]
        out.sort(key=lambda f: f["tradeTime"], reverse=True)
        return out

    def positions(self, user_id: str, symbol: str | None = None) -> list[dict[str, Any]]:
        """``user_id``'s positions (of every contract it ever traded, or of ``symbol``)."""
        now_ms = time.time_ns() // 1_000_000
        out = []
        for engine in self._engines_for(symbol):
            if symbol is None and user_id not in engine.positions:
                continue  # the list shows the contracts traded; one symbol always answers
            out.append(engine.position_of(user_id).to_api(self.mark_price(engine.symbol),
                                                          now_ms))
        return out

    def check_market_symbol(self, symbol: str) -> None:
        """:class:`UnknownSymbol` unless ``symbol`` has market data (listed, or replayed)."""
        if self.replayer is not None:
            if symbol not in self.replayer.symbols:
                raise UnknownSymbol(symbol)
            return
        self.engine(symbol)

    def snapshot(self, symbol: str) -> dict[str, Any]:
        """The ``data`` of ``GET /api/v2/level3/snapshot`` for ``symbol`` (no limits)."""
        if self.replayer is not None:
            try:
                return self.replayer.snapshot(symbol)
            except KeyError:
                raise UnknownSymbol(symbol) from None
        return self.engine(symbol).snapshot(self.now_ns())

    def snapshot_v1(self, symbol: str) -> dict[str, Any]:
        """The ``data`` of ``GET /api/v1/level3/snapshot``: the v2 snapshot with the older
        five-element rows ``[orderTime, orderId, price, size, ts]`` (kumex-api.md §5; a
        replayed capture has no orderTime: its ``ts`` stands in)."""
        data = self.snapshot(symbol)
        engine = None if self.replayer is not None else self.engines.get(symbol)

        def row(r: list[Any]) -> list[Any]:
            order = engine.get_order(r[0]) if engine is not None else None
            return [r[3] if order is None else order.order_time, *r]

        return {**data, "asks": [row(r) for r in data["asks"]],
                "bids": [row(r) for r in data["bids"]]}

    def level2(self, symbol: str) -> dict[str, Any]:
        """The ``data`` of ``GET /api/v1/level2/snapshot``: the visible book by price,
        best first (``[price, size]``), aggregated from the L3 snapshot."""
        snap = self.snapshot(symbol)

        def levels(rows: list[list[Any]]) -> list[list[Any]]:
            out: list[list[Any]] = []
            for _, price, size, _ in rows:
                if out and out[-1][0] == price:
                    out[-1][1] += int(size)
                else:
                    out.append([price, int(size)])
            return out

        return {"symbol": symbol, "sequence": snap["sequence"], "asks": levels(snap["asks"]),
                "bids": levels(snap["bids"]), "ts": snap["ts"]}

    def ticker(self, symbol: str) -> dict[str, Any]:
        """The ``data`` of ``GET /api/v1/ticker``: the last trade and the best levels."""
        book = self.level2(symbol)
        trades = self.trades.get(symbol)
        last = trades[-1] if trades else None
        bid = book["bids"][0] if book["bids"] else [None, 0]
        ask = book["asks"][0] if book["asks"] else [None, 0]
        return {
            "sequence": book["sequence"], "symbol": symbol,
            "side": last["side"] if last else None,
            "size": int(last["size"]) if last else 0,
            "price": last["price"] if last else None,
            "bestBidSize": bid[1], "bestBidPrice": bid[0],
            "bestAskSize": ask[1], "bestAskPrice": ask[0],
            "tradeId": last["tradeId"] if last else None,
            "ts": last["ts"] if last else book["ts"],
        }

    def trade_history(self, symbol: str) -> list[dict[str, Any]]:
        """The ``data`` of ``GET /api/v1/trade/history``: the last trades, newest first."""
        return [{"sequence": t["sequence"], "tradeId": t["tradeId"],
                 "takerOrderId": t["takerOrderId"], "makerOrderId": t["makerOrderId"],
                 "price": t["price"], "size": int(t["size"]), "side": t["side"],
                 "ts": t["ts"]} for t in reversed(self.trades.get(symbol, ()))]

    def book_l3(self, symbol: str) -> dict[str, Any]:
        """The engine's visible L3 book of ``symbol``, as JSON-able data."""
        book = self.engine(symbol, http_status=404).book_l3()

        def side(levels: list[tuple[str, list[tuple[str, int, int]]]]) -> list[dict[str, Any]]:
            return [
                {
                    "price": price,
                    "size": str(sum(size for _, size, _ in orders)),
                    "orders": [
                        {"orderId": oid, "size": str(size), "ts": ts} for oid, size, ts in orders
                    ],
                }
                for price, orders in levels
            ]

        return {
            "symbol": symbol,
            "sequence": book["sequence"],
            "bids": side(book["bids"]),
            "asks": side(book["asks"]),
        }

    def sequences(self) -> dict[str, int]:
        """The last sequence of every symbol."""
        if self.replayer is not None:
            seqs: dict[str, int] = self.replayer.stats()["sequences"]
            return seqs
        return {symbol: engine.sequence for symbol, engine in self.engines.items()}

    def mark_price(self, symbol: str) -> Decimal | None:
        """The engine's mid quantised to the tick; None on a one-sided book, or when
        replaying (no engine keeps the replayed book)."""
        if self.replay_mode:
            return None
        engine = self.engine(symbol)
        mid = engine.mid()
        if mid is None:
            return None
        tick = engine.contract.tick_size
        return (mid / tick).to_integral_value() * tick

    # ------------------------------------------------------------------ flow control

    @property
    def flow_rate(self) -> float:
        """Flow actions a second (negative = as fast as possible, 0 = none)."""
        return self._rate

    @property
    def flow_running(self) -> bool:
        """Whether the flow (or the replay) is producing messages now."""
        if self.replayer is not None:
            return not self.replayer.paused and not self.replayer.done
        return not self._paused and self._rate != 0 and self.flow_error is None

    def pause(self) -> None:
        """Stop the flow after the current step."""
        self._paused = True
        if self.replayer is not None:
            self.replayer.pause()
        self._wake.set()

    def resume(self) -> None:
        """Start the flow again at its current rate (clears a previous flow error)."""
        self._paused = False
        self.flow_error = None
        if self.replayer is not None:
            self.replayer.resume()
        self._wake.set()

    def set_rate(self, rate: float) -> None:
        """Change the flow rate: actions a second, < 0 = as fast as possible, 0 = none."""
        if not math.isfinite(rate):
            raise ValueError(f"rate must be a finite number, not {rate!r}")
        self._rate = float(rate)
        self._wake.set()

    def step(self, n: int) -> int:
        """Run ``n`` flow steps now (deterministic tests); returns messages published."""
        if self.replayer is not None:
            raise RejectError(INVALID_PARAMETER, "no synthetic flow while replaying a capture")
        count = 0
        for _ in range(n):
            count += self._step_once()
        return count

    def _step_once(self) -> int:
        self.flow_steps += 1
        return self._publish_all(self.flow.step(self.now_ns()))

    def prime(self) -> int:
        """Place the flow's initial resting orders (once); returns messages published."""
        if self.primed or self.replay_mode:
            return 0
        self.primed = True
        return self._publish_all(self.flow.prime(self.now_ns()))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Prime the books, start the hub and the flow (or replay) task."""
        await self.hub.start()
        if self.replay_mode:
            from services.sandbox.replay import Replayer

            assert self.settings.replay is not None
            self.replayer = Replayer(
                self.settings.replay, self.hub, speed=self.settings.replay_speed
            )
            if self._paused:
                self.replayer.pause()
            self._tasks.append(asyncio.create_task(self._run_replay(), name="sandbox-replay"))
        else:
            self.prime()
            self._tasks.append(asyncio.create_task(self._run_flow(), name="sandbox-flow"))

    async def stop(self) -> None:
        """Stop the background tasks and disconnect every client."""
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        await self.hub.stop()

    async def _run_replay(self) -> None:
        assert self.replayer is not None
        try:
            await self.replayer.run()
            _log.info("replay finished: %s", self.replayer.stats())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.flow_error = repr(exc)
            _log.exception("replay failed")

    async def _run_flow(self) -> None:
        """Step the flow at the current rate until cancelled (loop clock only)."""
        loop = asyncio.get_running_loop()
        credit = 0.0
        last = loop.time()
        while True:
            if not self.flow_running:
                self._wake.clear()
                await self._wake.wait()
                credit, last = 0.0, loop.time()
                continue
            rate = self._rate
            try:
                if rate < 0:
                    deadline = loop.time() + _MAX_BURST_S
                    while loop.time() < deadline:
                        self._step_once()
                    await self._backpressure(loop)
                    last = loop.time()
                    continue
                now = loop.time()
                credit = min(credit + (now - last) * rate, max(1.0, rate * _MAX_BACKLOG_S))
                last = now
                due = int(credit)
                for _ in range(due):
                    self._step_once()
                credit -= due
            except Exception as exc:
                # A bug in the flow: stop it loudly rather than spin on the error.
                self.flow_error = repr(exc)
                _log.exception("synthetic flow failed; paused (resume to retry)")
                continue
            self._wake.clear()
            wait = min(_MAX_SLEEP_S, max(0.0, (1.0 - credit) / rate))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _backpressure(self, loop: asyncio.AbstractEventLoop) -> None:
        """Yield; in "max" mode, also wait (bounded) while a client queue is over half full.

        "As fast as possible" means as fast as the clients take it: a client
        that stays stuck longer than ``_STALL_S`` is left to fill its queue
        and be dropped as slow, rather than stalling everyone.
        """
        await asyncio.sleep(0)
        hub = self.hub
        high = hub.queue_limit // 2
        if hub.max_queue_depth() <= high:
            return
        deadline = loop.time() + _STALL_S
        while hub.max_queue_depth() > high and loop.time() < deadline and self._rate < 0:
            await asyncio.sleep(_POLL_S)

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """What ``GET /sandbox/state`` shows."""
        hub = self.hub.stats()
        state: dict[str, Any] = {
            "flow": {
                "running": self.flow_running,
                "paused": self._paused,
                "rate": self._rate,
                "max": self._rate < 0,
                "steps": self.flow_steps,
                "rejects": self.flow.rejects,
                "error": self.flow_error,
            },
            "symbols": list(self.contracts),
            "sequences": self.sequences(),
            "faults": self.faults.to_dict(),
            "counts": dict(self.faults.counts),
            "hub": hub,
            "clients": hub["clients"],
            "replay": None if self.replayer is None else self.replayer.stats(),
        }
        return state

    # ------------------------------------------------------------------ stop orders, order test

    def _vet(self, symbol: str, request: OrderRequest, stop: StopSpec | None
             ) -> tuple[MatchingEngine, StopOrder | None]:
        """Every check of ``POST /api/v1/orders``, in its order, with nothing placed: the
        engine of ``symbol`` and, for a stop order, the stop to hold (with a fresh orderId).

        Raises :class:`RejectError` with the code and message placing would give.
        """
        self._trading()
        engine = self.engine(symbol)
        # The engine's own checks (a stop order does not count among its open orders),
        # then the stop book's: a waiting stop holds its clientOid too.
        price, _, leverage = engine.check(request, resting=stop is None)
        if stop is not None:
            stop_ticks(engine.contract, stop)
        self.stop_books[symbol].admit(request.user_id, request.client_oid,
                                      stop=stop is not None)
        if stop is None:
            return engine, None
        now_ns = self.now_ns()
        return engine, new_stop(engine.new_order_id(now_ns), request, engine.contract, stop,
                                price, leverage, now_ns // 1_000_000)

    def submit(self, symbol: str, request: OrderRequest, stop: StopSpec | None = None
               ) -> tuple[str, str]:
        """``POST /api/v1/orders``: place an order, or hold a stop order until a trade
        reaches its stop price (at once when the last trade already has); the
        (orderId, clientOid) of the reply."""
        _, held = self._vet(symbol, request, stop)
        if held is None:
            order = self.place(symbol, request)
            self._leverage[(order.user_id, symbol)] = Decimal(order.leverage)
            return order.id, order.client_oid
        self.stop_books[symbol].add(held)
        trades = self.trades.get(symbol)
        if trades:
            self._reach(symbol, [{"subject": "match", "data": trades[-1]}])
        return held.id, held.client_oid

    def check_order(self, symbol: str, request: OrderRequest, stop: StopSpec | None = None
                    ) -> dict[str, str]:
        """``POST /api/v1/orders/test``: the checks of :meth:`submit` (the same refusals),
        nothing placed, held or published; the reply :meth:`submit` would give."""
        engine, held = self._vet(symbol, request, stop)
        order_id = held.id if held is not None else engine.new_order_id(self.now_ns())
        return {"orderId": order_id, "clientOid": request.client_oid}

    def _reach(self, symbol: str, messages: list[Message]) -> None:
        """Place the stop orders of ``symbol`` that the trades among ``messages`` reach,
        trade by trade (:meth:`_publish` calls it for every batch, whoever traded).

        Re-entrant by design: a placed stop's own messages come back here through
        :meth:`_publish` while the outermost call is still placing; they only queue
        the stops they reach, and the outermost call places the queue in order. So
        nothing recurses, and each batch is out before the next stop is placed.
        """
        book = self.stop_books.get(symbol)
        if not book:
            return
        tick = self.contracts[symbol].tick_size
        queue = self._stop_queue
        for m in messages:
            if m.get("subject") == "match" and book:
                ticks = int(Decimal(m["data"]["price"]) / tick)
                queue.extend(book.fire(ticks, self.now_ns() // 1_000_000))
        if self._firing or not queue:
            return
        self._firing = True
        try:
            while queue:
                stop = queue.popleft()
                try:
                    self._trigger(stop)
                except Exception:  # a bug of ours: this stop ends, the others still fire,
                    # and the request whose trade fired it (already done) is not failed
                    _log.exception("stop order %s of %s on %s could not be placed: canceled",
                                   stop.id, stop.user_id, stop.symbol)
                    if self.engines[stop.symbol].get_order(stop.id) is None:
                        self.stop_books[stop.symbol].refused(stop, "internal error",
                                                             self.now_ns() // 1_000_000)
        except BaseException:
            for stop in queue:  # fired, never placed: finished, not lost in the queue
                self.stop_books[stop.symbol].refused(stop, "internal error",
                                                     self.now_ns() // 1_000_000)
            queue.clear()
            raise
        finally:
            self._firing = False

    def _trigger(self, stop: StopOrder) -> None:
        """Place a fired ``stop`` through its engine, keeping its orderId; from then on it
        is an ordinary order. A refusal finishes it as canceled (and says so in the log:
        its account only sees it by asking)."""
        engine = self.engines[stop.symbol]
        try:
            order, messages = engine.place(stop.request, self.now_ns(), order_id=stop.id)
        except RejectError as exc:
            self.stop_books[stop.symbol].refused(stop, exc.msg, self.now_ns() // 1_000_000)
            _log.warning("stop order %s of %s on %s reached %s %s but the engine refused it "
                         "(%s: %s): canceled", stop.id, stop.user_id, stop.symbol, stop.stop,
                         stop.stop_price_text, exc.code, exc.msg)
            return
        self._leverage[(order.user_id, stop.symbol)] = Decimal(order.leverage)
        self._publish(stop.symbol, messages)

    def _stop_books_for(self, symbol: str | None) -> list[StopBook]:
        return [self.stop_books[engine.symbol] for engine in self._engines_for(symbol)]

    def stop_orders(self, user_id: str, symbol: str | None = None) -> list[StopOrder]:
        """``user_id``'s untriggered stop orders (on ``symbol``, or all), newest first."""
        out = [s for book in self._stop_books_for(symbol) for s in book.open_orders(user_id)]
        out.sort(key=lambda s: (s.created_at, s.seq), reverse=True)
        return out

    def cancel_stops(self, user_id: str, symbol: str | None = None) -> list[str]:
        """Cancel ``user_id``'s untriggered stop orders (on ``symbol``, or all); their ids."""
        self._trading()
        now_ms = self.now_ns() // 1_000_000
        return [order_id for book in self._stop_books_for(symbol)
                for order_id in book.cancel_all(user_id, now_ms)]

    def _held(self, user_id: str, order_id: str) -> StopOrder | None:
        """``user_id``'s stop ``order_id`` while its record is the stop book's (not placed)."""
        for book in self.stop_books.values():
            held = book.get(order_id)
            if held is not None and held.user_id == user_id and not held.placed:
                return held
        return None

    def order_of(self, user_id: str, order_id: str) -> EngineOrder | StopOrder | None:
        """``user_id``'s order ``order_id`` (an untriggered stop order too), or None."""
        return self._held(user_id, order_id) or self.get_order(user_id, order_id)

    def order_by_client_oid(self, user_id: str, client_oid: str, symbol: str | None = None
                            ) -> EngineOrder | StopOrder | None:
        """``user_id``'s latest order with ``client_oid`` (stop orders too), active first."""
        found: list[EngineOrder | StopOrder] = []
        order = self.get_by_client_oid(user_id, client_oid, symbol)
        if order is not None:
            found.append(order)
        for book in self._stop_books_for(symbol):
            held = book.by_client_oid(user_id, client_oid)
            if held is not None and not held.placed:
                found.append(held)
        if not found:
            return None
        return max(found, key=lambda o: (o.is_active, o.created_at))

    def cancel_order(self, user_id: str, order_id: str) -> list[str]:
        """Cancel ``user_id``'s order ``order_id``, an untriggered stop order too."""
        self._trading()
        held = self._held(user_id, order_id)
        if held is None:
            return self.cancel(user_id, order_id)
        self.stop_books[held.symbol].cancel(order_id, user_id, self.now_ns() // 1_000_000)
        return [order_id]

    def cancel_order_by_client_oid(self, user_id: str, client_oid: str,
                                   symbol: str | None = None) -> str:
        """Cancel ``user_id``'s order with ``client_oid``, an untriggered stop order too."""
        self._trading()
        for book in self._stop_books_for(symbol):
            held = book.by_client_oid(user_id, client_oid)
            if held is not None and held.is_open:
                book.cancel(held.id, user_id, self.now_ns() // 1_000_000)
                return client_oid
        return self.cancel_by_client_oid(user_id, client_oid, symbol).client_oid

    def order_list(self, user_id: str, *, active: bool, symbol: str | None = None
                   ) -> list[EngineOrder | StopOrder]:
        """``user_id``'s active (or done) orders, newest first: done ones include the stop
        orders canceled before they fired (untriggered ones are :meth:`stop_orders`)."""
        out: list[EngineOrder | StopOrder] = list(self.orders(user_id, active=active,
                                                              symbol=symbol))
        if not active:
            out.extend(s for book in self._stop_books_for(symbol) for s in book.finished(user_id))
            out.sort(key=lambda o: (o.created_at, o.order_time if isinstance(o, EngineOrder)
                                    else 0), reverse=True)
        return out

    def order_api(self, order: EngineOrder | StopOrder) -> dict[str, Any]:
        """The order as ``GET /api/v1/orders/{orderId}`` shows it: a triggered stop order
        keeps its stop fields (and its creation time) in the engine's record."""
        if isinstance(order, StopOrder):
            return order.to_api()
        data = order.to_api()
        book = self.stop_books.get(order.symbol)
        held = None if book is None else book.get(order.id)
        if held is not None and held.placed:
            data.update(held.stop_fields(), createdAt=held.created_at)
        return data

    # ------------------------------------------------------------------ account

    def account_overview(self, user_id: str, currency: str) -> dict[str, Any]:
        """The ``data`` of ``GET /api/v1/account-overview`` for ``user_id`` in ``currency``
        (services.sandbox.account): its starting balance moved by the contracts settled in
        ``currency``, their positions valued at the mark."""
        balances = self.settings.starting_balances
        known = {c.settle_currency for c in CONTRACTS.values()} | set(balances)
        if currency not in known:
            raise RejectError(INVALID_PARAMETER,
                              f"currency {currency} is not supported: one of {sorted(known)}")
        holdings = []
        for symbol, engine in self.engines.items():
            if engine.contract.settle_currency != currency:
                continue
            orders = tuple(OpenOrder(o.remaining_size, o.price, Decimal(o.leverage))
                           for o in engine.active_orders(user_id) if o.price is not None)
            holdings.append(Holding(engine.position_of(user_id), self.mark_price(symbol),
                                    self._leverage.get((user_id, symbol), Decimal(1)), orders))
        return account_overview(currency, balances.get(currency, Decimal(0)), holdings).to_api()
