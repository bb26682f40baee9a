"""Bad input: hostile frames through the exchange's socket and straight into Redis.

Real processes (sandbox, feed, book, Redis). The corpus (:mod:`tests.chaos.corpus`)
goes in two ways: (a) through the sandbox's WebSocket with ``POST
/sandbox/inject``, so the feed sees it as it would from the exchange; (b) with
``XADD`` into ``kumex:{SYM}:l3``, as a broken or hostile writer would. In
every case: nothing crashes (every process still answers ``/healthz``), each
refused frame is in ``kumex:{SYM}:dlq`` with a reason (matched by content),
valid messages that are stale, duplicated or out of order are never refused,
and the book is right (equal to the engine's at the same sequence once
settled) or answers 503, never wrong (every 200 it gave during the test is
checked against the sandbox's journal).

What the feed does over the socket (asserted here):

* frames it cannot file under a configured symbol (not JSON, not an object,
  no ``type``, an unknown type, no topic, another symbol's topic, bytes that
  are not UTF-8, JSON nested too deep) are counted in
  ``kumex_feed_messages_unrouted_total{reason}`` and dropped: they never
  reach Redis, so they are not in the DLQ;
* data frames of its symbol are validated before they take their sequence's
  place: a malformed one is refused to the DLQ by the feed itself (field
  ``line``, once however many lines carried it) and never written to the
  stream, so that the genuine message with that sequence still is; a valid
  message that contradicts the one already written at its sequence (forged)
  is refused the same way, as a conflict; a genuine copy is dropped quietly;
* protocol frames (``welcome``, ``ack``, ``pong``, a server ``ping``, which it
  answers) are consumed by its session;
* an ``error`` envelope ends the connection: the feed reconnects;
* a frame above the WebSocket client's ``max_size`` (1 MiB) makes the client
  close the connection with 1009 ("message too big"): the feed reconnects, the
  frame is never stored; messages published while it was away leave a gap in
  the stream and the book resyncs from a snapshot. A 1,000,000-byte frame is
  under that limit: it is stored and refused by the book (over 64 KiB).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect as ws_connect

from kumex_l3 import OrderBook, keys, parse_message
from kumex_l3.messages import TOPIC_PREFIX
from kumex_l3.sync import DeadLetter, Synchronizer
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.synthetic import StreamGenerator
from kumex_l3.wsclient import FrameKind, Session, WsServerError, topic_symbol
from services.book.consumer import peek_message_sequence
from tests.chaos import corpus
from tests.chaos.conftest import LINES, SIDE_SYM, SYM, BookPoller, ChaosStack
from tests.chaos.corpus import Frame, WsFate

_UNROUTED = "kumex_feed_messages_unrouted_total"


def _ws_fate(frame: Frame) -> tuple[WsFate, str | None]:
    """What the feed's session and router do with ``frame`` (pure, as in services.feed.feed)."""
    session = Session("chaos", 10.0, 10.0)
    session.receive('{"id":"chaos","type":"welcome"}', 0.0)
    if isinstance(frame.raw, bytes):
        try:
            text = frame.raw.decode()
        except UnicodeDecodeError:
            return WsFate.UNROUTED, "invalid"
    else:
        text = frame.raw
    try:
        got = session.receive(text, 0.0)
    except WsServerError:
        return WsFate.DISCONNECT, None
    if got is None:
        return WsFate.CONSUMED, None
    if got.kind is FrameKind.DATA and topic_symbol(got.topic) == SYM:
        return WsFate.STORED, None
    if got.kind is FrameKind.INVALID:
        return WsFate.UNROUTED, "invalid"
    if got.kind is not FrameKind.DATA:
        return WsFate.UNROUTED, "unknown_type"
    return WsFate.UNROUTED, "no_topic" if got.topic is None else "unknown_topic"


def test_the_corpus_is_labelled_right() -> None:
    """Pure check of the corpus: the book refuses every malformed frame, ignores every
    forged stale one, and each frame's WebSocket fate is what the feed's code does."""
    sequence = 5_000_000
    frames = corpus.malformed(SYM, sequence + 1)
    sync = Synchronizer(SYM)
    sync.start()
    sync.on_snapshot({"symbol": SYM, "sequence": sequence, "ts": 1, "bids": [], "asks": []})
    assert sync.synced
    for frame in [*frames, corpus.oversized(SYM, sequence + 1)]:
        outs = sync.on_message(frame.data, "1-1")
        assert [type(o) for o in outs] == [DeadLetter], frame.name
        assert isinstance(outs[0], DeadLetter) and outs[0].reason, frame.name
        if frame.name != "frame_over_ws_max_size":  # max_size is the socket's business
            assert _ws_fate(frame) == (frame.ws, frame.reason), frame.name
    for frame in corpus.forged_stale(SYM, sequence):
        assert sync.on_message(frame.data, "1-2") == [], frame.name
        assert _ws_fate(frame) == (frame.ws, frame.reason), frame.name
    assert sync.synced and sync.book is not None and sync.book.sequence == sequence
    assert sync.stats.refused == len(frames) + 1
    assert len(frames) >= 80


def test_a_forged_future_message_never_ends_up_in_a_synced_book() -> None:
    gen = StreamGenerator(SYM, seed=1, start_sequence=100, target_orders=50, levels=10)
    gen.take(300)
    gen.flush()
    start = gen.snapshot()
    texts = gen.take(40)
    at = next(i for i, t in enumerate(texts) if i >= 5 and json.loads(t)["subject"] == "open")
    forged = next(f for f in corpus.forged_stale(SYM, start["sequence"] + at + 1)
                  if f.name == "done_unknown_order")
    sync = Synchronizer(SYM)
    sync.start()
    sync.on_snapshot(start)
    truth = OrderBook.from_snapshot(start)
    entries = [texts[0], texts[1], forged.raw, *texts[2:]]
    for i, text in enumerate(entries):
        sync.on_entry(f"1-{i}", {"msg": text})
    assert not sync.synced  # the forged message was a gap
    for text in texts[:3]:
        truth.apply(parse_message(text))
    sync.on_snapshot(truth.to_snapshot())
    for text in texts[3:]:
        truth.apply(parse_message(text))
    assert not sync.synced or (sync.book is not None and sync.book.l3() == truth.l3())


# --------------------------------------------------------------------------- the sandbox


async def test_sandbox_inject_and_pong_fault(stack: ChaosStack) -> None:
    """``POST /sandbox/inject`` sends raw frames unchanged and in order (binary as binary),
    counts them; ``pong_disabled`` leaves pings unanswered. On a symbol the feed ignores."""
    stack.flow(None)
    async with httpx.AsyncClient(base_url=stack.sandbox.base_url, timeout=10) as http:
        bullet = (await http.post("/api/v1/bullet-public")).json()["data"]
        server = bullet["instanceServers"][0]
        url = f"{server['endpoint']}?token={bullet['token']}&connectId=chaos-raw"
        async with ws_connect(url, max_size=None, ping_interval=None) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"id": "s1", "type": "subscribe", "response": True,
                                      "topic": TOPIC_PREFIX + SIDE_SYM}))
            assert json.loads(await ws.recv()) == {"id": "s1", "type": "ack"}
            before = stack.sandbox_counts()
            texts = ["not json", "", '{"type":"message"}', "x" * 100_000]
            r = await http.post("/sandbox/inject", json={"symbol": SIDE_SYM, "frames": texts})
            assert r.json() == {"symbol": SIDE_SYM, "injected": 4, "subscribers": 1}
            r = await http.post("/sandbox/inject", json={
                "symbol": SIDE_SYM, "binary": True,
                "frames": [base64.b64encode(b"\xff\x00chaos").decode()]})
            assert r.status_code == 200
            assert [await ws.recv() for _ in texts] == texts
            assert await ws.recv() == b"\xff\x00chaos"
            assert stack.sandbox_counts()["injected"] - before["injected"] == 5

            # Refused requests: nothing is sent.
            bad: list[tuple[Any, int]] = [
                ({"symbol": "NOPE", "frames": []}, 404),
                ({"symbol": SIDE_SYM}, 400),
                ({"symbol": SIDE_SYM, "frames": "x"}, 400),
                ({"symbol": SIDE_SYM, "frames": [1]}, 400),
                ({"symbol": SIDE_SYM, "frames": ["%%"], "binary": True}, 400),
                ({"symbol": SIDE_SYM, "frames": [], "binary": "yes"}, 400),
            ]
            for body, status in bad:
                r = await http.post("/sandbox/inject", json=body)
                assert r.status_code == status and r.json()["error"], (body, r.text)
            # A lone surrogate cannot be a text frame (UTF-8 on the wire).
            r = await http.post("/sandbox/inject", content=json.dumps(
                {"symbol": SIDE_SYM, "frames": ["\udcff"]}).encode())
            assert r.status_code == 400 and "binary" in r.json()["error"]
            r = await http.post("/sandbox/inject", content=b"[" * 100_000)
            assert r.status_code == 400

            # pong_disabled: the ping goes unanswered, and is counted.
            r = await http.post("/sandbox/faults", json={"pong_disabled": True})
            assert r.json()["pong_disabled"] is True
            try:
                await ws.send('{"id":"p1","type":"ping"}')
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await ws.recv()
                assert stack.sandbox_counts()["pongs_withheld"] > before["pongs_withheld"]
            finally:
                await http.post("/sandbox/faults", json={"pong_disabled": False})
            await ws.send('{"id":"p2","type":"ping"}')
            assert json.loads(await ws.recv()) == {"id": "p2", "type": "pong"}
            # A client's pong (answering an injected server ping) draws no error.
            await ws.send('{"id":"p3","type":"pong"}')
            await ws.send('{"id":"p4","type":"ping"}')
            assert json.loads(await ws.recv()) == {"id": "p4", "type": "pong"}
            r = await http.post("/sandbox/faults", json={"pong_disabled": 1})
            assert r.status_code == 400


def test_feed_reconnects_when_the_exchange_stops_answering_pings(stack: ChaosStack) -> None:
    """Fault ``pong_disabled``: the feed's pong timeout ends the connection; it reconnects
    (again and again while the fault lasts) and the book ends equal to the engine."""
    reconnects = stack.feed_metric("kumex_feed_reconnects_total")
    withheld = stack.sandbox_counts()["pongs_withheld"]
    with BookPoller(stack.book_url) as poller:
        stack.flow(100)
        stack.faults(pong_disabled=True)
        try:
            wait_for(lambda: stack.feed_metric("kumex_feed_reconnects_total") >= reconnects + 1,
                     "the feed to give up on the silent connection", proc=stack.feed)
        finally:
            stack.faults(pong_disabled=False)
        final = stack.settle()
    stack.assert_equal_to_engine(final)
    stack.assert_answers_were_true(poller.answers)
    assert stack.sandbox_counts()["pongs_withheld"] > withheld
    assert stack.feed is not None
    assert "PingTimeout" in stack.feed.log_text()
    stack.assert_all_healthy()


# --------------------------------------------------------------------------- the corpus


#: What the feed keeps of a refused frame in the DLQ (services/feed/feed.py).
_FEED_DLQ_RAW = 4096


def _as_refused_by_feed(frame: Frame) -> bytes:
    """The ``raw`` the feed dead-letters for ``frame``: its head only when it is long."""
    text = frame.data.decode()
    if len(text) <= _FEED_DLQ_RAW:
        return frame.data
    return (text[:_FEED_DLQ_RAW] + f"... ({len(text)} characters in all)").encode()


def _check_dlq(stack: ChaosStack, dlq_from: bytes, expected: list[Frame],
               never: list[bytes], *, by_feed: bool = False) -> None:
    """The DLQ since ``dlq_from`` holds exactly ``expected`` (by content), each with a reason."""
    want = Counter(_as_refused_by_feed(f) if by_feed else f.data for f in expected)

    def arrived() -> bool:
        return sum(want.values()) <= len(stack.dlq_after(dlq_from))

    wait_for(arrived, f"{sum(want.values())} DLQ entries", proc=stack.book)
    entries = stack.dlq_after(dlq_from)
    got = Counter(e[b"raw"] for e in entries)
    by_data = {(_as_refused_by_feed(f) if by_feed else f.data): f.name for f in expected}
    missing = [by_data[d] for d in want - got]
    extra = [d[:120] for d in got - want]
    assert not missing and not extra, f"DLQ missing {missing}, unexpected {extra}"
    for entry in entries:
        assert entry.get(b"reason"), entry
        # Refused by the book (where in the stream) or by the feed (on which line).
        assert entry.get(b"streamId") or entry.get(b"line"), entry
    refused = {e[b"raw"] for e in entries}
    assert not refused & set(never), "valid messages were dead-lettered"


def test_hostile_frames_through_the_exchange_socket(stack: ChaosStack) -> None:
    stack.wait_synced()
    stack.wait_feed_subscribed()
    dlq_from = stack.last_id(keys.dlq(SYM))
    reasons = ("invalid", "unknown_type", "unknown_topic", "no_topic")
    unrouted_before = {r: stack.feed_metric(_UNROUTED, reason=r) for r in reasons}
    with BookPoller(stack.book_url) as poller:
        stack.flow(200)
        book_seq = stack.book_l3().json()["sequence"]
        frames = corpus.malformed(SYM, stack.engine_sequence() + 1)
        forged = corpus.forged_stale(SYM, book_seq)
        genuine = [t for t in stack.journal(after=book_seq - 40)
                   if json.loads(t)["data"]["sequence"] <= book_seq]
        replayed = corpus.replays(genuine, seed=1)
        quiet = [f for f in frames if f.ws is not WsFate.DISCONNECT]
        conflicts = stack.feed_metric("kumex_feed_messages_conflicts_total", symbol=SYM)
        # Interleaved with the flow, in one go; then the frames that end the connection.
        stack.inject([*quiet, *forged, *replayed])
        for frame in (f for f in frames if f.ws is WsFate.DISCONNECT):
            stack.wait_feed_subscribed()
            before = stack.feed_metric("kumex_feed_reconnects_total")
            stack.inject([frame])
            wait_for(lambda b=before: stack.feed_metric("kumex_feed_reconnects_total") > b,
                     f"the feed to reconnect after {frame.name}", proc=stack.feed)
        stored = [f for f in frames if f.ws is WsFate.STORED]
        # Forged stale frames contradict what was written at their sequence: refused too.
        contradicting = [f for f in forged if f.ws is WsFate.STORED]
        _check_dlq(stack, dlq_from, stored + contradicting,
                   never=[f.data for f in replayed], by_feed=True)
        assert stack.feed_metric("kumex_feed_messages_conflicts_total",
                                 symbol=SYM) >= conflicts + len(contradicting) > 0
        final = stack.settle()
    stack.assert_equal_to_engine(final)
    checked = stack.assert_answers_were_true(poller.answers)
    stack.assert_all_healthy()
    # Unroutable frames were counted by reason (forged "no_topic" included), never stored;
    # each line received its own copy.
    expected = Counter(f.reason for f in [*frames, *forged] if f.ws is WsFate.UNROUTED)
    for reason in reasons:
        got = stack.feed_metric(_UNROUTED, reason=reason) - unrouted_before[reason]
        assert got == expected[reason] * LINES, (reason, got, expected[reason])
    print(f"\nsocket: {len(frames)} malformed ({len(stored)} refused by the feed, "
          f"{sum(expected.values())} unroutable), {len(forged)} forged stale "
          f"({len(contradicting)} refused as conflicts), {len(replayed)} replayed; "
          f"{checked} answers checked")


def test_hostile_entries_written_straight_into_the_stream(stack: ChaosStack) -> None:
    stack.wait_synced()
    dlq_from = stack.last_id(keys.dlq(SYM))
    with BookPoller(stack.book_url) as poller:
        stack.flow(200)
        book_seq = stack.book_l3().json()["sequence"]
        # The deeply nested frame has its own test below (it stops the book's restart).
        frames = [f for f in corpus.malformed(SYM, stack.engine_sequence() + 1)
                  if f.name != "deeply_nested"]
        frames.append(corpus.oversized(SYM, stack.engine_sequence() + 1))
        forged = corpus.forged_stale(SYM, book_seq)
        genuine = [t for t in stack.journal(after=book_seq - 40)
                   if json.loads(t)["data"]["sequence"] <= book_seq]
        replayed = corpus.replays(genuine, seed=2)
        entries: list[dict[str, str | bytes]] = [
            {keys.FIELD_MSG: f.data} for f in [*frames, *forged, *replayed]]
        # Entries that are not messages: no msg and no ctl (refused), unknown and
        # garbled controls (informational).
        entries += [{"chaos": "neither msg nor ctl"}, {keys.FIELD_CTL: "chaos-unknown"},
                    {keys.FIELD_CTL: "snapshot", "sequence": "not-a-number"}]
        stack.xadd(entries)
        neither = Frame("entry_without_msg_or_ctl", b"", WsFate.STORED)
        _check_dlq(stack, dlq_from, [*frames, neither],
                   never=[f.data for f in forged + replayed])
        final = stack.settle()
    stack.assert_equal_to_engine(final)
    stack.assert_answers_were_true(poller.answers)
    stack.assert_all_healthy()
    reasons = [e[b"reason"].decode() for e in stack.dlq_after(dlq_from)]
    assert any("entry has neither msg nor ctl" in r for r in reasons)
    assert any("exceeds" in r for r in reasons)


def test_frame_over_the_websocket_max_size(stack: ChaosStack) -> None:
    """A frame over 1 MiB closes the feed's connection (1009); it reconnects, the frame
    is never stored, and the messages published meanwhile (lost with the connection)
    make the book resync from a snapshot."""
    final = stack.settle()
    start_seq = final["sequence"]
    stream_from = stack.last_id(keys.l3_stream(SYM))
    dlq_from = stack.last_id(keys.dlq(SYM))
    reconnects = stack.feed_metric("kumex_feed_reconnects_total")
    resyncs = stack.book_metric("kumex_book_resyncs_total")
    big = corpus.oversized(SYM, final["sequence"] + 1)
    stack.wait_feed_subscribed()
    with BookPoller(stack.book_url) as poller:
        stack.inject([big])
        stack.step(50)  # queued behind the big frame on the socket that is closing
        wait_for(lambda: stack.feed_metric("kumex_feed_reconnects_total") > reconnects,
                 "the feed to reconnect", proc=stack.feed)
        final = stack.settle()
    stack.assert_equal_to_engine(final)
    stack.assert_answers_were_true(poller.answers)
    stack.assert_all_healthy()
    assert stack.feed is not None
    assert "1009" in stack.feed.log_text(), "the close should say: message too big"
    # Never stored, never refused: it did not get past the socket.
    entries = stack.stream_after(stream_from)
    assert all(len(fields.get(keys.FIELD_MSG.encode(), b"")) < corpus.MAX_WS_FRAME
               for _, fields in entries)
    assert stack.dlq_after(dlq_from) == []
    # The stream shows what the book saw: a new connection, then a gap (or none).
    ctl_at = next(i for i, (_, f) in enumerate(entries)
                  if f.get(keys.FIELD_CTL.encode()) == b"connected")
    before = [peek_message_sequence(f[b"msg"]) for _, f in entries[:ctl_at] if b"msg" in f]
    after = [peek_message_sequence(f[b"msg"]) for _, f in entries[ctl_at:] if b"msg" in f]
    last_before = max([s for s in before if s is not None], default=start_seq)
    first_after = min(s for s in after if s is not None)
    if first_after > last_before + 1:
        assert stack.book_metric("kumex_book_resyncs_total") > resyncs
    print(f"\noversized frame: stream {last_before} -> reconnect -> {first_after}; "
          f"book resyncs {resyncs} -> {stack.book_metric('kumex_book_resyncs_total')}")


def test_valid_messages_out_of_order_or_duplicated_are_never_refused(
        stack: ChaosStack) -> None:
    """The exchange's own messages swapped and sent twice (faults reorder and duplicate, on
    each line independently): the feed's arbitration puts them back in order and writes
    each once, so the book sees no gap; never a DLQ entry."""
    stack.wait_synced()
    dlq_from = stack.last_id(keys.dlq(SYM))
    gaps = stack.book_metric("kumex_book_gaps_total")
    duplicates = stack.feed_metric("kumex_feed_arbitration_duplicates_total", symbol=SYM)
    counts = stack.sandbox_counts()
    with BookPoller(stack.book_url) as poller:
        stack.flow(None)
        stack.faults(reorder_rate=0.02, duplicate_rate=0.02)
        for _ in range(8):
            stack.step(100)
        final = stack.settle()
    stack.assert_equal_to_engine(final)
    stack.assert_answers_were_true(poller.answers)
    after = stack.sandbox_counts()
    assert after["reordered"] > counts["reordered"]
    assert after["duplicated"] > counts["duplicated"]
    assert stack.book_metric("kumex_book_gaps_total") == gaps
    assert stack.feed_metric("kumex_feed_arbitration_duplicates_total",
                             symbol=SYM) > duplicates
    assert stack.dlq_after(dlq_from) == []
    stack.assert_all_healthy()


def test_a_deeply_nested_entry_does_not_stop_the_order_monitor() -> None:
    deep = next(f for f in corpus.malformed(SYM, 1) if f.name == "deeply_nested")
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        monitor = ServiceProcess("services.order_monitor", {
            "REDIS_URL": server.url, "KUMEX_SYMBOLS": SYM, "KUMEX_BASE_URL": "http://127.0.0.1:9",
            "MONITOR_HTTP_HOST": "127.0.0.1", "MONITOR_REPLICA_ID": "chaos-deep",
            "MONITOR_BLOCK_MS": "100", "MONITOR_RECONCILE_ON_START": "false"},
            port_var="MONITOR_HTTP_PORT")
        try:
            client.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "connected"})
            monitor.start()
            entry = client.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: deep.data})
            after = client.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: corpus.forged_stale(
                SYM, 1)[0].data})

            def done_or_failed() -> bool:
                if "consumer failed" in monitor.log_text():
                    return True
                groups: Any = client.xinfo_groups(keys.l3_stream(SYM))
                return bool(groups) and groups[0]["last-delivered-id"] == after and \
                    groups[0]["pending"] == 0

            wait_for(done_or_failed, "the monitor past the deep entry (or failing on it)",
                     proc=monitor)
            assert entry < after
            assert "consumer failed" not in monitor.log_text()
        finally:
            monitor.close()
            client.close()


def test_a_deeply_nested_entry_does_not_stop_the_book(stack: ChaosStack) -> None:
    """Last in the module: it restarts the book (from the stored snapshot)."""
    stack.flow(None)
    stack.settle()
    dlq_from = stack.last_id(keys.dlq(SYM))
    deep = next(f for f in corpus.malformed(SYM, 1) if f.name == "deeply_nested")
    stack.xadd([{keys.FIELD_MSG: deep.data}])
    wait_for(lambda: any(e[b"raw"] == deep.data for e in stack.dlq_after(dlq_from)),
             "the deep entry in the DLQ", proc=stack.book)
    # A restart without a checkpoint starts from the stored snapshot, scanning the
    # stream backwards from its end: the deep entry first.
    assert stack.book is not None
    stack.book.stop()
    stack.redis.delete(keys.checkpoint(SYM))
    stack.book.start()

    def served_or_failed() -> bool:
        assert stack.book is not None
        return ("book consumer failed" in stack.book.log_text()
                or stack.book_l3().status_code == 200)

    wait_for(served_or_failed, "the book to serve (or its consumer to fail)",
             proc=stack.book)
    assert "book consumer failed" not in stack.book.log_text()
    assert stack.settle()["sequence"] == stack.engine_sequence()


def test_an_implausible_sequence_through_the_socket_is_refused_by_the_feed(
        stack: ChaosStack) -> None:
    """A well-formed message at sequence 2**63-1 on every line of the exchange's socket: the
    feed holds it aside, nothing corroborates it, and it is refused (DLQ, metric) without
    ever reaching the stream; the book never loses sync for it."""
    stack.wait_synced()
    stack.wait_feed_subscribed()
    dlq_from = stack.last_id(keys.dlq(SYM))
    stream_from = stack.last_id(keys.l3_stream(SYM))
    resyncs = stack.book_metric("kumex_book_resyncs_total")
    wedge = Frame("wedge", corpus._msg(SYM, "done", {
        "symbol": SYM, "sequence": 2**63 - 1, "orderId": "chaos-wedge", "reason": "canceled",
        "ts": 1654073289160921530}), WsFate.STORED)
    with BookPoller(stack.book_url) as poller:
        stack.flow(200)
        stack.inject([wedge])

        def refused() -> list[dict[bytes, bytes]]:
            return [e for e in stack.dlq_after(dlq_from) if e[b"raw"] == wedge.data]

        (entry,) = wait_for(refused, "the wedge refused", proc=stack.feed)
        final = stack.settle()
    stack.assert_equal_to_engine(final)
    stack.assert_answers_were_true(poller.answers)
    assert b"implausible sequence" in entry[b"reason"] and entry[b"line"]
    assert stack.feed_metric("kumex_feed_arbitration_refused_total", symbol=SYM) >= 1
    assert all(fields.get(keys.FIELD_MSG.encode()) != wedge.data
               for _, fields in stack.stream_after(stream_from))
    assert stack.book_metric("kumex_book_resyncs_total") == resyncs
    stack.assert_all_healthy()
