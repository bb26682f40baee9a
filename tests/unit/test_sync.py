"""The synchroniser, driven by seeded valid streams from StreamGenerator.

Every check compares the synchroniser's book with a book built straight from a
snapshot of the generator's own model at the same sequence: the two are built
by different paths (snapshot + replay versus the model), so equality means the
replay was right.
"""

from __future__ import annotations

from typing import Any

import pytest

from kumex_l3 import Control, OrderBook, parse_message
from kumex_l3.keys import FIELD_CTL, FIELD_MSG
from kumex_l3.sync import (
    Applied,
    BecameStale,
    BecameSynced,
    BecameUnsynced,
    DeadLetter,
    FetchSnapshot,
    NeedSnapshot,
    Output,
    Synchronizer,
    SyncState,
)
from kumex_l3.testing.synthetic import StreamGenerator

SYM = "XBTUSDM"


class Feed:
    """A generator plus the snapshots of its model at chosen points."""

    def __init__(self, seed: int = 7, start: int = 1000) -> None:
        self.gen = StreamGenerator(SYM, seed=seed, start_sequence=start, target_orders=150,
                                   levels=30)
        self.start = start

    def take(self, n: int) -> tuple[list[str], dict[str, Any]]:
        """About ``n`` messages (an action is never split) and the snapshot after them."""
        msgs = self.gen.take(n) + self.gen.flush()
        return msgs, self.gen.snapshot()


def seq(raw: str) -> int:
    msg = parse_message(raw)
    assert not isinstance(msg, Control)
    return msg.sequence


def book_state(book: OrderBook) -> dict[str, Any]:
    state = book.to_state()
    del state["stats"]
    return state


def assert_same(sync: Synchronizer, snapshot: dict[str, Any]) -> None:
    assert sync.synced
    assert sync.book is not None
    sync.book.check()
    assert book_state(sync.book) == book_state(OrderBook.from_snapshot(snapshot))


def feed_msgs(sync: Synchronizer, msgs: list[str], first_id: int = 1) -> list[Output]:
    """Feed ``msgs`` as one batch of stream entries ``first_id-0``, ``first_id+1-0``..."""
    return sync.on_entries((f"{first_id + i}-0", {FIELD_MSG: raw}) for i, raw in enumerate(msgs))


def kinds(out: list[Output]) -> list[type]:
    return [type(o) for o in out]


def test_start_asks_for_any_snapshot() -> None:
    sync = Synchronizer(SYM)
    assert sync.state is SyncState.STARTING
    out = sync.start()
    assert len(out) == 1 and isinstance(out[0], NeedSnapshot)
    assert out[0].min_sequence == 0
    assert sync.needed_sequence == 0


def test_snapshot_then_messages_equals_model() -> None:
    f = Feed()
    _, snap0 = f.take(50)
    msgs, snap1 = f.take(3000)
    sync = Synchronizer(SYM)
    out = sync.on_snapshot(snap0)
    assert out == [BecameSynced(snap0["sequence"])]
    out = feed_msgs(sync, msgs)
    # Consecutive applies are coalesced into one output.
    assert out == [Applied(len(msgs), snap1["sequence"], f"{len(msgs)}-0")]
    assert_same(sync, snap1)
    assert sync.stats.applied == len(msgs)
    assert sync.last_applied_id == sync.last_stream_id == f"{len(msgs)}-0"


def test_buffer_drop_and_replay() -> None:
    f = Feed()
    early, _ = f.take(100)
    mid, snap_mid = f.take(200)
    late, snap_end = f.take(300)
    sync = Synchronizer(SYM)
    sync.start()
    # The stream runs ahead of the snapshot: everything is buffered first.
    assert feed_msgs(sync, early + mid + late) == []
    assert not sync.synced and sync.buffered == len(early + mid + late)
    out = sync.on_snapshot(snap_mid)
    assert kinds(out) == [Applied, BecameSynced]
    applied = out[0]
    assert isinstance(applied, Applied) and applied.count == len(late)
    assert sync.stats.stale == 0 and sync.stats.dropped == len(early + mid)
    assert_same(sync, snap_end)
    assert sync.buffered == 0


def test_duplicates_in_the_buffer_are_harmless() -> None:
    f = Feed()
    a, _ = f.take(100)
    b, snap_b = f.take(100)
    c, snap_c = f.take(100)
    sync = Synchronizer(SYM)
    feed_msgs(sync, a + b + b[:40] + c + c[-10:])
    sync.on_snapshot(snap_b)
    assert_same(sync, snap_c)
    assert sync.stats.stale == 10 and sync.stats.dropped == len(a + b) + 40


def test_snapshot_older_than_the_buffer_asks_again() -> None:
    f = Feed()
    _, old = f.take(100)
    lost, _ = f.take(100)
    kept, snap_kept = f.take(100)
    rest, snap_end = f.take(100)
    del lost
    sync = Synchronizer(SYM)
    sync.start()
    feed_msgs(sync, kept + rest)
    out = sync.on_snapshot(old)
    assert len(out) == 1 and isinstance(out[0], NeedSnapshot)
    assert out[0].min_sequence == seq(kept[0]) - 1
    assert not sync.synced and sync.stats.snapshots_rejected == 1
    # The snapshot just before the first buffered message is exactly enough.
    gen_before_kept = Feed()
    gen_before_kept.take(100)
    gen_before_kept.take(100)
    snap_just_before = gen_before_kept.gen.snapshot()
    assert snap_just_before["sequence"] == seq(kept[0]) - 1
    assert kinds(sync.on_snapshot(snap_just_before)) == [Applied, BecameSynced]
    assert_same(sync, snap_end)
    del snap_kept


def test_snapshot_newer_than_the_whole_buffer() -> None:
    f = Feed()
    a, _ = f.take(100)
    b, snap_b = f.take(100)
    c, snap_c = f.take(100)
    sync = Synchronizer(SYM)
    feed_msgs(sync, a)
    # The feed's snapshot is ahead of what the stream delivered so far.
    assert sync.on_snapshot(snap_b) == [BecameSynced(snap_b["sequence"])]
    # Late messages up to the snapshot are stale, then the stream continues.
    feed_msgs(sync, b + c, first_id=1000)
    assert_same(sync, snap_c)
    assert sync.stats.stale == len(b)


def test_gap_while_synced_resyncs() -> None:
    f = Feed()
    _, snap0 = f.take(20)
    a, _ = f.take(200)
    lost, _ = f.take(30)
    b, _ = f.take(200)
    c, snap_c = f.take(200)
    sync = Synchronizer(SYM)
    sync.on_snapshot(snap0)
    feed_msgs(sync, a)
    assert sync.synced
    out = feed_msgs(sync, b, first_id=500)
    assert kinds(out) == [BecameUnsynced, NeedSnapshot]
    assert isinstance(out[0], BecameUnsynced) and "gap" in out[0].reason
    assert isinstance(out[1], NeedSnapshot) and out[1].min_sequence == seq(b[0]) - 1
    assert sync.book is None and not sync.synced
    assert sync.state is SyncState.SYNCING
    assert sync.stats.gaps == 1 and sync.stats.resyncs == 1
    feed_msgs(sync, c, first_id=900)
    # The feed answers with a current snapshot: everything buffered up to it is dropped.
    assert kinds(sync.on_snapshot(snap_c)) == [BecameSynced]
    assert_same(sync, snap_c)
    del lost


def test_hole_in_the_buffer_stays_unsynced() -> None:
    f = Feed()
    _, snap0 = f.take(10)
    a, _ = f.take(100)
    lost, _ = f.take(5)
    b, snap_b = f.take(100)
    c, snap_c = f.take(100)
    sync = Synchronizer(SYM)
    sync.start()
    feed_msgs(sync, a + b + c)
    out = sync.on_snapshot(snap0)
    # a replays, then the hole: unsynced, and a snapshot covering the hole is needed.
    assert kinds(out) == [Applied, NeedSnapshot]
    need = out[1]
    assert isinstance(need, NeedSnapshot) and need.min_sequence == seq(b[0]) - 1
    assert "hole" in need.reason
    assert not sync.synced and sync.book is None
    assert sync.needed_sequence == seq(b[0]) - 1
    out = sync.on_snapshot(snap_b)
    assert kinds(out) == [Applied, BecameSynced]
    assert_same(sync, snap_c)
    del lost


def test_refused_message_goes_to_dlq_and_the_book_stays_right() -> None:
    f = Feed()
    _, snap0 = f.take(10)
    a, _ = f.take(100)
    b, snap_b = f.take(100)
    sync = Synchronizer(SYM)
    sync.on_snapshot(snap0)
    feed_msgs(sync, a)
    bad = ['{"type":"message","subject":"open","data":{"symbol":"XBTUSDM"',  # cut JSON
           a[5].replace('"price":"', '"price":"-'),  # negative price (if an open)
           a[0].replace(SYM, "ETHUSDTM")]  # another symbol
    out: list[Output] = []
    for i, raw in enumerate(bad):
        out += sync.on_message(raw, f"700-{i}")
    letters = [o for o in out if isinstance(o, DeadLetter)]
    assert len(letters) >= 2
    assert letters[0].raw == bad[0] and letters[0].stream_id == "700-0" and letters[0].reason
    assert sync.synced
    feed_msgs(sync, b, first_id=800)
    assert_same(sync, snap_b)
    assert sync.stats.refused == len(letters)


def test_refused_while_buffering() -> None:
    f = Feed()
    a, snap_a = f.take(50)
    b, snap_b = f.take(50)
    sync = Synchronizer(SYM)
    sync.start()
    out = sync.on_message("not json", "1-0")
    assert kinds(out) == [DeadLetter]
    feed_msgs(sync, b, first_id=2)
    sync.on_snapshot(snap_a)
    assert_same(sync, snap_b)
    del a


def test_connected_without_loss_keeps_the_book() -> None:
    f = Feed()
    _, snap0 = f.take(10)
    a, _ = f.take(100)
    b, snap_b = f.take(100)
    sync = Synchronizer(SYM)
    sync.on_snapshot(snap0)
    feed_msgs(sync, a)
    assert sync.on_control("connected", "200-0") == []
    # A reconnect may replay a few messages already seen: stale, not a gap.
    out = feed_msgs(sync, a[-3:] + b, first_id=201)
    assert kinds(out) == [Applied]
    assert sync.stats.resyncs == 0 and sync.stats.reconnects == 1 and sync.stats.stale == 3
    assert_same(sync, snap_b)


def test_connected_with_loss_resyncs() -> None:
    f = Feed()
    _, snap0 = f.take(10)
    a, _ = f.take(100)
    lost, _ = f.take(20)
    b, _ = f.take(100)
    sync = Synchronizer(SYM)
    sync.on_snapshot(snap0)
    feed_msgs(sync, a)
    assert sync.on_control("connected", "200-0") == []
    out = sync.on_message(b[0], "201-0")
    assert kinds(out) == [BecameUnsynced, NeedSnapshot]
    assert not sync.synced
    del lost


def synced_with(f: Feed, n: int = 100) -> tuple[Synchronizer, list[str], dict[str, Any]]:
    """A synchroniser synced from a snapshot, then fed about ``n`` messages: (it, them, the
    snapshot after them)."""
    _, snap0 = f.take(10)
    msgs, snap = f.take(n)
    sync = Synchronizer(SYM)
    sync.on_snapshot(snap0)
    feed_msgs(sync, msgs)
    return sync, msgs, snap


def test_disconnected_makes_the_book_stale_until_a_contiguous_message() -> None:
    f = Feed()
    sync, a, _ = synced_with(f)
    b, snap_b = f.take(100)
    out = sync.on_entry("200-0", {b"ctl": b"disconnected", b"reason": b"PingTimeout"})
    assert kinds(out) == [BecameStale]
    assert sync.synced and not sync.fresh
    assert sync.stale_reason is not None and "PingTimeout" in sync.stale_reason
    assert str(seq(a[-1])) in sync.stale_reason
    # Repeated (a retried write): still one transition.
    assert sync.on_control("disconnected", "200-1", {"reason": "again"}) == []
    assert sync.on_control("connected", "201-0") == []
    assert not sync.fresh
    # A replayed message is no news; the next contiguous one shows the book current.
    assert feed_msgs(sync, a[-1:], first_id=202) == []
    assert not sync.fresh
    out = feed_msgs(sync, b, first_id=300)
    # The first message shows the book current; the rest are applied as usual.
    assert kinds(out) == [Applied, BecameSynced, Applied]
    assert sync.fresh and sync.stale_reason is None
    assert sync.stats.disconnects == 2 and sync.stats.resyncs == 0
    assert_same(sync, snap_b)


def test_disconnected_then_a_gap_resyncs() -> None:
    f = Feed()
    sync, _, _ = synced_with(f)
    f.take(20)  # lost while disconnected
    b, snap_b = f.take(100)
    sync.on_control("disconnected", "200-0", {"reason": "closed"})
    sync.on_control("connected", "201-0")
    out = feed_msgs(sync, b, first_id=202)
    assert kinds(out) == [BecameUnsynced, NeedSnapshot]
    assert not sync.synced and sync.stale_reason is None
    assert kinds(sync.on_snapshot(snap_b)) == [BecameSynced]
    assert sync.fresh
    assert_same(sync, snap_b)


def test_quiet_market_a_snapshot_at_the_books_sequence_after_reconnect_confirms() -> None:
    sync, _, snap_a = synced_with(Feed())
    sync.on_control("disconnected", "200-0", {"reason": "closed"})
    at = {"sequence": str(snap_a["sequence"])}
    # While the feed is down a snapshot proves nothing about what comes next.
    assert sync.on_control("snapshot", "201-0", at) == []
    assert not sync.fresh
    sync.on_control("connected", "202-0")
    # One at another sequence does not confirm either.
    assert sync.on_control("snapshot", "203-0",
                           {"sequence": str(snap_a["sequence"] + 5)}) == []
    assert not sync.fresh
    assert kinds(sync.on_control("snapshot", "204-0", at)) == [BecameSynced]
    assert sync.fresh


def test_feed_silent_is_a_disconnection_without_a_stream_entry() -> None:
    f = Feed()
    sync, a, snap_a = synced_with(f)
    out = sync.on_feed_silent("no heartbeat from the feed")
    assert kinds(out) == [BecameStale]
    assert sync.synced and not sync.fresh
    assert sync.stale_reason == f"no heartbeat from the feed; last sequence {seq(a[-1])}"
    assert sync.on_feed_silent("still none") == []  # already stale: no new transition
    assert sync.stats.silences == 2 and sync.stats.disconnects == 0
    # Until the feed is back, a snapshot at the book's sequence proves nothing.
    assert sync.on_control("snapshot", "200-0", {"sequence": str(snap_a["sequence"])}) == []
    assert not sync.fresh
    # The restarted feed: ctl=connected, then a contiguous message.
    sync.on_control("connected", "201-0")
    b, snap_b = f.take(50)
    assert kinds(feed_msgs(sync, b, first_id=300)) == [Applied, BecameSynced, Applied]
    assert sync.fresh
    assert_same(sync, snap_b)


def test_feed_heard_again_on_the_same_connection_makes_the_book_fresh() -> None:
    sync, _, _ = synced_with(Feed())
    sync.on_feed_silent("no heartbeat")
    assert sync.feed_silent and not sync.fresh
    assert kinds(sync.on_feed_heard()) == [BecameSynced]
    assert sync.fresh and not sync.feed_silent
    assert sync.on_feed_heard() == []  # nothing to do any more


def test_feed_heard_does_not_undo_a_disconnection() -> None:
    sync, _, _ = synced_with(Feed())
    sync.on_control("disconnected", "200-0", {"reason": "closed"})
    assert sync.on_feed_silent("no heartbeat") == []  # stale already
    assert not sync.feed_silent  # the feed said it lost the exchange: that decides
    assert sync.on_feed_heard() == []
    assert not sync.fresh
    # And the other order: silent, then the stream says it ended.
    sync2, _, _ = synced_with(Feed())
    sync2.on_feed_silent("no heartbeat")
    sync2.on_control("disconnected", "200-0", {"reason": "closed"})
    assert sync2.on_feed_heard() == []
    assert not sync2.fresh


def test_feed_silent_while_not_synced_leaves_the_book_stale_once_synced() -> None:
    f = Feed()
    a, snap_a = f.take(100)
    sync = Synchronizer(SYM)
    sync.start()
    assert sync.on_feed_silent("no heartbeat") == []
    assert kinds(sync.on_snapshot(snap_a)) == [BecameSynced, BecameStale]
    assert not sync.fresh
    del a


def test_a_book_synced_while_the_feed_is_down_is_stale() -> None:
    f = Feed()
    a, snap_a = f.take(100)
    sync = Synchronizer(SYM)
    sync.start()
    sync.on_control("disconnected", "1-0", {"reason": "closed"})
    out = sync.on_snapshot(snap_a)
    assert kinds(out) == [BecameSynced, BecameStale]
    assert sync.synced and not sync.fresh
    del a


def test_ctl_gap_resyncs_at_once() -> None:
    f = Feed()
    _, snap0 = f.take(10)
    a, _ = f.take(100)
    lost, _ = f.take(20)
    b, snap_b = f.take(100)
    sync = Synchronizer(SYM)
    sync.on_snapshot(snap0)
    feed_msgs(sync, a)
    out = sync.on_entry("300-0", {b"ctl": b"gap"})
    assert kinds(out) == [BecameUnsynced, NeedSnapshot]
    need = out[1]
    assert isinstance(need, NeedSnapshot) and need.min_sequence == seq(a[-1]) + 1
    feed_msgs(sync, b, first_id=301)
    # A snapshot from before the loss cannot be used.
    assert kinds(sync.on_snapshot(snap0)) == [NeedSnapshot]
    sync.on_snapshot(snap_b)
    assert_same(sync, snap_b)
    del lost


def test_integrity_error_resyncs_and_needs_a_snapshot_including_it() -> None:
    f = Feed()
    a, snap_a = f.take(100)
    sync = Synchronizer(SYM)
    sync.on_snapshot(snap_a)
    resting = snap_a["bids"][0]
    next_seq = snap_a["sequence"] + 1
    dup_open = (
        '{"type":"message","topic":"/contractMarket/level3v2:XBTUSDM","subject":"open",'
        f'"data":{{"symbol":"XBTUSDM","sequence":{next_seq},"side":"buy",'
        f'"size":"1","orderId":"{resting[0]}","price":"{resting[1]}","ts":{resting[3] + 1}}}}}'
    )
    out = sync.on_message(dup_open, "9-0")
    assert kinds(out) == [BecameUnsynced, NeedSnapshot]
    need = out[1]
    assert isinstance(need, NeedSnapshot) and need.min_sequence == next_seq
    assert sync.stats.integrity_errors == 1
    # The snapshot that led here is not enough any more.
    assert kinds(sync.on_snapshot(snap_a)) == [NeedSnapshot]
    del a


def test_checkpoint_restore_then_continue() -> None:
    f = Feed()
    _, snap0 = f.take(10)
    a, _ = f.take(300)
    b, snap_b = f.take(300)
    first = Synchronizer(SYM)
    first.on_snapshot(snap0)
    feed_msgs(first, a)
    assert first.book is not None and first.last_stream_id is not None
    state, at = first.book.to_state(), first.last_stream_id
    second = Synchronizer(SYM)
    out = second.on_checkpoint(state, at)
    assert out == [BecameSynced(seq(a[-1]))]
    assert second.last_stream_id == at
    # Reading resumes after the checkpoint's stream id.
    feed_msgs(second, b, first_id=len(a) + 1)
    assert_same(second, snap_b)
    with pytest.raises(RuntimeError):
        second.on_checkpoint(state, at)


def test_bad_checkpoint_falls_back_to_a_snapshot() -> None:
    sync = Synchronizer(SYM)
    out = sync.on_checkpoint({"v": 999}, "1-0")
    assert kinds(out) == [NeedSnapshot]
    assert sync.state is SyncState.STARTING


def test_buffer_overflow_is_counted_and_asks_for_newer() -> None:
    f = Feed()
    a, snap_a = f.take(30)
    b, snap_b = f.take(30)
    c, snap_c = f.take(30)
    sync = Synchronizer(SYM, max_buffer=len(c))
    sync.start()
    feed_msgs(sync, b + c)
    assert sync.stats.overflow == len(b) and sync.buffered == len(c)
    # snap_a was fine for the unbounded buffer, not for what is left of it.
    assert kinds(sync.on_snapshot(snap_a)) == [NeedSnapshot]
    assert sync.needed_sequence == seq(c[0]) - 1
    assert kinds(sync.on_snapshot(snap_b)) == [Applied, BecameSynced]
    assert_same(sync, snap_c)
    del a


def test_ctl_snapshot_asks_to_fetch_only_when_useful() -> None:
    f = Feed()
    a, snap_a = f.take(50)
    b, _ = f.take(50)
    sync = Synchronizer(SYM)
    sync.start()
    feed_msgs(sync, b)
    too_old = {"ctl": "snapshot", "sequence": str(snap_a["sequence"] - 5)}
    assert sync.on_entry("90-0", too_old) == []
    useful = {b"ctl": b"snapshot", b"sequence": str(snap_a["sequence"]).encode()}
    assert sync.on_entry("91-0", useful) == [FetchSnapshot(snap_a["sequence"])]
    assert sync.on_entry("92-0", {"ctl": "snapshot"}) == [FetchSnapshot(None)]
    sync.on_snapshot(snap_a)
    assert sync.synced
    assert sync.on_entry("93-0", useful) == []
    del a


def test_on_entries_reads_redis_shaped_entries() -> None:
    f = Feed()
    _, snap0 = f.take(10)
    a, snap_a = f.take(200)
    sync = Synchronizer(SYM)
    sync.start()
    entries: list[tuple[Any, dict[Any, Any]]] = [
        (f"{i + 1}-0".encode(), {FIELD_MSG.encode(): raw.encode()}) for i, raw in enumerate(a)
    ]
    entries.insert(50, (b"50-1", {FIELD_CTL.encode(): b"connected"}))
    entries.append((b"999-0", {b"other": b"x"}))
    out = sync.on_entries(entries)
    assert kinds(out) == [DeadLetter]
    sync.on_snapshot(snap0)
    assert_same(sync, snap_a)
    assert sync.last_stream_id == "999-0"


def test_bad_snapshot_is_rejected() -> None:
    sync = Synchronizer(SYM)
    sync.start()
    assert kinds(sync.on_snapshot("{")) == [NeedSnapshot]
    assert kinds(sync.on_snapshot({"symbol": "ETHUSDTM", "sequence": 5})) == [NeedSnapshot]
    crossed = {"symbol": SYM, "sequence": 5, "bids": [["b", "10", "1", 1]],
               "asks": [["a", "9", "1", 2]]}
    out = sync.on_snapshot(crossed)
    assert kinds(out) == [NeedSnapshot]
    need = out[0]
    assert isinstance(need, NeedSnapshot) and need.min_sequence == 6
    assert sync.stats.snapshots_rejected == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_faults_always_end_right(seed: int) -> None:
    """Duplicates, losses, reconnects and stale snapshots in a seeded mix: the end is exact."""
    import random

    rng = random.Random(seed)
    f = Feed(seed=seed)
    snaps: list[dict[str, Any]] = []
    # Each entry remembers how many snapshots existed when the feed wrote it.
    stream: list[tuple[str, str, int]] = []
    _, snap = f.take(10)
    snaps.append(snap)
    for _ in range(40):
        msgs, snap = f.take(rng.randint(5, 80))
        r = rng.random()
        if r < 0.15:
            msgs = msgs[rng.randint(1, len(msgs)):]  # loss
        elif r < 0.3:
            msgs = msgs + msgs[: rng.randint(0, len(msgs))]  # duplicates
        if rng.random() < 0.1:
            stream.append(("ctl", "disconnected", len(snaps)))
            stream.append(("ctl", "connected", len(snaps)))
        stream += [("msg", m, len(snaps)) for m in msgs]
        snaps.append(snap)
    final_msgs, final = f.take(50)
    stream += [("msg", m, len(snaps)) for m in final_msgs]
    sync = Synchronizer(SYM)
    sync.start()
    for i, (kind, value, known) in enumerate(stream):
        out = sync.on_entry(f"{i + 1}-0", {kind: value})
        for o in out:
            if isinstance(o, NeedSnapshot) and rng.random() < 0.7:
                # Answer with one of the latest snapshots of that time (maybe too old).
                sync.on_snapshot(rng.choice(snaps[max(0, known - 3):known]))
    if not sync.synced:
        sync.on_snapshot(final)
    assert_same(sync, final)
    assert sync.fresh


# --------------------------------------------------------------------------- the wedge


def _wedge(sequence: int = 2**63 - 1) -> str:
    return ('{"type":"message","topic":"/contractMarket/level3v2:XBTUSDM","subject":"done",'
            f'"data":{{"symbol":"XBTUSDM","sequence":{sequence},"orderId":"wedge",'
            '"reason":"canceled","ts":1}}')


def test_an_implausible_sequence_is_refused_and_never_wedges_a_synced_book() -> None:
    """One frame at 2**63-1: refused (dead letter), the book stays synced and fresh, and
    the next genuine messages apply; a gap after it is still seen as one."""
    feed = Feed(seed=21)
    _, snap = feed.take(200)
    sync = Synchronizer(SYM)
    sync.start()
    sync.on_snapshot(snap)
    more, snap2 = feed.take(60)
    out = feed_msgs(sync, [*more[:5], _wedge(), *more[5:]])
    dead = [o for o in out if isinstance(o, DeadLetter)]
    assert len(dead) == 1 and "implausible sequence" in dead[0].reason
    assert not any(isinstance(o, BecameUnsynced | NeedSnapshot) for o in out)
    assert_same(sync, snap2)
    assert sync.fresh and sync.stats.implausible == 1
    assert sync.max_sequence == snap2["sequence"]  # the wedge never moved it
    later, _ = feed.take(40)
    out = feed_msgs(sync, later[3:])  # a real gap after the wedge: still seen
    assert any(isinstance(o, BecameUnsynced) for o in out)
    (need,) = [o for o in out if isinstance(o, NeedSnapshot)]
    assert need.min_sequence == seq(later[3]) - 1


def test_an_implausible_sequence_is_never_held_past_a_resync() -> None:
    """The wedge arrives while the book waits for a snapshot (and at the very start, before
    any position): the snapshot is used and the book synced, the wedge refused."""
    feed = Feed(seed=22)
    _, _ = feed.take(100)
    msgs, snap = feed.take(80)
    sync = Synchronizer(SYM)
    sync.start()
    out = feed_msgs(sync, [_wedge(), *msgs[:40], _wedge(2**62), *msgs[40:]])
    assert not sync.synced
    # With no position yet the wedge was taken as one: the first genuine message was
    # refused against it, the second corroborated the first and moved the position back
    # (the wedge left the buffer then), and the second wedge was refused at once.
    dead = [o for o in out if isinstance(o, DeadLetter)]
    assert [d.stream_id for d in dead] == ["2-0", "1-0", "42-0"]
    assert all("implausible" in d.reason for d in dead)
    assert not [o for o in sync.on_snapshot(snap) if isinstance(o, DeadLetter)]
    assert_same(sync, snap)
    # A ctl=gap floor is not raised out of reach by a wedge either.
    sync.on_control("gap", "9-9")
    assert sync.needed_sequence == snap["sequence"] + 1


def test_a_stream_that_really_moved_far_is_followed() -> None:
    """Corroborated: two messages far away (a venue restart): the book resyncs there."""
    sync = Synchronizer(SYM, max_jump=1000)
    sync.start()
    sync.on_snapshot({"symbol": SYM, "sequence": 100, "ts": 1, "bids": [], "asks": []})
    assert sync.synced
    out = feed_msgs(sync, [_wedge(5000), _wedge(5001)])
    assert any(isinstance(o, DeadLetter) for o in out)  # the first, alone, was refused
    assert any(isinstance(o, BecameUnsynced) for o in out)
    (need,) = [o for o in out if isinstance(o, NeedSnapshot)]
    assert need.min_sequence == 5000
    sync.on_snapshot({"symbol": SYM, "sequence": 5001, "ts": 1, "bids": [], "asks": []})
    assert sync.synced and sync.max_sequence == 5001
