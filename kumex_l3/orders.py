"""The own-order state machine (pure: no I/O, no clock; time comes in as an argument).

An :class:`OwnOrder` is one order of the user, keyed by the ``clientOid`` chosen
before it was sent (DESIGN.md: the hash ``kumex:{SYM}:order:{clientOid}``). Its
life is driven by the public L3 stream::

    pending ──received──► received ──open──► open ──match──► partially_filled
       │                     │ match (taker)          │ match / done filled
       │                     └────────────────────────┴──► filled | canceled
       └── REST refused / never seen on the stream ──► rejected

* :func:`apply` takes one parsed L3 message (``received`` links the
  ``clientOid`` to the exchange ``orderId``; it routinely arrives before the
  REST reply) and returns a :class:`Transition` saying whether, and what,
  it changed. A message at or below the order's ``last_sequence`` (a replay)
  changes nothing, a trade id already applied changes nothing, and the
  status only moves forward (a late ``open`` after ``done`` does not reopen).
* :func:`rest_refused` (the REST call was refused), :func:`expire_if_unseen`
  (the stream moved past the submission plus a grace without a ``received``),
  :func:`confirm` (the REST reply's orderId) and :func:`reconcile` (the
  exchange's own record, after messages may have been lost) are the other
  ways an order changes.

**Who links a clientOid.** The public stream shows every account's
clientOids, so another account can send an order under one of ours. The order
is linked to an orderId only by the first ``received`` with its clientOid
*after* it was registered (``after_sequence``: the stream's head at
registration), and confirmed by our own account's answers: the REST reply
(:func:`confirm`) or the exchange's record (:func:`reconcile`). A later
``received`` with our clientOid and another orderId is a **conflict**: counted
(``conflicts``), reported (:attr:`Change.CONFLICT`, with the other orderId),
never linked; the caller asks the exchange. A record of our account for this
clientOid with another orderId is the truth: the order is **relinked** to it
and its state rebuilt from the record (:attr:`Change.RELINKED`), whatever it
was, finished or not.

The functions mutate the order they are given and say what they did; a
:class:`Transition` with ``changed`` False means the order is as it was (only
bookkeeping such as ``last_sequence`` may have moved). Exchange strings map to
:class:`OrderStatus` through one table, :data:`EXCHANGE_STATUS`.

After a :func:`reconcile`, the record's ``updatedAt`` (exchange ms) is kept in
``exchange_updated_at``: stream messages at or before it are already part of
the record, so their fills and sizes are not applied a second time (the
monitor reads the record *now*, while it may still be behind in the stream).

**Two sources.** :func:`apply_change` takes an :class:`~kumex_l3.messages.OrderChange`
of the private channel (our account's own word on its order: the orderId, the
filled size and the size still open right after each change). The stream and
the channel tell the same changes, at the same ``ts``, in either order, and
either may lose some. They are merged so that neither counts a fill twice nor
takes a state back:

* the stream adds each fill once by its ``tradeId`` (``trade_ids``); a change
  never adds: it carries the order's cumulative ``filledSize``, and the filled
  size becomes the larger of the two (so a change delivered twice, after a
  reconciliation or after the stream, counts nothing again, and one catches up
  fills the stream lost);
* ``private_ts``: the newest change applied; a stream message at or before it
  is already told (its fill, open or update is not applied again, and its
  trade id is not taken, so that a fill sharing that ``ts`` still counts when
  its own change comes);
* ``event_ts``: the newest ``ts`` applied from either source; a change older
  than it (the stream is ahead), or one that knows fewer fills than we do,
  confirms, links and catches up fills, but does not set the size still open
  back.

At the venue several messages can share one ``ts`` (a taker sweeping makers).
A stream fill at the very ``ts`` of the last change applied counts as told: if
its own change never came, the channel lost it, which only a dropped
connection does; the order monitor then checks every order that was active
when it dropped against the exchange's record, finished or not by then, and a
final record is taken as it is. Told at most late, never twice.

The channel's word links the clientOid with authority (``confirmed_by``
``exchange``); a change naming another orderId for our clientOid **relinks**
the order, as a record of our account does in :func:`reconcile`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

from kumex_l3.messages import (
    Control,
    DataMessage,
    Done,
    Match,
    Open,
    OrderChange,
    Qty,
    Received,
    Update,
    format_qty,
    parse_qty,
)

__all__ = [
    "CLIENT_OID_PATTERN",
    "EXCHANGE_STATUS",
    "HASH_FIELDS",
    "REASON_UNSEEN",
    "TRADE_IDS_KEPT",
    "Change",
    "OrderStatus",
    "OwnOrder",
    "Transition",
    "apply",
    "apply_change",
    "confirm",
    "exchange_status",
    "expire_if_unseen",
    "reconcile",
    "rest_refused",
]

#: What the exchange accepts as a ``clientOid`` (kumex-api.md §6).
CLIENT_OID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,40}")
#: ``reason`` of an order rejected because it never appeared on the stream.
REASON_UNSEEN: Final = "unseen"
#: How many of the latest trade ids an order remembers (idempotence of fills).
TRADE_IDS_KEPT: Final = 32


class OrderStatus(StrEnum):
    """Own-order status, as stored in the hash's ``status`` field."""

    PENDING = "pending"
    RECEIVED = "received"
    OPEN = "open"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    REJECTED = "rejected"

    @property
    def finished(self) -> bool:
        """True for the final statuses: filled, canceled, rejected."""
        return _RANK[self] == _FINAL_RANK


_FINAL_RANK: Final = 4
_RANK: Final[Mapping[OrderStatus, int]] = {
    OrderStatus.PENDING: 0,
    OrderStatus.RECEIVED: 1,
    OrderStatus.OPEN: 2,
    OrderStatus.PARTIALLY_FILLED: 3,
    OrderStatus.FILLED: _FINAL_RANK,
    OrderStatus.CANCELED: _FINAL_RANK,
    OrderStatus.REJECTED: _FINAL_RANK,
}

#: The one table from exchange strings to statuses: the L3 subjects, the ``reason``
#: of ``done``, and the REST record's ``status`` (``done`` is resolved to
#: ``filled`` or ``canceled`` first, see :func:`exchange_status`).
EXCHANGE_STATUS: Final[Mapping[str, OrderStatus]] = {
    "received": OrderStatus.RECEIVED,
    "open": OrderStatus.OPEN,
    "match": OrderStatus.PARTIALLY_FILLED,
    "filled": OrderStatus.FILLED,
    "canceled": OrderStatus.CANCELED,
}


def exchange_status(text: str) -> OrderStatus:
    """The status an exchange string means (:data:`EXCHANGE_STATUS`); ``ValueError`` if none."""
    try:
        return EXCHANGE_STATUS[text]
    except KeyError:
        raise ValueError(f"unknown exchange order status {text!r}") from None


class Change(StrEnum):
    """What a transition did: the ``change`` field of an order event."""

    RECEIVED = "received"
    OPEN = "open"
    FILL = "fill"
    UPDATE = "update"
    DONE = "done"
    REJECTED = "rejected"
    UNSEEN = "unseen"
    RECONCILED = "reconciled"
    #: Our REST reply named the orderId (linked, or confirmed as linked).
    CONFIRMED = "confirmed"
    #: Another order claims our clientOid (``conflictOrderId``): not linked, asked about.
    CONFLICT = "conflict"
    #: Linked to another orderId on our account's own word; the state rebuilt from it.
    RELINKED = "relinked"


#: Hash field names (camelCase, DESIGN.md), in the order :meth:`OwnOrder.to_hash` writes them.
HASH_FIELDS: Final = (
    "clientOid", "orderId", "symbol", "side", "price", "size", "filledSize", "status",
    "reason", "lastSequence", "createdAt", "updatedAt",
    # beyond the documented ones
    "remaining", "submittedAt", "corrected", "exchangeUpdatedAt", "tradeIds", "rev",
    "afterSequence", "conflicts", "confirmedBy", "privateTs", "eventTs",
)
_HASH_FIELD_SET: Final = frozenset(HASH_FIELDS)


@dataclass(slots=True, kw_only=True)
class OwnOrder:
    """One own order. Build a new one with :meth:`new`; read one with :meth:`from_hash`.

    ``size`` is the size asked for; ``remaining`` the size still open (resting,
    or still to be matched): ``size`` at first, then as ``open``, ``update`` and
    ``match`` say, 0 once finished. ``corrected`` counts the reconciliations
    that found the order different from the exchange's record. ``rev`` is the
    revision of the stored hash (optimistic concurrency in the store).
    ``after_sequence``: the stream's head when the order was registered (a
    ``received`` at or below it cannot be ours); ``conflicts``: other orders
    seen claiming this clientOid; ``confirmed_by``: ``rest`` or ``exchange``
    once our account's own answer named the orderId (see the module doc).
    ``private_ts`` and ``event_ts`` (ns): the newest private change applied, and
    the newest ``ts`` applied from either source (see "Two sources").
    ``extra`` holds the hash fields of the caller's own (e.g. a grid level).
    """

    client_oid: str
    symbol: str
    side: str
    price: str
    size: Qty
    remaining: Qty
    order_id: str | None = None
    filled_size: Qty = 0
    status: OrderStatus = OrderStatus.PENDING
    reason: str = ""
    last_sequence: int = 0
    created_at: int = 0
    updated_at: int = 0
    submitted_at: int = 0
    corrected: int = 0
    exchange_updated_at: int = 0
    trade_ids: tuple[str, ...] = ()
    rev: int = 0
    after_sequence: int = 0
    conflicts: int = 0
    confirmed_by: str = ""
    private_ts: int = 0
    event_ts: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        symbol: str,
        client_oid: str,
        *,
        side: str,
        price: str,
        size: Qty | str,
        now_ms: int,
        extra: Mapping[str, str] | None = None,
        after_sequence: int = 0,
    ) -> OwnOrder:
        """A ``pending`` order, registered at ``now_ms`` when the stream's head was
        ``after_sequence``. ``ValueError`` on a bad argument."""
        if not CLIENT_OID_PATTERN.fullmatch(client_oid):
            raise ValueError("clientOid must be 1 to 40 characters of [A-Za-z0-9_-]")
        if side not in ("buy", "sell"):
            raise ValueError(f"side must be buy or sell, not {side!r}")
        qty = parse_qty(size) if isinstance(size, str) else size
        if (isinstance(qty, bool) or not isinstance(qty, int | Decimal)
                or (isinstance(qty, Decimal) and not qty.is_finite()) or not qty > 0):
            raise ValueError(f"size must be a positive number, not {size!r}")
        extra_fields = dict(extra or {})
        clash = _HASH_FIELD_SET.intersection(extra_fields)
        if clash:
            raise ValueError(f"extra fields {sorted(clash)} clash with the order's own fields")
        return cls(
            client_oid=client_oid, symbol=symbol, side=side, price=price, size=qty,
            remaining=qty, created_at=now_ms, updated_at=now_ms, submitted_at=now_ms,
            after_sequence=after_sequence, extra=extra_fields,
        )

    @property
    def finished(self) -> bool:
        """True once filled, canceled or rejected."""
        return self.status.finished

    def to_hash(self) -> dict[str, str]:
        """The Redis hash: every field a string (``orderId`` empty until known)."""
        out = {
            "clientOid": self.client_oid,
            "orderId": self.order_id or "",
            "symbol": self.symbol,
            "side": self.side,
            "price": self.price,
            "size": format_qty(self.size),
            "filledSize": format_qty(self.filled_size),
            "status": self.status.value,
            "reason": self.reason,
            "lastSequence": str(self.last_sequence),
            "createdAt": str(self.created_at),
            "updatedAt": str(self.updated_at),
            "remaining": format_qty(self.remaining),
            "submittedAt": str(self.submitted_at),
            "corrected": str(self.corrected),
            "exchangeUpdatedAt": str(self.exchange_updated_at),
            "tradeIds": ",".join(self.trade_ids),
            "rev": str(self.rev),
            "afterSequence": str(self.after_sequence),
            "conflicts": str(self.conflicts),
            "confirmedBy": self.confirmed_by,
            "privateTs": str(self.private_ts),
            "eventTs": str(self.event_ts),
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_hash(cls, data: Mapping[Any, Any]) -> OwnOrder:
        """The order stored in ``data`` (str or bytes, as Redis returns it).

        Raises ``ValueError`` when a documented field is missing or malformed.
        """
        h = {_text(k): _text(v) for k, v in data.items()}
        try:
            size = parse_qty(h["size"])
            return cls(
                client_oid=h["clientOid"],
                symbol=h["symbol"],
                side=h["side"],
                price=h["price"],
                size=size,
                remaining=parse_qty(h["remaining"], allow_zero=True) if "remaining" in h
                else size,
                order_id=h.get("orderId") or None,
                filled_size=parse_qty(h["filledSize"], allow_zero=True),
                status=OrderStatus(h["status"]),
                reason=h.get("reason", ""),
                last_sequence=int(h["lastSequence"]),
                created_at=int(h["createdAt"]),
                updated_at=int(h["updatedAt"]),
                submitted_at=int(h.get("submittedAt") or h["createdAt"]),
                corrected=int(h.get("corrected") or 0),
                exchange_updated_at=int(h.get("exchangeUpdatedAt") or 0),
                trade_ids=tuple(h["tradeIds"].split(",")) if h.get("tradeIds") else (),
                rev=int(h.get("rev") or 0),
                after_sequence=int(h.get("afterSequence") or 0),
                conflicts=int(h.get("conflicts") or 0),
                confirmed_by=h.get("confirmedBy", ""),
                private_ts=int(h.get("privateTs") or 0),
                event_ts=int(h.get("eventTs") or 0),
                extra={k: v for k, v in h.items() if k not in _HASH_FIELD_SET},
            )
        except KeyError as exc:
            raise ValueError(f"order hash lacks field {exc.args[0]!r}") from None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Transition:
    """What one event did to an order.

    ``changed`` False: nothing a user can see changed (``change`` is None).
    ``fields``: the hash fields whose value changed. ``fill_*`` and
    ``liquidity`` (``maker``/``taker``) describe a ``match`` that was applied.
    ``after``: the order's ``(orderId, status, filledSize, remaining, reason,
    corrected, conflicts)`` right after this transition (None when unchanged):
    several transitions saved together each get an event with their own state,
    not the last one's. ``other_order_id``: for a conflict, the orderId that
    claimed our clientOid; for a relink, the orderId the order was linked to
    before.
    """

    changed: bool
    old_status: OrderStatus
    new_status: OrderStatus
    change: Change | None = None
    sequence: int = 0
    fields: tuple[str, ...] = ()
    fill_qty: Qty = 0
    fill_price: str = ""
    trade_id: str = ""
    liquidity: str = ""
    after: tuple[str | None, OrderStatus, Qty, Qty, str, int, int] | None = None
    other_order_id: str = ""

    @property
    def finished(self) -> bool:
        """True when this transition moved the order into a final status."""
        return self.changed and self.new_status.finished and not self.old_status.finished

    @property
    def linked(self) -> bool:
        """True when this transition made the exchange ``orderId`` known."""
        return "orderId" in self.fields


_Snap = tuple[str | None, OrderStatus, Qty, Qty, str, int, int]
_SNAP_FIELDS: Final = ("orderId", "status", "filledSize", "remaining", "reason", "corrected",
                       "conflicts")


def _snap(order: OwnOrder) -> _Snap:
    return (order.order_id, order.status, order.filled_size, order.remaining, order.reason,
            order.corrected, order.conflicts)


def _finish_transition(
    order: OwnOrder, before: _Snap, change: Change, now_ms: int, sequence: int, **fill: Any
) -> Transition:
    after = _snap(order)
    fields = tuple(name for name, a, b in zip(_SNAP_FIELDS, before, after, strict=True) if a != b)
    if not fields:
        return Transition(False, before[1], order.status, sequence=sequence)
    order.updated_at = now_ms
    return Transition(True, before[1], order.status, change, sequence, fields, after=after,
                      **fill)


def _unchanged(order: OwnOrder, sequence: int = 0) -> Transition:
    return Transition(False, order.status, order.status, sequence=sequence)


def _forward(current: OrderStatus, target: OrderStatus) -> OrderStatus:
    return target if _RANK[target] > _RANK[current] else current


def _concerns(order: OwnOrder, msg: DataMessage) -> bool:
    oid = order.order_id
    if isinstance(msg, Received):
        if msg.client_oid and msg.client_oid == order.client_oid:
            return True  # ours to link, or another order claiming our clientOid
        return oid is not None and msg.order_id == oid
    if oid is None:
        return False
    if isinstance(msg, Match):
        return oid in (msg.maker_order_id, msg.taker_order_id)
    return msg.order_id == oid


def apply(order: OwnOrder, msg: DataMessage | Control, now_ms: int) -> Transition:
    """Apply one L3 message to ``order`` (in place); say what changed.

    Messages about other orders, control frames, and messages at or below
    ``order.last_sequence`` change nothing. A message about this order moves
    ``last_sequence`` forward even when it changes nothing else.
    """
    if isinstance(msg, Control) or msg.symbol != order.symbol:
        return _unchanged(order)
    seq = msg.sequence
    if seq <= order.last_sequence or not _concerns(order, msg):
        return _unchanged(order, seq)
    if isinstance(msg, Received) and msg.client_oid == order.client_oid:
        if order.order_id is None and seq <= order.after_sequence:
            # Before we registered it: someone else's order with this clientOid.
            return _unchanged(order, seq)
        if order.order_id is not None and msg.order_id != order.order_id:
            order.last_sequence = seq  # a replay of it is not a second conflict
            return _conflict(order, msg.order_id, seq, now_ms)
    order.last_sequence = seq
    if order.status.finished:
        return _unchanged(order, seq)
    before = _snap(order)
    # Already part of the exchange record a reconciliation adopted (see module doc).
    covered = order.exchange_updated_at > 0 and msg.ts // 1_000_000 <= order.exchange_updated_at
    # Already told by the private channel (see "Two sources").
    told = msg.ts <= order.private_ts
    order.event_ts = max(order.event_ts, msg.ts)

    if isinstance(msg, Received):
        order.order_id = msg.order_id
        order.status = _forward(order.status, OrderStatus.RECEIVED)
        return _finish_transition(order, before, Change.RECEIVED, now_ms, seq)

    if isinstance(msg, Done):
        if msg.reason == "filled" and order.remaining > 0:
            # What still rested was filled by a match lost in a gap of the stream: the
            # done itself says so (no need to wait for a reconciliation). Never past the
            # size: ``remaining`` may be stale (a lost update); the gap's reconciliation
            # then takes the final record's figure.
            order.filled_size = min(order.filled_size + order.remaining, order.size)
        order.status = exchange_status(msg.reason)
        order.reason = msg.reason
        order.remaining = 0
        return _finish_transition(order, before, Change.DONE, now_ms, seq)

    if isinstance(msg, Open):
        if not covered and not told:
            order.status = _forward(order.status, OrderStatus.OPEN)
            order.remaining = msg.qty
        return _finish_transition(order, before, Change.OPEN, now_ms, seq)

    if isinstance(msg, Update):
        if not covered and not told:
            order.remaining = msg.qty
        return _finish_transition(order, before, Change.UPDATE, now_ms, seq)

    # Match: as maker or as taker.
    if msg.trade_id in order.trade_ids or (told and not covered):
        return _unchanged(order, seq)
    order.trade_ids = (*order.trade_ids, msg.trade_id)[-TRADE_IDS_KEPT:]
    if covered:
        return _unchanged(order, seq)
    maker = msg.maker_order_id == order.order_id
    order.filled_size += msg.qty
    if maker and msg.remain_qty is not None:
        order.remaining = msg.remain_qty
    else:
        order.remaining = max(order.remaining - msg.qty, 0)
    done = order.filled_size >= order.size or (maker and msg.remain_qty == 0)
    order.status = _forward(order.status,
                            OrderStatus.FILLED if done else exchange_status("match"))
    if done:
        order.reason = "filled"
        order.remaining = 0
    return _finish_transition(
        order, before, Change.FILL, now_ms, seq, fill_qty=msg.qty, fill_price=msg.price,
        trade_id=msg.trade_id, liquidity="maker" if maker else "taker")


def _conflict(order: OwnOrder, other: str, sequence: int, now_ms: int) -> Transition:
    """Another order claims our clientOid: counted, reported, never linked."""
    before = _snap(order)
    order.conflicts += 1
    transition = _finish_transition(order, before, Change.CONFLICT, now_ms, sequence)
    return replace(transition, other_order_id=other)


def confirm(order: OwnOrder, order_id: str, now_ms: int) -> Transition:
    """Our REST reply says the order is ``order_id``: link it (the reply came before the
    stream's ``received``), confirm the link, or report a conflict (``other_order_id``:
    the orderId the reply named; the caller then asks the exchange for the record)."""
    if not order_id:
        return _unchanged(order)
    if order.order_id is None:
        before = _snap(order)
        order.order_id = order_id
        order.confirmed_by = "rest"
        if not order.finished:
            order.status = _forward(order.status, OrderStatus.RECEIVED)
        return _finish_transition(order, before, Change.CONFIRMED, now_ms, order.last_sequence)
    if order.order_id == order_id:
        order.confirmed_by = order.confirmed_by or "rest"
        return _unchanged(order)
    return _conflict(order, order_id, order.last_sequence, now_ms)


def rest_refused(order: OwnOrder, code: str, msg: str, now_ms: int) -> Transition:
    """The REST call placing ``order`` was refused (``code``, ``msg``): ``rejected``.

    Only a ``pending`` order can be refused: once the stream has shown it, the
    engine has it, whatever the REST reply said.
    """
    if order.status is not OrderStatus.PENDING:
        return _unchanged(order)
    before = _snap(order)
    order.status = OrderStatus.REJECTED
    order.reason = f"{code} {msg}".strip()[:200]
    order.remaining = 0
    return _finish_transition(order, before, Change.REJECTED, now_ms, order.last_sequence)


def expire_if_unseen(
    order: OwnOrder, stream_time_ms: int, grace_ms: int, *, now_ms: int | None = None
) -> Transition:
    """``rejected`` (reason ``unseen``) if still ``pending`` once the stream is past
    ``submitted_at + grace_ms``: the REST call timed out and the order never
    reached the engine (its ``received`` would be on the stream by then).

    ``stream_time_ms`` is the time of the latest stream entry read (its id's
    ms part), not the wall clock: a monitor that lags expires nothing early.
    ``now_ms`` stamps ``updatedAt`` (default: ``stream_time_ms``).
    """
    if order.status is not OrderStatus.PENDING or stream_time_ms <= order.submitted_at + grace_ms:
        return _unchanged(order)
    before = _snap(order)
    order.status = OrderStatus.REJECTED
    order.reason = REASON_UNSEEN
    order.remaining = 0
    return _finish_transition(order, before, Change.UNSEEN,
                              stream_time_ms if now_ms is None else now_ms, order.last_sequence)


def _record_qty(record: Mapping[str, Any], name: str) -> Qty | None:
    value = record.get(name)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    try:
        return parse_qty(str(value), allow_zero=True)
    except ValueError:
        return None


def reconcile(order: OwnOrder, record: Mapping[str, Any], now_ms: int) -> Transition:
    """Adopt the exchange's record of ``order`` (``GET /api/v1/orders/...`` data).

    Uses ``id``, ``clientOid``, ``status`` (``open``/``done``), ``isActive``,
    ``cancelExist``, ``size``, ``filledSize`` and ``updatedAt``. For an
    unfinished order the status and ``filled_size`` only move forward (an active
    record can lag the stream, never the reverse); a ``done`` record is
    ``canceled`` when ``cancelExist`` (or not fully filled), else ``filled``.
    When anything differed, ``corrected`` is incremented and the transition's
    change is ``reconciled``. A record with another ``clientOid`` changes
    nothing. A record of our account with our clientOid and another ``id`` is
    the truth: the order was linked to someone else's order (see the module
    doc): it is **relinked** and its state taken from the record, finished or
    not (:attr:`Change.RELINKED`). A finished order linked right is corrected
    when the final record disagrees with it, either way (a ``match`` lost in a
    gap before the ``done canceled``, or a ``done filled`` that counted a stale
    open size: a final record is final; nothing on the stream can follow it).
    """
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        return _unchanged(order)
    record_coid = record.get("clientOid")
    if record_coid and record_coid != order.client_oid:
        return _unchanged(order)
    filled = _record_qty(record, "filledSize")
    size = _record_qty(record, "size")
    if filled is None or size is None:
        return _unchanged(order)
    text = record.get("status")
    active = record.get("isActive")
    if text not in ("open", "done"):
        text = "open" if active is True else "done" if active is False else None
    if text is None:
        return _unchanged(order)
    if text == "done":
        canceled = record.get("cancelExist") is True or filled < size
        target = exchange_status("canceled" if canceled else "filled")
    else:
        target = exchange_status("match" if filled > 0 else "open")
    updated = record.get("updatedAt")
    updated_at = updated if isinstance(updated, int) and not isinstance(updated, bool) else 0
    if order.order_id is not None and record_id != order.order_id:
        if record_coid != order.client_oid:
            return _unchanged(order)  # nothing says the record is this order's
        return _relink(order, record_id, target, filled, size, updated_at, now_ms)
    order.confirmed_by = "exchange"
    if order.finished:
        return _reconcile_finished(order, target, filled, updated_at, now_ms)

    before = _snap(order)
    order.order_id = record_id
    order.status = _forward(order.status, target)
    order.filled_size = max(order.filled_size, filled)
    if order.status.finished:
        order.remaining = 0
        order.reason = order.status.value
    else:
        order.remaining = max(size - order.filled_size, 0)
    order.exchange_updated_at = max(order.exchange_updated_at, updated_at)
    # What the record told is newer than any change at or before its time: a private
    # change from then must not set the open size back (see "Two sources").
    order.event_ts = max(order.event_ts, updated_at * 1_000_000)
    if _snap(order) != before:
        order.corrected += 1
    return _finish_transition(order, before, Change.RECONCILED, now_ms, order.last_sequence)


def _relink(order: OwnOrder, record_id: str, target: OrderStatus, filled: Qty, size: Qty,
            updated_at: int, now_ms: int) -> Transition:
    """Linked to someone else's order: ours is ``record_id``; everything from its record."""
    before = _snap(order)
    other = order.order_id or ""
    order.order_id = record_id
    order.status = target
    order.filled_size = filled
    order.remaining = 0 if target.finished else max(size - filled, 0)
    order.reason = target.value if target.finished else ""
    order.trade_ids = ()
    order.exchange_updated_at = updated_at
    # None of the other order's timing: ours starts at what this word of ours told.
    order.private_ts = 0
    order.event_ts = updated_at * 1_000_000
    order.confirmed_by = "exchange"
    order.corrected += 1
    transition = _finish_transition(order, before, Change.RELINKED, now_ms, order.last_sequence)
    return replace(transition, other_order_id=other)


def _reconcile_finished(order: OwnOrder, target: OrderStatus, filled: Qty, updated_at: int,
                        now_ms: int) -> Transition:
    """A finished order: corrected when the exchange's final record disagrees with it.

    The final record is final: its status and ``filled_size`` are taken as they
    are, larger or smaller (a ``done filled`` after a lost ``update`` may have
    counted a stale remaining). A record still active changes nothing (the
    stream said ``done`` for this very orderId).
    """
    if not target.finished:
        return _unchanged(order)
    if target is order.status and filled == order.filled_size:
        return _unchanged(order)
    before = _snap(order)
    if target is not order.status:
        order.status = target
        order.reason = target.value
    order.filled_size = filled
    order.exchange_updated_at = max(order.exchange_updated_at, updated_at)
    order.corrected += 1
    return _finish_transition(order, before, Change.RECONCILED, now_ms, order.last_sequence)


def _change_target(change: OrderChange) -> OrderStatus:
    """The status an order change implies."""
    if change.kind == "filled":
        return OrderStatus.FILLED
    if change.kind == "canceled":
        return OrderStatus.CANCELED
    return OrderStatus.PARTIALLY_FILLED if change.filled > 0 else OrderStatus.OPEN


#: The change an order change is reported as, by its kind.
_CHANGE_OF: Final[Mapping[str, Change]] = {
    "open": Change.OPEN, "match": Change.FILL, "update": Change.UPDATE,
    "filled": Change.DONE, "canceled": Change.DONE,
}


def apply_change(order: OwnOrder, change: OrderChange, now_ms: int) -> Transition:
    """Apply one change of the private channel (our account's word) to ``order``.

    See "Two sources" in the module doc. A change of another clientOid or
    contract changes nothing; one naming another orderId relinks the order. A
    finished order is corrected only by a final change that disagrees with it.
    """
    if change.client_oid != order.client_oid or change.symbol != order.symbol:
        return _unchanged(order)
    target = _change_target(change)
    unseen = order.status is OrderStatus.REJECTED and order.order_id is None
    if unseen or (order.order_id is not None and change.order_id != order.order_id):
        # Linked to someone else's order, or rejected as never seen while the engine had
        # it: our account's word says which order is ours, and its state.
        # Everything from our order's change, nothing from the other account's messages.
        transition = _relink(order, change.order_id, target, change.filled, change.size, 0,
                             now_ms)
        order.private_ts = order.event_ts = change.ts
        if change.trade_id:
            order.trade_ids = (change.trade_id,)
        return transition
    fresh = change.ts >= order.event_ts
    order.private_ts = max(order.private_ts, change.ts)
    order.event_ts = max(order.event_ts, change.ts)
    if order.finished:
        order.confirmed_by = "exchange"
        if not change.final:
            return _unchanged(order)
        return _reconcile_finished(order, target, change.filled, change.ts // 1_000_000, now_ms)
    before = _snap(order)
    order.order_id = change.order_id
    order.confirmed_by = "exchange"
    fill: dict[str, Any] = {}
    # The change's cumulative filled size, never a sum: whatever counted a fill before
    # (the stream, a record, this very change delivered twice), it is counted once.
    filled = max(order.filled_size, change.filled)
    if change.kind == "match" and change.trade_id not in order.trade_ids:
        order.trade_ids = (*order.trade_ids, change.trade_id)[-TRADE_IDS_KEPT:]
        if filled > order.filled_size:
            fill = {"fill_qty": filled - order.filled_size, "fill_price": change.match_price,
                    "trade_id": change.trade_id, "liquidity": change.liquidity}
    order.filled_size = filled
    if change.final:
        order.status = target
        order.reason = target.value
        order.remaining = 0
    else:
        order.status = _forward(order.status, target)
        if fresh and change.filled == filled:
            # The change knows every fill we know, and nothing newer was applied.
            order.remaining = change.remain
        order.remaining = min(order.remaining, max(order.size - filled, 0))
    if _snap(order)[1:] == before[1:]:
        kind = Change.CONFIRMED  # only the link (or nothing) is new
    elif change.kind == "match" and not fill:
        kind = Change.UPDATE  # a fill counted already; the size still open moved
    else:
        kind = _CHANGE_OF[change.kind]
    return _finish_transition(order, before, kind, now_ms, order.last_sequence, **fill)
