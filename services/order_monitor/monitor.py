"""One symbol's consumer: L3 stream entries in, own-order changes out (Redis).

:class:`SymbolMonitor` reads ``kumex:{SYM}:l3`` through the consumer group
(``MONITOR_GROUP``) while its replica holds the symbol's lease, so exactly one
consumer applies a symbol's messages, in stream order.

**Group start id.** The group is created at ``0`` (``XGROUP CREATE ... 0
MKSTREAM``), not ``$``: the strategy may register and send orders before the
monitor ever ran, and with ``$`` the messages written before the group existed
would be lost to it. Reading the retained history once is cheap (foreign
messages are skipped without a full parse) and harmless (each order hash
remembers the last sequence applied).

**Start.** Ensure the group; load the index of active orders; claim the
pending entries of every other consumer of the group (``XAUTOCLAIM``: they
belong to a previous owner that died, the lease says nobody else reads this
symbol), then read this consumer's pending entries (``XREADGROUP`` from ``0``)
and handle them again, idempotently; then new entries (``>``) in batches.

**A batch** costs at most: one ``SMISMEMBER`` (which ``received`` clientOids
are registered: active-set members), one pipelined ``HGETALL`` of the own
orders involved, one pipeline of save scripts (:func:`order_store.save_many`),
one ``XACK``, after the writes. Messages are first *peeked* (a msgspec decode
of the few fields needed: subject, sequence, the ids); only messages about own
orders are parsed in full. Own orders are recognised by clientOid on
``received`` and by orderId (an in-memory index, rebuilt from Redis every
``MONITOR_REFRESH_S``) on the others.

**Loss.** A ``ctl=gap`` or ``ctl=connected`` entry, or a jump in sequence
between consecutive messages, means messages may be missing. The highest
sequence seen is kept by a :class:`~kumex_l3.sequence.SequenceGuard`: a message
whose sequence is implausibly far from it (a corrupt or forged ``2**63 - 1``)
is skipped and counted, and never moves it, so that gap detection cannot be
silenced by one frame. When messages may be missing, every order of
the symbol that was active when it showed is reconciled with the exchange
(``GET /api/v1/orders/{orderId}``, or ``byClientOid`` while the orderId is
unknown), including those the batch finished (one may have lost a fill: its
final record corrects ``filledSize``); orders registered later are not (their
messages come after the marker). It runs before the batch is acknowledged (at
most one reconciliation a second: one owed meanwhile runs right after); a
failure is retried with backoff. Since the exchange's record is read *now*,
while the monitor may still be behind in the stream, fills at or before the
record's ``updatedAt`` are not applied again (:mod:`kumex_l3.orders`). Peeking
costs about 0.25 µs a message against 1.1 µs for a full parse (measured on the
synthetic stream). Orders still ``pending`` once the stream time (the ms part
of the entry ids) is past their submission plus ``MONITOR_UNSEEN_GRACE_MS``
are asked for by clientOid (when the exchange is reachable), then rejected as
``unseen``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from kumex_l3 import keys, order_store
from kumex_l3.backoff import Backoff
from kumex_l3.errors import KumexError, LeaseLost, MessageError
from kumex_l3.logs import kv
from kumex_l3.messages import Control, DataMessage, parse_message
from kumex_l3.orders import (
    Change,
    OrderStatus,
    OwnOrder,
    Transition,
    apply,
    expire_if_unseen,
    reconcile,
)
from kumex_l3.redis_adapter import stream_id_ms
from kumex_l3.rest import ExchangeOrder
from kumex_l3.sequence import SequenceGuard, Verdict
from services.order_monitor.metrics import MonitorMetrics
from services.order_monitor.settings import MonitorSettings

__all__ = ["LeaseLost", "OrderLookup", "SymbolMonitor"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Approximate bound of the DLQ entries this service adds.
_DLQ_MAXLEN: Final = 10_000
#: Saves retried when the hash changed under us (another writer) before giving up.
_SAVE_ATTEMPTS: Final = 4
_GAP_CTLS: Final = frozenset({"gap", "connected"})
#: An entry pending this long for another consumer is a straggler of a previous owner.
_STRAGGLER_IDLE_MS: Final = 2000
#: Reconciliations are at least this far apart (a feed reconnecting in a loop, or
#: history full of ``ctl=connected``, must not flood the exchange): one owed meanwhile
#: runs at the first housekeeping after the interval.
_RECONCILE_MIN_INTERVAL_S: Final = 1.0


class OrderLookup(Protocol):
    """The exchange's own records of orders (:class:`kumex_l3.rest.KumexRestClient`)."""

    async def get_order(self, order_id: str) -> ExchangeOrder | None:
        """``GET /api/v1/orders/{orderId}``; None when unknown."""

    async def get_order_by_client_oid(self, client_oid: str,
                                      symbol: str | None = None) -> ExchangeOrder | None:
        """``GET /api/v1/orders/byClientOid``; None when unknown."""


class _PeekData(msgspec.Struct, rename="camel", gc=False):
    sequence: int = -1
    order_id: str = ""
    client_oid: str | None = None
    maker_order_id: str = ""
    taker_order_id: str = ""


class _Peek(msgspec.Struct, gc=False):
    type: str = ""
    subject: str = ""
    data: _PeekData | None = None


_PEEK: Final = msgspec.json.Decoder(_Peek)


@dataclass(slots=True)
class _Item:
    """One data entry, peeked."""

    entry_id: str
    raw: bytes | str
    subject: str
    sequence: int
    order_id: str
    client_oid: str
    maker: str
    taker: str


def _s(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _field(fields: Mapping[Any, Any], name: str) -> Any:
    value = fields.get(name.encode())
    return fields.get(name) if value is None else value


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _entries(response: Any) -> list[tuple[str, Mapping[Any, Any] | None]]:
    """The entries of an XREADGROUP reply (RESP2: ``[[stream, [(id, fields), ...]]]``)."""
    if not response:
        return []
    return [(_s(entry_id), fields) for _, batch in response for entry_id, fields in batch]


class SymbolMonitor:
    """The consumer of one symbol (see the module docstring). :meth:`run` until cancelled.

    ``lookup`` is the exchange (None: no credentials, no reconciliation, unseen
    orders rejected without asking). ``holds`` says whether the lease is still
    held (checked before each batch). ``clock_ms`` stamps ``updatedAt``.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        symbol: str,
        settings: MonitorSettings,
        metrics: MonitorMetrics,
        lookup: OrderLookup | None = None,
        *,
        holds: Callable[[], bool] = lambda: True,
        clock_ms: Callable[[], int] = _wall_ms,
        fence: order_store.Fence | None = None,
    ) -> None:
        self.redis = redis
        #: Every save is fenced by this lease (key, value) on the server: a monitor paused
        #: past its lease writes nothing (and stops: :class:`LeaseLost`).
        self.fence = fence
        self.symbol = symbol
        self.settings = settings
        self.metrics = metrics
        self.lookup = lookup
        self._holds = holds
        self._clock_ms = clock_ms
        self.stream = keys.l3_stream(symbol)
        self.group = settings.group
        self.consumer = settings.consumer
        #: Exchange orderId -> clientOid of the active own orders.
        self.by_oid: dict[str, str] = {}
        #: clientOid -> submittedAt of the own orders still pending.
        self.pending: dict[str, int] = {}
        #: Highest plausible sequence read (see the module docstring).
        self.sequences = SequenceGuard()
        #: The ms part of the latest entry id read: the stream's clock.
        self.stream_ms = 0
        #: True once the group exists and the pending entries were handled again.
        self.ready = False
        #: True while a reconciliation is owed (after a gap, or at start).
        self.reconcile_due = False
        self._retry_at = 0.0
        self._last_reconcile = float("-inf")
        self._retry = Backoff(initial=1.0, factor=2.0, max_delay=30.0)
        self._next_refresh = 0.0
        self._labels = {"symbol": symbol}
        #: clientOids to reconcile: unfinished when a loss showed. An order registered
        #: after that cannot have lost a message (its own come after the marker).
        self._recheck: set[str] = set()
        #: Every active own order is owed a reconciliation (at start), not only those.
        self._recheck_all = False

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Start (group, index, pending entries), then consume new entries forever."""
        await self.start()
        while True:
            await self.step()

    async def start(self) -> None:
        """Everything before the first new entry: see the module docstring."""
        await self.ensure_group()
        await self.refresh()
        if self.settings.reconcile_on_start and self.lookup is not None:
            self.reconcile_due = self._recheck_all = True
        await self.take_over_pending()
        await self.reprocess_pending()
        await self.maybe_reconcile()
        self.ready = True
        log.info("consuming", extra=kv(symbol=self.symbol, group=self.group,
                                       consumer=self.consumer, active=len(self.pending)
                                       + len(set(self.by_oid.values()))))

    async def step(self) -> int:
        """Read and handle one batch of new entries (blocking up to ``block_ms``), then
        housekeeping; returns the number of entries read."""
        if not self._holds():
            # Never read past the lease: entries read are this consumer's to handle, and
            # a resumed old owner would take them from the new one.
            raise LeaseLost(self.symbol)
        response = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.settings.batch_size,
            block=self.settings.block_ms)
        entries = _entries(response)
        if entries:
            await self.handle(entries)
        await self.housekeeping()
        return len(entries)

    async def ensure_group(self) -> None:
        """``XGROUP CREATE <stream> <group> 0 MKSTREAM`` unless it exists."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def take_over_pending(self, min_idle_ms: int = 0) -> int:
        """Claim every pending entry of the group (a dead owner's) for this consumer;
        forget consumers left with nothing pending. Returns the entries claimed.

        ``min_idle_ms``: only entries delivered at least that long ago (while
        consuming: a previous owner paused in a blocking read was handed entries
        after this replica took over; they are claimed here, never lost).
        """
        claimed = 0
        start: bytes | str = "0-0"
        while True:
            response = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=min_idle_ms,
                start_id=start, count=self.settings.batch_size)
            claimed += len(response[1])
            start = response[0]
            if _s(start) == "0-0":
                break
        for consumer in await self.redis.xinfo_consumers(self.stream, self.group):
            name = _s(consumer["name"])
            if name != self.consumer and int(consumer["pending"]) == 0:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)
        if claimed:
            log.info("pending entries taken over", extra=kv(symbol=self.symbol,
                                                            entries=claimed))
        return claimed

    async def reprocess_pending(self) -> int:
        """Handle again this consumer's pending entries, oldest first; returns their count."""
        last = "0"
        total = 0
        while True:
            response = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: last}, count=self.settings.batch_size)
            entries = _entries(response)
            if not entries:
                return total
            await self.handle(entries)
            total += len(entries)
            last = entries[-1][0]

    # ------------------------------------------------------------------ one batch

    async def handle(self, entries: Sequence[tuple[str, Mapping[Any, Any] | None]]) -> None:
        """Apply a batch to the own orders, reconcile on loss, then ``XACK`` it."""
        if not self._holds():
            raise LeaseLost(self.symbol)
        if self._opens_with_a_gap(entries) and await self._stragglers_first():
            return  # handled, with the entries a previous owner was handed, in stream order
        started = time.perf_counter()
        items, causes = self._scan(entries)
        if causes:
            # Unfinished before the batch (the active set, of which the index is a part):
            # one the batch finishes (a done canceled after a lost match) is reconciled
            # too, against the exchange's final record.
            self._recheck.update(await order_store.active(self.redis, self.symbol))
        own = await self._own(items)
        if own:
            await self._apply(own)
        if causes:
            for cause in causes:
                self.metrics.gaps.labels(self.symbol, cause).inc()
            log.warning("messages may be missing: reconciling",
                        extra=kv(symbol=self.symbol, causes=",".join(sorted(set(causes)))))
            self.reconcile_due = True
            await self.maybe_reconcile()
        await self.redis.xack(self.stream, self.group, *(eid for eid, _ in entries))
        self.metrics.read.labels(self.symbol).inc(len(entries))
        self.metrics.batch_seconds.labels(self.symbol).observe(time.perf_counter() - started)

    def _opens_with_a_gap(self, entries: Sequence[tuple[str, Mapping[Any, Any] | None]]
                          ) -> bool:
        """The batch's first message is beyond the next sequence (nothing changed)."""
        for _, fields in entries:
            raw = _field(fields, keys.FIELD_MSG) if fields else None
            if raw is None:
                continue
            try:
                data = _PEEK.decode(raw).data
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                return False
            return data is not None and self.sequences.classify(data.sequence) is Verdict.GAP
        return False

    async def _stragglers_first(self) -> bool:
        """Entries another consumer of the group still holds come before this batch.

        A previous owner paused in a blocking read is handed the entries written
        meanwhile (Redis serves a blocked read at once), so this replica's next
        batch starts after them: a gap that is not one. While the lease is ours no
        other consumer may keep entries: they are claimed and, with the batch
        (pending too), handled again in stream order. ``True`` if there were any.
        """
        summary = await self.redis.xpending(self.stream, self.group)
        others = [c for c in summary.get("consumers") or ()
                  if _s(c["name"]) != self.consumer and int(c["pending"]) > 0]
        if not others or not await self.take_over_pending():
            return False
        self.metrics.gaps.labels(self.symbol, "straggler").inc()
        await self.reprocess_pending()
        return True

    def _scan(self, entries: Sequence[tuple[str, Mapping[Any, Any] | None]]
              ) -> tuple[list[_Item], list[str]]:
        items: list[_Item] = []
        causes: list[str] = []
        for entry_id, fields in entries:
            ms = stream_id_ms(entry_id)
            if ms > self.stream_ms:
                self.stream_ms = ms
            if not fields:  # trimmed away while pending
                continue
            ctl = _field(fields, keys.FIELD_CTL)
            if ctl is not None:
                ctl_text = _s(ctl)
                if ctl_text in _GAP_CTLS:
                    causes.append(ctl_text)
                continue
            raw = _field(fields, keys.FIELD_MSG)
            if raw is None:
                self.metrics.invalid.labels(self.symbol).inc()
                continue
            try:
                peek = _PEEK.decode(raw)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                self.metrics.invalid.labels(self.symbol).inc()
                continue
            data = peek.data
            if peek.type != "message" or data is None:
                continue
            seq = data.sequence
            if seq >= 0:
                verdict = self.sequences.check(seq)
                if verdict is Verdict.IMPLAUSIBLE:
                    self.metrics.implausible.labels(self.symbol).inc()
                    log.warning("message skipped: implausible sequence", extra=kv(
                        symbol=self.symbol, entry=entry_id, sequence=seq,
                        position=self.sequences.position))
                    continue
                if verdict is Verdict.GAP or verdict is Verdict.REBASE:
                    causes.append("sequence")
            items.append(_Item(entry_id, raw, peek.subject, seq, data.order_id,
                               data.client_oid or "", data.maker_order_id, data.taker_order_id))
        return items, causes

    async def _own(self, items: Sequence[_Item]) -> list[tuple[_Item, tuple[str, ...]]]:
        """The items about own orders, each with the clientOid(s) it concerns."""
        candidates = list({it.client_oid for it in items
                           if it.subject == "received" and it.client_oid})
        registered: set[str] = set()
        if candidates:
            flags = await self.redis.smismember(keys.orders_active(self.symbol), candidates)
            registered = {c for c, flag in zip(candidates, flags, strict=True) if flag}
        by_oid = self.by_oid
        out: list[tuple[_Item, tuple[str, ...]]] = []
        for it in items:
            subject = it.subject
            if subject == "match":
                maker, taker = by_oid.get(it.maker), by_oid.get(it.taker)
                if maker or taker:
                    out.append((it, tuple(c for c in (maker, taker) if c)))
                continue
            coid = by_oid.get(it.order_id)
            if coid is None and subject == "received" and it.client_oid in registered:
                # Tentative: dropped again below if the order does not take it.
                by_oid[it.order_id] = coid = it.client_oid
            if coid is not None:
                out.append((it, (coid,)))
        return out

    async def _apply(self, own: Sequence[tuple[_Item, tuple[str, ...]]]) -> None:
        messages: dict[str, list[tuple[str, DataMessage]]] = defaultdict(list)
        for it, coids in own:
            try:
                msg = parse_message(it.raw)
            except MessageError as exc:
                await self._dead_letter(it, exc.reason)
                continue
            if isinstance(msg, Control):
                continue
            for coid in coids:
                messages[coid].append((it.entry_id, msg))
        self.metrics.own.labels(self.symbol).inc(len(own))
        orders = await order_store.load_many(self.redis, self.symbol, list(messages))
        now = self._clock_ms()
        todo = {c: m for c, m in messages.items() if c in orders}
        for _ in range(_SAVE_ATTEMPTS):
            batch: list[tuple[OwnOrder, list[tuple[Transition, str | None]]]] = []
            for coid, msgs in todo.items():
                order = orders[coid]
                steps: list[tuple[Transition, str | None]] = []
                for entry_id, msg in msgs:
                    transition = apply(order, msg, now)
                    if transition.changed:
                        steps.append((transition, entry_id))
                if steps:
                    batch.append((order, steps))
            stale = await self._save(batch)
            if not stale:
                break
            todo = await self._reload_stale(orders, todo, stale)
        else:
            raise RuntimeError(f"{self.symbol}: own orders kept changing while being saved")
        # Index: what the orders are now; tentative links that did not take are dropped.
        for order in orders.values():
            self.track(order)
        for it, coids in own:
            if it.subject == "received" and self.by_oid.get(it.order_id) == coids[0]:
                linked = orders.get(coids[0])
                if linked is None or linked.order_id != it.order_id:
                    del self.by_oid[it.order_id]

    async def _save(self, batch: list[tuple[OwnOrder, list[tuple[Transition, str | None]]]]
                    ) -> list[str]:
        """Save ``batch`` in one round trip; the clientOids whose hash changed meanwhile."""
        if not batch:
            return []
        batch.sort(key=lambda item: item[1][0][0].sequence)
        try:
            written = await order_store.save_many(
                self.redis, batch, finished_ttl_s=self.settings.finished_ttl_s,
                events_maxlen=self.settings.events_maxlen, fence=self.fence,
                writer=self.consumer)
        except order_store.Fenced:
            self.metrics.fenced.labels(self.symbol).inc()
            log.warning("the lease is not ours any more: nothing written",
                        extra=kv(symbol=self.symbol))
            raise LeaseLost(self.symbol) from None
        stale = []
        for (order, steps), ok in zip(batch, written, strict=True):
            if not ok:
                stale.append(order.client_oid)
                continue
            for transition, _ in steps:
                assert transition.change is not None
                self.metrics.changes.labels(self.symbol, transition.change.value).inc()
                if transition.change is Change.CONFLICT or transition.change is Change.RELINKED:
                    self.contested(order, transition)
        return stale

    def contested(self, order: OwnOrder, transition: Transition) -> None:
        """Another order claimed our clientOid, or ours was relinked: say so; ask the exchange
        (a conflict is resolved by our account's own record, :func:`kumex_l3.orders.reconcile`).
        """
        if transition.change is Change.CONFLICT:
            self.metrics.clientoid_conflicts.labels(self.symbol).inc()
            log.warning("another order claims our clientOid: not linked, asking the exchange",
                        extra=kv(symbol=self.symbol, clientOid=order.client_oid,
                                 orderId=order.order_id, other=transition.other_order_id,
                                 sequence=transition.sequence))
            self._recheck.add(order.client_oid)
            self.reconcile_due = True
        else:
            self.metrics.relinked.labels(self.symbol).inc()
            if self.by_oid.get(transition.other_order_id) == order.client_oid:
                del self.by_oid[transition.other_order_id]  # someone else's order
            log.warning("our order was linked to someone else's: relinked from our "
                        "account's word (its record or its private channel)",
                        extra=kv(symbol=self.symbol, clientOid=order.client_oid,
                                 orderId=order.order_id, was=transition.other_order_id))

    async def _reload_stale(self, orders: dict[str, OwnOrder], todo: Mapping[str, _T],
                            stale: list[str]) -> dict[str, _T]:
        """After a save lost to another writer: reload the ``stale`` orders into ``orders``.

        Returns what is left of ``todo`` to apply again (orders gone meanwhile are dropped).
        """
        self.metrics.conflicts.labels(self.symbol).inc(len(stale))
        reloaded = await order_store.load_many(self.redis, self.symbol, stale)
        orders.update(reloaded)
        return {c: todo[c] for c in stale if c in reloaded}

    def track(self, order: OwnOrder) -> None:
        """Keep the in-memory index of ``order`` current (its orderId while active, its
        clientOid while pending)."""
        coid = order.client_oid
        if order.finished:
            if order.order_id and self.by_oid.get(order.order_id) == coid:
                del self.by_oid[order.order_id]
            self.pending.pop(coid, None)
            return
        if order.order_id:
            self.by_oid[order.order_id] = coid
        if order.status is OrderStatus.PENDING:
            self.pending[coid] = order.submitted_at
        else:
            self.pending.pop(coid, None)

    async def _dead_letter(self, it: _Item, reason: str) -> None:
        self.metrics.invalid.labels(self.symbol).inc()
        log.warning("own message refused", extra=kv(symbol=self.symbol, entry=it.entry_id,
                                                    reason=reason))
        await self.redis.xadd(
            keys.dlq(self.symbol),
            {"raw": it.raw, "reason": reason, "streamId": it.entry_id,
             "source": "order_monitor"},
            maxlen=_DLQ_MAXLEN, approximate=True)

    # ------------------------------------------------------------------ housekeeping

    async def housekeeping(self) -> None:
        """Refresh the index (every ``refresh_s``), owed reconciliation, unseen expiry."""
        now = time.monotonic()
        if now >= self._next_refresh:
            await self.refresh()
            self._next_refresh = now + self.settings.refresh_s
            await self._claim_stragglers()
        await self.maybe_reconcile()
        await self.expire_unseen()

    def recheck(self, client_oids: Iterable[str] | None = None) -> None:
        """Owe these orders (default: every one active now) a check against the exchange,
        finished or not by the time it runs (changes of them may have been lost)."""
        if client_oids is None:
            client_oids = {*self.by_oid.values(), *self.pending}
        self._recheck.update(client_oids)
        self.reconcile_due = True

    def owe_reconciliation(self) -> None:
        """Every active own order is owed a check against the exchange (changes of the
        private channel were lost while it was down): done at the next housekeeping."""
        self.reconcile_due = self._recheck_all = True

    async def _claim_stragglers(self) -> None:
        """Entries a paused previous owner was handed after this replica took over: claim
        and handle them. They come after messages already applied to the same orders,
        which a replay at a lower sequence would not correct: reconcile every order."""
        idle = max(2 * self.settings.block_ms, _STRAGGLER_IDLE_MS)
        if not await self.take_over_pending(min_idle_ms=idle):
            return
        self.metrics.gaps.labels(self.symbol, "straggler").inc()
        await self.reprocess_pending()
        self.reconcile_due = self._recheck_all = True

    async def refresh(self) -> None:
        """Rebuild the orderId index and the pending list from Redis; update the gauges."""
        coids = await order_store.active(self.redis, self.symbol)
        by_oid: dict[str, str] = {}
        pending: dict[str, int] = {}
        if coids:
            pipe = self.redis.pipeline(transaction=False)
            for coid in coids:
                pipe.hmget(keys.order(self.symbol, coid), ["orderId", "status", "submittedAt"])
            rows: list[Any] = await pipe.execute()
            for coid, (oid, status, submitted) in zip(coids, rows, strict=True):
                if status is None:
                    continue
                if oid:
                    by_oid[_s(oid)] = coid
                if _s(status) == OrderStatus.PENDING.value:
                    pending[coid] = int(_s(submitted or b"0"))
        self.by_oid, self.pending = by_oid, pending
        self.metrics.active.labels(self.symbol).set(len(coids))
        for group in await self.redis.xinfo_groups(self.stream):
            if _s(group["name"]) == self.group and group.get("lag") is not None:
                self.metrics.lag.labels(self.symbol).set(int(group["lag"]))

    async def maybe_reconcile(self) -> bool:
        """Reconcile if owed and not backing off; True when done (or nothing to do)."""
        if not self.reconcile_due:
            return True
        if self.lookup is None:
            log.warning("reconciliation needed but no API credentials are configured",
                        extra=kv(symbol=self.symbol))
            self.reconcile_due = False
            return False
        now = time.monotonic()
        if now < self._retry_at or now - self._last_reconcile < _RECONCILE_MIN_INTERVAL_S:
            return False
        try:
            await self.reconcile_all()
        except LeaseLost:
            raise  # not a failure of the exchange: this replica must stop
        except KumexError as exc:
            self.metrics.reconcile_errors.labels(self.symbol).inc()
            delay = self._retry.next_delay()
            self._retry_at = time.monotonic() + delay
            log.warning("reconciliation failed, will retry",
                        extra=kv(symbol=self.symbol, error=str(exc), retry_s=round(delay, 2)))
            return False
        self._retry.reset()
        self.reconcile_due = False
        self._last_reconcile = time.monotonic()
        return True

    async def reconcile_all(self) -> int:
        """Check every active own order against the exchange; returns the corrections.

        Raises a :class:`~kumex_l3.errors.KumexError` when the exchange cannot be asked.
        """
        lookup = self.lookup
        if lookup is None:
            return 0
        recheck = set(self._recheck)
        everything = self._recheck_all
        if everything:
            recheck |= set(await order_store.active(self.redis, self.symbol))
        coids = sorted(recheck)
        orders = await order_store.load_many(self.redis, self.symbol, coids)
        records = await self._fetch(lookup, list(orders.values()))
        now = self._clock_ms()
        corrections = 0
        todo = {c: r for c, r in records.items() if r is not None}
        for _ in range(_SAVE_ATTEMPTS):
            batch: list[tuple[OwnOrder, list[tuple[Transition, str | None]]]] = []
            for coid, record in todo.items():
                transition = reconcile(orders[coid], record.raw, now)
                if transition.changed:
                    batch.append((orders[coid], [(transition, None)]))
            stale = await self._save(batch)
            corrections += len(batch) - len(stale)
            if not stale:
                break
            todo = await self._reload_stale(orders, todo, stale)
        for order in orders.values():
            self.track(order)
        self._recheck -= recheck
        if everything:
            self._recheck_all = False
        self.metrics.reconciliations.labels(self.symbol).inc(len(orders))
        self.metrics.corrections.labels(self.symbol).inc(corrections)
        log.info("reconciled", extra=kv(symbol=self.symbol, orders=len(orders),
                                        corrected=corrections))
        return corrections

    async def _fetch(self, lookup: OrderLookup, orders: Sequence[OwnOrder]
                     ) -> dict[str, ExchangeOrder | None]:
        """The exchange's record of each order (None: unknown to it), a few at a time."""
        gate = asyncio.Semaphore(self.settings.reconcile_concurrency)
        out: dict[str, ExchangeOrder | None] = {}

        async def one(order: OwnOrder) -> None:
            async with gate:
                record = None
                if order.order_id:
                    record = await lookup.get_order(order.order_id)
                if record is None:
                    # Unknown orderId: not our account's order (someone else's took our
                    # clientOid), or none yet: our account's order with this clientOid.
                    record = await lookup.get_order_by_client_oid(order.client_oid,
                                                                  self.symbol)
            if record is not None and record.symbol != self.symbol:
                record = None
            out[order.client_oid] = record

        try:
            async with asyncio.TaskGroup() as tasks:
                for order in orders:
                    tasks.create_task(one(order))
        except BaseExceptionGroup as group:
            # One failed lookup cancels the others; surface the first error as is.
            raise group.exceptions[0] from None
        return out

    async def expire_unseen(self) -> int:
        """Reject the pending orders the stream has passed without a ``received``."""
        grace = self.settings.unseen_grace_ms
        due = [c for c, submitted in self.pending.items() if self.stream_ms > submitted + grace]
        if not due or time.monotonic() < self._retry_at:
            return 0
        orders = await order_store.load_many(self.redis, self.symbol, due)
        for coid in due:
            if coid not in orders:
                self.pending.pop(coid, None)
        records: dict[str, ExchangeOrder | None] = {}
        waiting = [o for o in orders.values() if o.status is OrderStatus.PENDING]
        if self.lookup is not None and waiting:
            # The REST reply may have been lost while the order went through: ask first.
            try:
                records = await self._fetch(self.lookup, waiting)
            except KumexError as exc:
                self.metrics.reconcile_errors.labels(self.symbol).inc()
                self._retry_at = time.monotonic() + self._retry.next_delay()
                log.warning("cannot ask the exchange about unseen orders, will retry",
                            extra=kv(symbol=self.symbol, error=str(exc)))
                return 0
        now = self._clock_ms()
        batch: list[tuple[OwnOrder, list[tuple[Transition, str | None]]]] = []
        for order in waiting:
            record = records.get(order.client_oid)
            if record is not None:
                transition = reconcile(order, record.raw, now)
                self.metrics.reconciliations.labels(self.symbol).inc()
            else:
                transition = expire_if_unseen(order, self.stream_ms, grace, now_ms=now)
            if transition.changed:
                batch.append((order, [(transition, None)]))
        stale = set(await self._save(batch))  # a concurrent writer: next round sees it
        rejected = 0
        for order, steps in batch:
            if order.client_oid in stale:
                continue
            if steps[0][0].change is Change.UNSEEN:
                rejected += 1
                log.warning("order never seen on the stream: rejected",
                            extra=kv(symbol=self.symbol, clientOid=order.client_oid))
            else:
                self.metrics.corrections.labels(self.symbol).inc()
            self.track(order)
        for order in orders.values():
            if order.status is not OrderStatus.PENDING:
                self.track(order)
        self.metrics.rejected_unseen.labels(self.symbol).inc(rejected)
        return rejected
