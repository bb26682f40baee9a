"""The own-order state machine (kumex_l3.orders): every transition, idempotence, reconcile."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from kumex_l3.errors import MessageError
from kumex_l3.messages import (
    PRIVATE_TOPIC,
    Control,
    DataMessage,
    OrderChange,
    parse_message,
    parse_order_change,
)
from kumex_l3.orders import (
    EXCHANGE_STATUS,
    HASH_FIELDS,
    REASON_UNSEEN,
    TRADE_IDS_KEPT,
    Change,
    OrderStatus,
    OwnOrder,
    apply,
    apply_change,
    confirm,
    exchange_status,
    expire_if_unseen,
    reconcile,
    rest_refused,
)

SYM = "XBTUSDM"
OID = "629727c9edde6b0001f422a7"
OTHER = "629727c9edde6b0001f40000"
T0 = 1_654_073_289_000  # ms
NS = 1_000_000


def raw(subject: str, seq: int, **data: Any) -> DataMessage:
    data.setdefault("ts", (T0 + seq) * NS)
    body = {"type": "message", "topic": f"/contractMarket/level3v2:{SYM}", "subject": subject,
            "data": {"symbol": SYM, "sequence": seq, **data}}
    msg = parse_message(json.dumps(body))
    assert not isinstance(msg, Control)
    return msg


def received(seq: int, oid: str = OID, coid: str = "c1") -> DataMessage:
    return raw("received", seq, orderId=oid, clientOid=coid)


def opened(seq: int, size: int, oid: str = OID, price: str = "31570.0") -> DataMessage:
    return raw("open", seq, side="buy", price=price, size=str(size), orderId=oid,
               orderTime=(T0 + seq) * NS)


def update(seq: int, size: int, oid: str = OID) -> DataMessage:
    return raw("update", seq, orderId=oid, size=str(size))


def match(seq: int, size: int, *, maker: str = OID, taker: str = OTHER, trade: str = "",
          side: str = "sell", remain: int | None = None) -> DataMessage:
    extra = {} if remain is None else {"remainSize": str(remain)}
    return raw("match", seq, side=side, price="31570.0", size=str(size), makerOrderId=maker,
               takerOrderId=taker, tradeId=trade or f"t{seq}", **extra)


def done(seq: int, reason: str, oid: str = OID) -> DataMessage:
    return raw("done", seq, orderId=oid, reason=reason)


def new(size: int = 10, coid: str = "c1", now: int = T0) -> OwnOrder:
    return OwnOrder.new(SYM, coid, side="buy", price="31570.0", size=size, now_ms=now)


def run(order: OwnOrder, *msgs: DataMessage) -> list[Any]:
    return [apply(order, m, T0 + 1000 + i) for i, m in enumerate(msgs)]


# ------------------------------------------------------------------ construction, hash


def test_new_order_is_pending_with_everything_at_zero() -> None:
    o = new()
    assert o.status is OrderStatus.PENDING
    assert (o.order_id, o.filled_size, o.remaining, o.last_sequence) == (None, 0, 10, 0)
    assert o.created_at == o.updated_at == o.submitted_at == T0
    assert not o.finished


@pytest.mark.parametrize("kwargs", [
    {"client_oid": "has space"}, {"client_oid": "x" * 41}, {"client_oid": ""},
    {"side": "long"}, {"size": 0}, {"size": -1}, {"size": Decimal("NaN")}, {"size": True},
    {"size": "abc"}, {"extra": {"status": "x"}},
])
def test_new_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"client_oid": "c1", "side": "buy", "size": 1, "extra": None}
    args.update(kwargs)
    with pytest.raises(ValueError):
        OwnOrder.new(SYM, args.pop("client_oid"), price="1", now_ms=0, **args)


def test_hash_round_trip_is_exact_and_camel_case() -> None:
    o = OwnOrder.new(SYM, "grid-1_a", side="sell", price="31570.5", size=Decimal("2.5"),
                     now_ms=T0, extra={"level": "3"})
    run(o, received(5, coid="grid-1_a"), match(6, 1, taker=OID, maker=OTHER, side="sell"))
    o.corrected, o.exchange_updated_at, o.rev = 2, T0 + 9, 7
    h = o.to_hash()
    assert list(h)[:12] == ["clientOid", "orderId", "symbol", "side", "price", "size",
                            "filledSize", "status", "reason", "lastSequence", "createdAt",
                            "updatedAt"]
    assert set(HASH_FIELDS) <= set(h) and h["level"] == "3"
    assert all(isinstance(v, str) for v in h.values())
    assert h["size"] == "2.5" and h["filledSize"] == "1" and h["status"] == "partially_filled"
    back = OwnOrder.from_hash({k.encode(): v.encode() for k, v in h.items()})
    assert back == o
    assert back.to_hash() == h
    assert OwnOrder.from_hash(new().to_hash()) == new()


def test_from_hash_reports_a_missing_field() -> None:
    h = new().to_hash()
    del h["status"]
    with pytest.raises(ValueError, match="status"):
        OwnOrder.from_hash(h)


def test_exchange_table_maps_every_exchange_string() -> None:
    assert exchange_status("filled") is OrderStatus.FILLED
    assert exchange_status("canceled") is OrderStatus.CANCELED
    assert exchange_status("open") is OrderStatus.OPEN
    assert set(EXCHANGE_STATUS.values()) <= set(OrderStatus)
    with pytest.raises(ValueError):
        exchange_status("cancelled")


# ------------------------------------------------------------------ L3 transitions


def test_maker_life_received_open_partial_fill_filled() -> None:
    o = new(10)
    t = run(o, received(100), opened(101, 10), match(102, 4), match(103, 6), done(104, "filled"))
    assert [x.change for x in t] == [Change.RECEIVED, Change.OPEN, Change.FILL, Change.FILL, None]
    assert [x.new_status for x in t] == [OrderStatus.RECEIVED, OrderStatus.OPEN,
                                         OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED,
                                         OrderStatus.FILLED]
    assert t[0].linked and o.order_id == OID
    assert t[2].liquidity == "maker" and t[2].fill_qty == 4 and t[2].trade_id == "t102"
    assert t[3].finished and not t[4].changed
    assert (o.filled_size, o.remaining, o.reason, o.last_sequence) == (10, 0, "filled", 104)


def test_received_before_rest_reply_links_the_order_id() -> None:
    o = new()
    t = apply(o, received(7), T0 + 5)
    assert t.changed and t.linked and t.fields == ("orderId", "status")
    assert (o.order_id, o.status, o.updated_at) == (OID, OrderStatus.RECEIVED, T0 + 5)


def test_received_of_another_client_oid_is_ignored_a_second_order_id_is_a_conflict() -> None:
    o = new()
    assert not apply(o, received(7, coid="someone-else"), T0).changed
    assert o.last_sequence == 0  # not about this order: untouched
    apply(o, received(8), T0)
    t = apply(o, received(9, oid=OTHER), T0)  # the same clientOid on another order
    assert t.changed and t.change is Change.CONFLICT and t.other_order_id == OTHER
    assert (o.order_id, o.status, o.conflicts) == (OID, OrderStatus.RECEIVED, 1)
    assert t.fields == ("conflicts",)
    assert not apply(o, received(9, oid=OTHER), T0).changed  # a replay: not a second one
    # Finished, our clientOid reused by someone: still reported, still not linked.
    run(o, done(10, "canceled"))
    late = apply(o, received(11, oid="f" * 24), T0)
    assert late.change is Change.CONFLICT and o.order_id == OID and o.conflicts == 2


def test_a_received_before_the_registration_is_not_ours() -> None:
    """Someone else used the clientOid before we registered it (a guess, or a reuse):
    that ``received`` cannot be ours; the first one after the registration is."""
    o = OwnOrder.new(SYM, "c1", side="buy", price="31570.0", size=10, now_ms=T0,
                     after_sequence=50)
    assert not apply(o, received(50, oid=OTHER), T0).changed
    assert o.order_id is None and o.status is OrderStatus.PENDING
    t = apply(o, received(51), T0)
    assert t.change is Change.RECEIVED and o.order_id == OID


def test_the_rest_reply_links_confirms_or_conflicts() -> None:
    first = new()
    t = confirm(first, OID, T0)
    assert t.change is Change.CONFIRMED and first.order_id == OID
    assert (first.status, first.confirmed_by) == (OrderStatus.RECEIVED, "rest")
    assert not apply(first, received(3), T0).changed  # the stream agrees: nothing new
    later = new()
    apply(later, received(3), T0)
    assert not confirm(later, OID, T0).changed and later.confirmed_by == "rest"
    hijacked = new()
    apply(hijacked, received(3, oid=OTHER), T0)  # linked by the stream to someone else's
    t = confirm(hijacked, OID, T0)
    assert t.change is Change.CONFLICT and t.other_order_id == OID
    assert hijacked.order_id == OTHER  # until the exchange's record says (reconcile)


def test_received_without_client_oid_links_nothing() -> None:
    o = new()
    assert not apply(o, raw("received", 3, orderId=OID), T0).changed
    assert o.order_id is None


def test_taker_fills_count() -> None:
    o = new(10)
    t = run(o, received(1), match(2, 3, maker=OTHER, taker=OID, side="buy"),
            match(3, 7, maker="m2", taker=OID, side="buy"), done(4, "filled"))
    assert t[1].liquidity == "taker" and t[1].new_status is OrderStatus.PARTIALLY_FILLED
    assert t[2].new_status is OrderStatus.FILLED and t[2].finished
    assert (o.filled_size, o.remaining) == (10, 0)


def test_taker_partial_fill_then_rests_keeps_partially_filled() -> None:
    o = new(10)
    run(o, received(1), match(2, 4, maker=OTHER, taker=OID), opened(3, 6))
    assert o.status is OrderStatus.PARTIALLY_FILLED and o.remaining == 6


def test_ioc_taker_partial_then_canceled_keeps_filled_size() -> None:
    o = new(10)
    t = run(o, received(1), match(2, 4, maker=OTHER, taker=OID), done(3, "canceled"))
    assert t[2].change is Change.DONE and t[2].finished
    assert (o.status, o.filled_size, o.remaining, o.reason) == (
        OrderStatus.CANCELED, 4, 0, "canceled")


def test_refused_at_once_received_then_done_canceled() -> None:
    o = new()
    run(o, received(1), done(2, "canceled"))
    assert o.status is OrderStatus.CANCELED and o.filled_size == 0


def test_update_changes_resting_size_and_a_reduced_order_fills_on_done() -> None:
    o = new(10)
    t = run(o, received(1), opened(2, 10), update(3, 7), match(4, 7, remain=0))
    assert t[2].change is Change.UPDATE and t[2].fields == ("remaining",)
    assert o.status is OrderStatus.FILLED  # remainSize 0: nothing left
    o2 = new(10)
    run(o2, received(1), opened(2, 10), update(3, 7), match(4, 7), done(5, "filled"))
    assert (o2.status, o2.filled_size, o2.remaining) == (OrderStatus.FILLED, 7, 0)


def test_update_to_the_same_size_changes_nothing() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10))
    t = apply(o, update(3, 10), T0)
    assert not t.changed and o.last_sequence == 3


def test_cancel_keeps_filled_size() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 4), done(4, "canceled"))
    assert (o.status, o.filled_size, o.remaining) == (OrderStatus.CANCELED, 4, 0)


def test_messages_about_other_orders_change_nothing() -> None:
    o = new()
    run(o, received(1), opened(2, 10))
    before = o.to_hash()
    t = run(o, opened(3, 5, oid=OTHER), match(4, 5, maker=OTHER, taker="x"),
            done(5, "filled", oid=OTHER), update(6, 1, oid=OTHER))
    assert not any(x.changed for x in t) and o.to_hash() == before


def test_messages_before_the_order_id_is_known_are_not_ours() -> None:
    o = new()
    assert not apply(o, opened(2, 10), T0).changed
    assert o.status is OrderStatus.PENDING


# ------------------------------------------------------------------ idempotence


def test_replaying_every_message_changes_nothing() -> None:
    msgs = [received(10), opened(11, 10), match(12, 3), update(13, 5), match(14, 2),
            done(15, "canceled")]
    o = new(10)
    run(o, *msgs)
    state = o.to_hash()
    for m in msgs:
        assert not apply(o, m, T0 + 99_999).changed
    assert o.to_hash() == state
    # A replay in a fresh copy loaded mid-way applies only what is past its sequence.
    half = new(10)
    run(half, *msgs[:3])
    copy = OwnOrder.from_hash(half.to_hash())
    run(copy, *msgs)
    assert (copy.filled_size, copy.status) == (5, OrderStatus.CANCELED)


def test_duplicate_trade_id_with_a_new_sequence_counts_once() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 4, trade="T"))
    t = apply(o, match(9, 4, trade="T"), T0)
    assert not t.changed and o.filled_size == 4


def test_trade_ids_kept_are_bounded() -> None:
    o = new(10_000)
    run(o, received(1), opened(2, 10_000))
    run(o, *(match(10 + i, 1) for i in range(TRADE_IDS_KEPT + 5)))
    assert len(o.trade_ids) == TRADE_IDS_KEPT and o.trade_ids[-1] == f"t{10 + TRADE_IDS_KEPT + 4}"


def test_status_only_moves_forward_late_open_after_done() -> None:
    o = new(10)
    run(o, received(1), done(3, "canceled"))
    t = apply(o, opened(4, 10), T0)  # a newer sequence, but the order is finished
    assert not t.changed and o.status is OrderStatus.CANCELED and o.remaining == 0
    o2 = new(10)
    run(o2, received(1), opened(2, 10), match(3, 2))
    assert not apply(o2, received(4), T0).changed  # the same received again, newer seq
    assert o2.status is OrderStatus.PARTIALLY_FILLED


def test_done_twice_and_match_after_done_change_nothing() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10), done(3, "filled"))
    assert not apply(o, done(4, "canceled"), T0).changed
    assert not apply(o, match(5, 3), T0).changed
    assert o.status is OrderStatus.FILLED and o.filled_size == 10


def test_done_filled_counts_what_rested_when_its_match_was_lost() -> None:
    # A gap swallowed the last match: "filled" still means all of it filled.
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 4), done(5, "filled"))  # match 4 lost
    assert (o.status, o.filled_size, o.remaining) == (OrderStatus.FILLED, 10, 0)
    o2 = new(10)
    run(o2, received(1), opened(2, 10), update(3, 7), done(5, "filled"))  # reduced to 7
    assert (o2.status, o2.filled_size) == (OrderStatus.FILLED, 7)


def test_control_and_other_symbol_change_nothing() -> None:
    o = new()
    assert not apply(o, parse_message('{"type":"pong","id":"1"}'), T0).changed
    other = parse_message(json.dumps({"type": "message", "subject": "received", "data": {
        "symbol": "XBTUSDTM", "sequence": 5, "orderId": OID, "clientOid": "c1", "ts": 1}}))
    assert not apply(o, other, T0).changed and o.order_id is None


# ------------------------------------------------------------------ REST refusal, unseen


def test_rest_refused_rejects_a_pending_order_only() -> None:
    o = new()
    t = rest_refused(o, "300018", "duplicate clientOid", T0 + 3)
    assert t.changed and t.finished and t.change is Change.REJECTED
    assert (o.status, o.reason, o.remaining, o.updated_at) == (
        OrderStatus.REJECTED, "300018 duplicate clientOid", 0, T0 + 3)
    seen = new()
    apply(seen, received(1), T0)
    assert not rest_refused(seen, "500000", "internal", T0).changed
    assert seen.status is OrderStatus.RECEIVED


def test_expire_if_unseen_uses_stream_time_and_grace() -> None:
    o = new(now=T0)
    assert not expire_if_unseen(o, T0 + 10_000, 10_000).changed  # not past yet
    t = expire_if_unseen(o, T0 + 10_001, 10_000)
    assert t.changed and t.change is Change.UNSEEN and t.finished
    assert (o.status, o.reason, o.updated_at) == (OrderStatus.REJECTED, REASON_UNSEEN, T0 + 10_001)
    # Once rejected, a late received does not resurrect it.
    assert not apply(o, received(50), T0).changed and o.order_id is None


def test_expire_if_unseen_leaves_seen_orders_alone() -> None:
    o = new(now=T0)
    apply(o, received(1), T0)
    assert not expire_if_unseen(o, T0 + 10**9, 10_000).changed


# ------------------------------------------------------------------ reconcile


def record(**fields: Any) -> dict[str, Any]:
    base = {"id": OID, "symbol": SYM, "clientOid": "c1", "size": 10, "filledSize": 0,
            "status": "open", "isActive": True, "cancelExist": False, "updatedAt": T0 + 500}
    base.update(fields)
    return base


def test_reconcile_matching_record_changes_nothing() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 4))
    t = reconcile(o, record(filledSize=4), T0 + 9)
    assert not t.changed and o.corrected == 0


def test_reconcile_missed_fills_marks_corrected() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10))
    t = reconcile(o, record(filledSize=6), T0 + 9)
    assert t.changed and t.change is Change.RECONCILED
    assert (o.status, o.filled_size, o.remaining, o.corrected) == (
        OrderStatus.PARTIALLY_FILLED, 6, 4, 1)
    assert "filledSize" in t.fields and "corrected" in t.fields


def test_reconcile_pending_order_whose_received_was_lost() -> None:
    o = new(10)
    t = reconcile(o, record(), T0 + 9)
    assert t.linked and o.order_id == OID and o.status is OrderStatus.OPEN and o.corrected == 1


def test_reconcile_done_records() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 2))
    t = reconcile(o, record(status="done", isActive=False, cancelExist=True, filledSize=5), T0)
    assert t.finished and (o.status, o.filled_size, o.remaining, o.reason) == (
        OrderStatus.CANCELED, 5, 0, "canceled")
    o2 = new(10)
    run(o2, received(1))
    reconcile(o2, record(status="done", isActive=False, filledSize=10), T0)
    assert o2.status is OrderStatus.FILLED and o2.filled_size == 10
    o3 = new(10)  # status missing: isActive decides; a done short of its size was canceled
    run(o3, received(1))
    reconcile(o3, record(status=None, isActive=False, filledSize=3), T0)
    assert o3.status is OrderStatus.CANCELED and o3.filled_size == 3


def test_reconcile_never_moves_backwards() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 6))
    t = reconcile(o, record(filledSize=2), T0)  # a lagging record
    assert o.status is OrderStatus.PARTIALLY_FILLED and o.filled_size == 6
    assert not t.changed


def test_reconcile_ignores_foreign_and_unreadable_records() -> None:
    o2 = new(10)
    run(o2, received(1))
    assert not reconcile(o2, record(clientOid="someone", filledSize=3), T0).changed
    assert not reconcile(o2, record(id=OTHER, clientOid="", filledSize=3), T0).changed
    assert not reconcile(o2, record(filledSize="x"), T0).changed
    assert o2.filled_size == 0 and o2.order_id == OID


def test_a_finished_order_is_not_settled_while_the_exchange_disagrees() -> None:
    o = new(10)
    run(o, received(1), done(2, "canceled"))
    t = reconcile(o, record(filledSize=10, status="done", isActive=False), T0)
    assert t.changed and (o.status, o.filled_size, o.corrected) == (OrderStatus.FILLED, 10, 1)
    assert not reconcile(o, record(filledSize=10, status="done", isActive=False), T0).changed
    # An active record cannot be right about an order the stream finished by its own id.
    assert not reconcile(o, record(filledSize=3), T0).changed


def test_an_order_linked_to_someone_elses_is_relinked_from_our_record() -> None:
    """The hijack: another account's IOC took our clientOid first and was canceled; ours
    was filled. Our account's record (same clientOid, our id) relinks it, finished or not,
    and the whole state comes from the record."""
    o = new(10)
    run(o, received(1, oid=OTHER), done(2, "canceled", oid=OTHER))
    assert (o.order_id, o.status) == (OTHER, OrderStatus.CANCELED)
    ours = record(status="done", isActive=False, filledSize=10)
    t = reconcile(o, ours, T0 + 9)
    assert t.change is Change.RELINKED and t.other_order_id == OTHER and t.linked
    assert (o.order_id, o.status, o.filled_size, o.remaining, o.confirmed_by) == (
        OID, OrderStatus.FILLED, 10, 0, "exchange")
    # Still open at the exchange: open again here, with what it filled.
    o2 = new(10)
    run(o2, received(1, oid=OTHER), done(2, "canceled", oid=OTHER))
    reconcile(o2, record(filledSize=4), T0 + 9)
    assert (o2.order_id, o2.status, o2.filled_size, o2.remaining) == (
        OID, OrderStatus.PARTIALLY_FILLED, 4, 6)


def test_reconcile_raises_the_fill_of_an_order_canceled_after_a_lost_match() -> None:
    # match(3, 2) seen, match(4, 3) lost in a gap, then done canceled: the hash says 2.
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 2), done(5, "canceled"))
    assert (o.status, o.filled_size) == (OrderStatus.CANCELED, 2)
    final = record(status="done", isActive=False, cancelExist=True, filledSize=5)
    t = reconcile(o, final, T0 + 9)
    assert t.changed and t.change is Change.RECONCILED and not t.finished  # finished before
    assert (o.status, o.filled_size, o.remaining, o.corrected) == (
        OrderStatus.CANCELED, 5, 0, 1)
    assert "filledSize" in t.fields
    # The same record again changes nothing.
    assert not reconcile(o, final, T0 + 10).changed
    # A finished order never changes on a record still active (the stream saw its done).
    assert not reconcile(o, record(status="open", isActive=True, filledSize=7), T0).changed
    assert o.status is OrderStatus.CANCELED and o.filled_size == 5


def test_a_final_record_with_less_corrects_a_done_filled_that_counted_a_stale_remaining(
        ) -> None:
    # 4 filled, then an update to 3 lost in a gap: the done filled adds the 6 it believed
    # still open (at most the size); the final record says 7, and it is final.
    o = new(10)
    run(o, received(1), opened(2, 10), match(3, 4), done(5, "filled"))
    assert (o.status, o.filled_size) == (OrderStatus.FILLED, 10)
    t = reconcile(o, record(status="done", isActive=False, filledSize=7, size=7), T0 + 9)
    assert t.changed and (o.status, o.filled_size, o.corrected) == (OrderStatus.FILLED, 7, 1)


def test_after_reconcile_messages_already_in_the_record_are_not_applied_twice() -> None:
    o = new(10)
    run(o, received(1), opened(2, 10))
    # The record (read now) already holds a fill whose match the monitor has not read yet.
    reconcile(o, record(filledSize=4, updatedAt=T0 + 500), T0 + 600)
    assert o.filled_size == 4
    old = raw("match", 3, side="sell", price="31570.0", size="4", makerOrderId=OID,
              takerOrderId=OTHER, tradeId="A", ts=(T0 + 500) * NS)
    assert not apply(o, old, T0).changed and o.filled_size == 4
    new_fill = raw("match", 4, side="sell", price="31570.0", size="1", makerOrderId=OID,
                   takerOrderId=OTHER, tradeId="B", ts=(T0 + 501) * NS)
    assert apply(o, new_fill, T0).changed and o.filled_size == 5
    assert apply(o, done(5, "canceled"), T0).finished


def test_reconcile_accepts_decimal_and_text_numbers() -> None:
    o = new(10)
    run(o, received(1))
    reconcile(o, record(size=Decimal(10), filledSize="3"), T0)
    assert o.filled_size == 3 and o.remaining == 7


# ------------------------------------------------------------------ the private channel


def change(kind: str, seq: int, *, filled: int, remain: int, size: int = 10, oid: str = OID,
           coid: str = "c1", trade: str = "", match_size: int = 0) -> OrderChange:
    """The private channel's change at the ``ts`` of stream message ``seq``."""
    data: dict[str, Any] = {
        "orderId": oid, "symbol": SYM, "type": kind,
        "status": "done" if kind in ("filled", "canceled") else "open",
        "orderType": "limit", "side": "buy", "price": "31570.0", "size": str(size),
        "remainSize": str(remain), "filledSize": str(filled), "canceledSize": "0",
        "clientOid": coid, "orderTime": T0 * NS, "ts": (T0 + seq) * NS}
    if kind == "match":
        data.update(matchSize=str(match_size), matchPrice="31570.0",
                    tradeId=trade or f"t{seq}", liquidity="maker")
    parsed = parse_order_change(json.dumps({"type": "message", "topic": PRIVATE_TOPIC,
                                            "subject": "orderChange", "data": data}))
    assert parsed is not None
    return parsed


def test_a_private_change_links_and_confirms_the_order_before_the_stream() -> None:
    o = new()
    t = apply_change(o, change("open", 2, filled=0, remain=10), T0 + 5)
    assert (t.change, o.order_id, o.status, o.confirmed_by) == (
        Change.OPEN, OID, OrderStatus.OPEN, "exchange")
    # The stream's own messages of the same changes then change nothing.
    assert [r.changed for r in run(o, received(1), opened(2, 10))] == [False, False]


def test_a_fill_counts_once_whichever_source_brings_it_first() -> None:
    o = new()
    run(o, received(1), opened(2, 10))
    apply_change(o, change("match", 3, filled=4, remain=6, match_size=4), T0)
    assert not run(o, match(3, 4))[0].changed
    run(o, match(4, 3))
    assert not apply_change(o, change("match", 4, filled=7, remain=3, match_size=3), T0).changed
    assert (o.filled_size, o.remaining) == (7, 3)


def test_a_change_older_than_the_stream_does_not_set_the_open_size_back() -> None:
    o = new()
    run(o, received(1), opened(2, 10), update(3, 6))
    assert not apply_change(o, change("open", 2, filled=0, remain=10), T0).changed
    assert (o.remaining, o.status) == (6, OrderStatus.OPEN)


def test_stream_messages_the_private_channel_told_are_not_applied_again() -> None:
    """More fills than the trade ids kept: the private channel's ``ts`` covers them."""
    n = TRADE_IDS_KEPT + 8
    o = new(size=n + 1)
    apply_change(o, change("open", 2, filled=0, remain=n + 1, size=n + 1), T0)
    for i in range(n):
        apply_change(o, change("match", 3 + i, filled=i + 1, remain=n - i, size=n + 1,
                               match_size=1), T0)
    assert o.filled_size == n
    run(o, received(1), opened(2, n + 1), *(match(3 + i, 1) for i in range(n)))
    assert (o.filled_size, o.remaining) == (n, 1)
    run(o, match(3 + n, 1), done(4 + n, "filled"))
    assert (o.filled_size, o.status) == (n + 1, OrderStatus.FILLED)


def test_a_change_catches_up_fills_the_stream_lost() -> None:
    o = new()
    run(o, received(1), opened(2, 10), match(5, 2))  # the match at 3 (3 lots) was lost
    t = apply_change(o, change("match", 5, filled=5, remain=5, match_size=2), T0)
    assert (t.changed, o.filled_size) == (True, 5)  # t5's 2 lots were counted once
    t = apply_change(o, change("canceled", 6, filled=5, remain=0), T0)
    assert (t.change, o.status, o.filled_size, o.remaining) == (
        Change.DONE, OrderStatus.CANCELED, 5, 0)


def test_a_final_change_corrects_a_finished_order_and_another_order_id_relinks() -> None:
    o = new()
    run(o, received(1), opened(2, 10), done(4, "canceled"))
    t = apply_change(o, change("canceled", 4, filled=3, remain=0), T0)
    assert (t.change, o.filled_size, o.corrected) == (Change.RECONCILED, 3, 1)
    other = new(coid="c2")
    run(other, received(1, oid=OTHER, coid="c2"))  # someone else's order under our clientOid
    t = apply_change(other, change("open", 3, filled=0, remain=10, coid="c2"), T0)
    assert (t.change, other.order_id, t.other_order_id) == (Change.RELINKED, OID, OTHER)


def test_a_change_of_another_client_oid_changes_nothing() -> None:
    o = new()
    assert not apply_change(o, change("open", 2, filled=0, remain=10, coid="c9"), T0).changed
    assert o.order_id is None


@pytest.mark.parametrize("frame", [
    "not json", '{"type":"message","topic":"/contractMarket/tradeOrders","data":[]}',
    '{"type":"message","topic":"/contractMarket/tradeOrders","data":{"type":"boom"}}',
])
def test_a_malformed_order_change_is_refused_with_a_reason(frame: str) -> None:
    with pytest.raises(MessageError):
        parse_order_change(frame)


def test_frames_that_are_not_order_changes_are_none() -> None:
    assert parse_order_change('{"type":"welcome","id":"x"}') is None
    assert parse_order_change('{"type":"message","topic":"/contractMarket/level3v2:X",'
                              '"subject":"open","data":{}}') is None


def test_a_change_counted_by_a_reconciliation_is_not_counted_again() -> None:
    o = new()
    run(o, received(1), opened(2, 10))
    reconcile(o, record(filledSize=3, updatedAt=T0 + 3), T0 + 5)  # read ahead of both
    apply_change(o, change("match", 3, filled=3, remain=7, match_size=3), T0 + 6)
    run(o, match(3, 3))
    assert (o.filled_size, o.remaining) == (3, 7)


def test_a_relinking_change_delivered_twice_counts_once_and_keeps_none_of_the_others_timing(
        ) -> None:
    o = new()
    # Someone else's order under our clientOid, seen far ahead in time.
    run(o, received(1, oid=OTHER), opened(50, 10, oid=OTHER))
    relink = change("match", 3, filled=4, remain=6, match_size=4)
    t = apply_change(o, relink, T0)
    assert (t.change, o.order_id, o.filled_size) == (Change.RELINKED, OID, 4)
    assert (o.private_ts, o.event_ts, o.exchange_updated_at) == ((T0 + 3) * NS,) * 2 + (0,)
    assert not apply_change(o, relink, T0).changed and o.filled_size == 4
    # Our own later messages count: the other order's times (ts 50) tell nothing of ours.
    run(o, raw("match", 51, side="sell", price="31570.0", size="1", makerOrderId=OID,
               takerOrderId=OTHER, tradeId="t-ours", ts=(T0 + 10) * NS))
    assert (o.filled_size, o.remaining) == (5, 5)


def test_a_change_that_knows_fewer_fills_never_sets_the_open_size_back() -> None:
    # The venue gives several messages one ts: two fills and the taker's open at ts 3.
    o = new()
    same = (T0 + 3) * NS
    run(o, raw("received", 1, orderId=OID, clientOid="c1"),
        raw("match", 2, side="buy", price="31570.0", size="2", makerOrderId=OTHER,
            takerOrderId=OID, tradeId="a", ts=same),
        raw("match", 3, side="buy", price="31570.0", size="3", makerOrderId=OTHER,
            takerOrderId=OID, tradeId="b", ts=same),
        raw("open", 4, side="buy", price="31570.0", size="5", orderId=OID,
            orderTime=same, ts=same))
    assert (o.filled_size, o.remaining) == (5, 5)
    late = change("match", 3, filled=2, remain=8, match_size=2, trade="a")  # ts 3 as well
    apply_change(o, late, T0)
    assert (o.filled_size, o.remaining) == (5, 5)
    run(o, done(5, "filled"))
    assert (o.filled_size, o.status) == (10, OrderStatus.FILLED)


def test_a_change_older_than_a_reconciliation_does_not_set_the_open_size_back() -> None:
    o = new()
    run(o, received(1), opened(2, 10))
    # The record, read now: 4 filled, then the order reduced to 7 (3 still open).
    reconcile(o, record(filledSize=4, size=7, updatedAt=T0 + 6), T0 + 7)
    assert (o.filled_size, o.remaining) == (4, 3)
    # The channel's change of that fill (at 4, before the reduction) arrives late.
    apply_change(o, change("match", 4, filled=4, remain=6, match_size=4), T0 + 8)
    assert (o.filled_size, o.remaining) == (4, 3)


def test_a_relink_from_a_record_keeps_none_of_the_other_orders_timing() -> None:
    o = new()
    run(o, received(1, oid=OTHER), opened(50, 10, oid=OTHER))
    reconcile(o, record(filledSize=0, updatedAt=T0 + 3), T0 + 4)  # ours is OID
    assert (o.order_id, o.event_ts, o.private_ts) == (OID, (T0 + 3) * NS, 0)
    apply_change(o, change("match", 5, filled=3, remain=7, match_size=3), T0 + 6)
    assert (o.filled_size, o.remaining) == (3, 7)


def test_an_order_rejected_as_unseen_that_the_engine_had_is_taken_from_the_channel() -> None:
    o = new()
    assert expire_if_unseen(o, T0 + 60_000, 10_000).changed
    assert o.status is OrderStatus.REJECTED and o.order_id is None
    t = apply_change(o, change("match", 3, filled=2, remain=8, match_size=2), T0 + 61_000)
    assert (t.change, o.order_id, o.status, o.filled_size, o.remaining) == (
        Change.RELINKED, OID, OrderStatus.PARTIALLY_FILLED, 2, 8)
