"""The own-order state machine against the sandbox engine's own records (the reference).

The engine keeps each order's truth independently of the L3 messages it emits
(``EngineOrder``: status, filled size, cancel flag), so it is a slow, obviously
right reference for :mod:`kumex_l3.orders`. A seeded run mixes the synthetic
flow of other participants with an own user who places limit GTC, IOC,
postOnly and market orders near the touch (own orders often trade with each
other), cancels and amends them. Every engine message goes through
``json.dumps`` -> ``parse_message`` -> :func:`apply` on every own order, as the
order monitor routes them.

* Clean stream, at-least-once: each message may come twice and old ones are
  replayed; after every action each own order equals the engine's record.
* Lossy stream: runs of messages are lost and the stream lags behind the
  exchange; on a sequence jump the monitor's policy applies: reconcile every
  order that was unfinished before the batch that showed the jump, with the
  record read *now* (ahead of the stream). At the end, with the lag drained,
  every own order equals the engine's record.
* The private channel (the engine's own-order changes, through ``json.dumps``
  -> ``parse_order_change`` -> :func:`apply_change`): alone (the public stream
  stopped), every own order equals the engine's record after every action;
  merged with a lossy, lagging stream in any interleaving, with changes
  delivered twice, the channel down for a while (what it would have sent
  lost; at reconnection every order active at the drop is checked, finished or
  not by then) and reconciliations at any time, no
  order ever shows more filled than the engine, no fill is reported twice, and
  at the end every order equals the record.
"""

from __future__ import annotations

import json
import random
from collections import deque
from decimal import Decimal
from typing import Any

import pytest

from kumex_l3.messages import (
    PRIVATE_TOPIC,
    Control,
    DataMessage,
    OrderChange,
    parse_message,
    parse_order_change,
)
from kumex_l3.orders import Change, OrderStatus, OwnOrder, apply, apply_change, reconcile
from services.sandbox.contracts import CONTRACTS
from services.sandbox.engine import EngineOrder, MatchingEngine, OrderRequest, RejectError
from services.sandbox.flow import SyntheticFlow

SYM = "XBTUSDM"
OWN = "own-user"
T0 = 1_700_000_000_000_000_000
#: Engine clock step between actions: 1.3 ms, so that record times (ms) and message
#: times (ns) are not all in one millisecond.
STEP_NS = 1_300_000


def expected(rec: EngineOrder) -> tuple[str, int, int]:
    """(own-order status, filled size, size still resting) that the engine's record implies."""
    api = rec.to_api()
    filled, size = int(api["filledSize"]), int(api["size"])
    if api["isActive"]:
        status = "partially_filled" if filled else "open"
    else:
        status = "canceled" if api["cancelExist"] or filled < size else "filled"
    return status, filled, rec.remaining_size if rec.is_active else 0


def state(order: OwnOrder) -> tuple[str, int, int]:
    return order.status.value, int(order.filled_size), int(order.remaining)


class Market:
    """The engine, the other participants' flow and the own user's random actions."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.engine = MatchingEngine(CONTRACTS[SYM], id_seed=seed, fills_of=(OWN,))
        self.flow = SyntheticFlow({SYM: self.engine}, seed=seed)
        self.flow.prime(T0)
        self.now = T0 + 1
        self.tick = CONTRACTS[SYM].tick_size
        self.own: dict[str, OwnOrder] = {}
        self.records: dict[str, EngineOrder] = {}
        self.next_id = 0

    def _price(self, side: str) -> Decimal:
        mid = self.engine.mid() or Decimal(30000)
        offset = self.rng.randint(-3, 6) * self.tick  # often crossing, often resting
        raw = mid - offset if side == "buy" else mid + offset
        return (raw / self.tick).to_integral_value() * self.tick

    def step(self) -> list[dict[str, Any]]:
        """One action (the flow, or an own place/cancel/amend): the messages it emitted."""
        self.now += STEP_NS
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            return [m for _, msgs in self.flow.step(self.now) for m in msgs]
        active = [r for r in self.records.values() if r.is_active]
        if roll < 0.6 and active:
            return self.engine.cancel(rng.choice(active).id, self.now, OWN)
        if roll < 0.68 and active:
            rec = rng.choice(active)
            if rec.remaining_size > 1:
                return self.engine.amend_size(rec.id, rng.randint(1, rec.remaining_size - 1),
                                              self.now)
        return self._place()

    def _place(self) -> list[dict[str, Any]]:
        rng = self.rng
        self.next_id += 1
        coid = f"o-{self.next_id}"
        side = rng.choice(("buy", "sell"))
        kind = rng.choices(("gtc", "ioc", "post", "market"), weights=(6, 2, 2, 1))[0]
        size = rng.randint(1, 12)
        price = None if kind == "market" else self._price(side)
        req = OrderRequest(user_id=OWN, client_oid=coid, side=side,
                           type="market" if kind == "market" else "limit", price=price,
                           size=size, time_in_force="IOC" if kind == "ioc" else "GTC",
                           post_only=kind == "post")
        # Registered before it is sent, as Trader.place_order does.
        self.own[coid] = OwnOrder.new(SYM, coid, side=side,
                                      price="" if price is None else f"{price:f}",
                                      size=size, now_ms=self.now // 1_000_000)
        try:
            rec, msgs = self.engine.place(req, self.now)
        except RejectError:
            del self.own[coid]  # refused by the REST call: nothing on the stream
            return []
        self.records[coid] = rec
        return msgs

    def apply_all(self, raw: dict[str, Any], *, finished_too: bool = False) -> None:
        """Apply to every unfinished own order (and the finished ones: they must not move)."""
        msg = parsed(raw)
        for order in self.own.values():
            if finished_too or not order.finished:
                apply(order, msg, msg.ts // 1_000_000)


    def changes(self) -> list[OrderChange]:
        """The private channel's changes since the last call, as the wire carries them."""
        out = []
        for user, data in self.engine.take_private():
            assert user == OWN
            change = parse_order_change(json.dumps({
                "type": "message", "topic": PRIVATE_TOPIC, "subject": "orderChange",
                "channelType": "private", "data": data}))
            assert change is not None
            out.append(change)
        return out


def parsed(raw: dict[str, Any]) -> DataMessage:
    msg = parse_message(json.dumps(raw))
    assert not isinstance(msg, Control)
    return msg


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_at_least_once_stream_keeps_every_own_order_equal_to_the_engine(seed: int) -> None:
    market = Market(seed)
    seen: list[dict[str, Any]] = []
    subjects: set[str] = set()
    for _ in range(1500):
        msgs = market.step()
        for raw in msgs:
            market.apply_all(raw)
            if market.rng.random() < 0.2:
                market.apply_all(raw)  # delivered twice
            if seen and market.rng.random() < 0.05:
                # An old one replayed.
                market.apply_all(market.rng.choice(seen), finished_too=True)
            seen.append(raw)
            if raw["data"].get("clientOid", "").startswith("o-") or any(
                    raw["data"].get(k) in {r.id for r in market.records.values()}
                    for k in ("orderId", "makerOrderId", "takerOrderId")):
                subjects.add(raw["subject"])
        for coid, order in market.own.items():
            assert state(order) == expected(market.records[coid]), coid
    # The run covered what own orders go through, self-trades included.
    assert subjects == {"received", "open", "update", "match", "done"}
    statuses = {o.status for o in market.own.values()}
    assert {OrderStatus.FILLED, OrderStatus.CANCELED} <= statuses
    ids = {r.id for r in market.records.values()}
    self_trades = [m for m in seen if m["subject"] == "match"
                   and m["data"]["makerOrderId"] in ids and m["data"]["takerOrderId"] in ids]
    assert self_trades
    assert sum(1 for r in market.records.values() if r.filled_size and r.cancel_exist) > 0


@pytest.mark.parametrize("seed", [21, 22, 23, 24])
def test_lost_messages_and_reconciliation_end_equal_to_the_engine(seed: int) -> None:
    market = Market(seed)
    rng = market.rng
    lag: deque[dict[str, Any]] = deque()  # emitted, not yet read by the monitor
    last_seq: int | None = None
    lost = reconciled = corrected = late_fixes = 0

    def read_batch(n: int) -> None:
        nonlocal last_seq, reconciled, corrected, late_fixes
        batch = [lag.popleft() for _ in range(min(n, len(lag)))]
        # Unfinished before the batch: what the monitor's reconciliation covers.
        unfinished = {c for c, o in market.own.items() if not o.finished}
        gap = False
        for raw in batch:
            seq = raw["data"]["sequence"]
            if last_seq is not None and seq > last_seq + 1:
                gap = True
            last_seq = max(seq, last_seq or seq)
            market.apply_all(raw)
        if gap:
            reconciled += 1
            for coid in unfinished | {c for c, o in market.own.items() if not o.finished}:
                rec = market.records.get(coid)
                if rec is None:
                    continue
                finished_in_batch = market.own[coid].finished
                # Read now: the exchange is ahead of the stream.
                changed = reconcile(market.own[coid], rec.to_api(),
                                    market.now // 1_000_000).changed
                corrected += changed
                late_fixes += changed and finished_in_batch

    for _ in range(2500):
        msgs = market.step()
        partial = _own_partial_fill(market, msgs)
        if partial is not None and rng.random() < 0.5:
            # The gap swallows an own order's partial fill, and the same batch then
            # carries its cancel: the order is finished when the loss shows.
            index, coid = partial
            lag.extend(msgs[:index] + msgs[index + 1:])
            lag.extend(market.engine.cancel(market.records[coid].id, market.now, OWN))
            lost += 1
            read_batch(len(lag))
            continue
        if msgs and rng.random() < 0.06:
            cut = rng.randint(1, len(msgs))
            msgs = msgs[cut:]  # a run lost in a gap
            lost += 1
        lag.extend(msgs)
        if rng.random() < 0.3:
            read_batch(rng.randint(1, 40))
    while lag:
        read_batch(40)
    # The last loss may have had no message after it to show the jump: the feed's
    # reconnection (ctl=connected) would; reconcile as the monitor then does.
    for coid, order in market.own.items():
        if not order.finished:
            reconcile(order, market.records[coid].to_api(), market.now // 1_000_000)
    for coid, order in market.own.items():
        assert state(order) == expected(market.records[coid]), coid
    assert lost > 20 and reconciled > 10 and corrected > 0 and late_fixes > 0


def _own_partial_fill(market: Market, msgs: list[dict[str, Any]]) -> tuple[int, str] | None:
    """A match (not the last message) leaving an own resting order partly filled."""
    by_id = {r.id: c for c, r in market.records.items()}
    for i, raw in enumerate(msgs[:-1]):
        if raw["subject"] != "match":
            continue
        coid = by_id.get(raw["data"]["makerOrderId"])
        if coid is not None and market.records[coid].is_active:
            return i, coid
    return None


@pytest.mark.parametrize("seed", [31, 32])
def test_private_channel_alone_keeps_every_own_order_equal_to_the_engine(seed: int) -> None:
    """The public stream stopped: only the private channel tells the monitor."""
    market = Market(seed)
    kinds: set[str] = set()
    for _ in range(1500):
        market.step()
        for change in market.changes():
            kinds.add(change.kind)
            transition = apply_change(market.own[change.client_oid], change,
                                      change.ts // 1_000_000)
            assert transition.change is not Change.RELINKED
        for coid, order in market.own.items():
            assert state(order) == expected(market.records[coid]), coid
            assert order.order_id == market.records[coid].id
    assert kinds == {"open", "match", "filled", "canceled", "update"}


@pytest.mark.parametrize("seed", [41, 42, 43, 44])
def test_stream_and_private_channel_merged_in_any_order_never_count_a_fill_twice(
        seed: int) -> None:
    market = Market(seed)
    rng = market.rng
    stream: deque[dict[str, Any]] = deque()
    private: deque[OrderChange] = deque()
    reported: dict[str, int] = {}  # fill sizes reported per clientOid, both sources
    lost = from_stream = from_private = dup = reconciled = reconnects = 0

    def note(coid: str, transition: Any, source: str) -> None:
        nonlocal from_stream, from_private
        if transition.change is Change.FILL:
            reported[coid] = reported.get(coid, 0) + int(transition.fill_qty)
            if source == "stream":
                from_stream += 1
            else:
                from_private += 1

    def read_stream(n: int) -> None:
        for _ in range(min(n, len(stream))):
            msg = parsed(stream.popleft())
            for coid, order in market.own.items():
                note(coid, apply(order, msg, msg.ts // 1_000_000), "stream")

    def read_private(n: int) -> None:
        nonlocal dup
        for _ in range(min(n, len(private))):
            change = private.popleft()
            order = market.own[change.client_oid]
            note(change.client_oid, apply_change(order, change, change.ts // 1_000_000),
                 "private")
            if rng.random() < 0.1:  # delivered twice
                dup += 1
                note(change.client_oid, apply_change(order, change, change.ts // 1_000_000),
                     "private")

    def reconcile_unfinished(also: set[str] | None = None) -> None:
        """What the monitor does after a gap or a (re)connection of the channel: every
        unfinished own order (and ``also``, finished or not by now) against its record,
        read now (ahead of both sources)."""
        nonlocal reconciled
        for coid, order in market.own.items():
            if not order.finished or coid in (also or ()):
                reconcile(order, market.records[coid].to_api(), market.now // 1_000_000)
                reconciled += 1

    dropped: set[str] = set()  # active when the channel dropped: checked at reconnection
    reconnect_in = 0

    for _ in range(2500):
        msgs = market.step()
        if msgs and rng.random() < 0.08:
            start = rng.randrange(len(msgs))
            del msgs[start:start + rng.randint(1, 6)]  # a run lost in a gap
            lost += 1
        stream.extend(msgs)
        changes = market.changes()
        if reconnect_in:
            # The channel is down: what it would have sent is lost; the stream goes on.
            changes = []
            reconnect_in -= 1
            if not reconnect_in:
                reconcile_unfinished(dropped)
                dropped = set()
        elif changes and rng.random() < 0.03:
            # The connection drops mid-step; it comes back some steps later, and then
            # every order active at the drop is checked, finished or not by then.
            del changes[rng.randrange(len(changes)):]
            reconnects += 1
            dropped = {c for c, o in market.own.items() if not o.finished}
            reconnect_in = rng.randint(1, 30)
        elif rng.random() < 0.02:
            reconcile_unfinished()  # a gap on the stream showed
        private.extend(changes)
        # Either source may run ahead of the other, by any amount.
        if rng.random() < 0.35:
            read_stream(rng.randint(1, 40))
        if rng.random() < 0.35:
            read_private(rng.randint(1, 20))
        for coid, order in market.own.items():
            rec = market.records[coid]
            assert order.filled_size <= rec.filled_size, coid
            # Fills reported as such (a done that says "filled" after a lost match
            # reports the rest as part of its state, not as a fill).
            assert reported.get(coid, 0) <= order.filled_size, coid
    while stream or private:
        read_stream(rng.randint(1, 40))
        read_private(rng.randint(1, 20))
    reconcile_unfinished(dropped)  # the last loss may have had nothing after it to show it
    for coid, order in market.own.items():
        assert state(order) == expected(market.records[coid]), coid
        assert reported.get(coid, 0) <= market.records[coid].filled_size, coid
    # Most fills were told as fills (reconciliations, reading ahead, take the rest).
    assert sum(reported.values()) > 0.75 * sum(r.filled_size for r in market.records.values())
    assert lost > 50 and from_stream > 20 and from_private > 20 and dup > 20
    assert reconnects > 10 and reconciled > 100
