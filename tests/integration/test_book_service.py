"""The book service as real processes against a real Redis, fed the way the feed does.

A :class:`Feed` writes a seeded StreamGenerator stream into ``kumex:{SYM}:l3``
(``msg`` entries, stored snapshots announced by ``ctl=snapshot``) and keeps a
reference :class:`OrderBook` built directly from the same messages (including
the ones it "loses" on purpose, as the exchange's own book would). Each
:class:`BookProcess` is ``python -m services.book`` on a free port. Waits poll
with a generous ceiling and are never measured, except the documented 15 s
takeover bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from kumex_l3 import OrderBook, keys, parse_message
from kumex_l3.testing.procs import ServiceProcess, is_cluster_url, wait_for
from kumex_l3.testing.synthetic import StreamGenerator
from kumex_l3.testing.tcpproxy import TcpProxy

SAFETY_S = 30.0  # a ceiling against a hang, never a measurement
TAKEOVER_S = 15.0  # the documented bound for another replica to serve a dead one's symbols
SYM = "XBTUSDM"
SYMBOLS = ("XBTUSDM", "XBTUSDTM", "ETHUSDTM")


# --------------------------------------------------------------------------- helpers


class Feed:
    """Writes one symbol's stream as the feed would; ``ref`` is the exchange's true book."""

    def __init__(self, r: redis.Redis, symbol: str = SYM, seed: int = 5) -> None:
        self.r = r
        self.symbol = symbol
        self.gen = StreamGenerator(symbol, seed=seed, start_sequence=10_000, target_orders=200,
                                   levels=40)
        self.ref = OrderBook(symbol, 10_000)

    def publish(self, n: int, *, lose: int = 0) -> None:
        """About ``n`` messages; the first ``lose`` of them never reach the stream."""
        msgs = self.gen.take(n) + self.gen.flush()
        pipe = self.r.pipeline(transaction=False)
        for i, raw in enumerate(msgs):
            self.ref.apply(parse_message(raw))
            if i >= lose:
                pipe.xadd(keys.l3_stream(self.symbol), {keys.FIELD_MSG: raw})
        pipe.execute()

    def store_snapshot(self) -> int:
        """Store the current snapshot and announce it, as the feed does."""
        snap = self.gen.snapshot()
        self.r.set(keys.snapshot(self.symbol), json.dumps(snap))
        self.r.xadd(keys.l3_stream(self.symbol),
                    {keys.FIELD_CTL: "snapshot", "sequence": str(snap["sequence"])})
        return int(snap["sequence"])

    def expected(self, depth: int = 1000) -> dict[str, Any]:
        bids, asks = self.ref.depth_rows(depth)
        return {"symbol": self.symbol, "sequence": self.ref.sequence, "ts": self.ref.ts,
                "bids": bids, "asks": asks}


class BookProcess(ServiceProcess):
    """``python -m services.book`` on a free port; log kept in a temporary file."""

    def __init__(self, redis_url: str, replica: str, symbols: tuple[str, ...] = (SYM,),
                 **env: str) -> None:
        super().__init__("services.book", {
            "REDIS_URL": redis_url, "KUMEX_SYMBOLS": ",".join(symbols),
            "BOOK_HOST": "127.0.0.1", "BOOK_REPLICA_ID": replica,
            "BOOK_LEASE_TTL_SECONDS": "3", "BOOK_CHECKPOINT_SECONDS": "0.3",
            "BOOK_SNAPSHOT_RETRY_SECONDS": "0.5", "BOOK_READ_BLOCK_SECONDS": "0.1",
            # The Feed above writes the stream without the real feed's heartbeat; one
            # test below writes the heartbeat itself and turns the check on.
            "BOOK_FEED_CHECK_SECONDS": "0", **env,
        }, port_var="BOOK_PORT", name=replica, start_timeout=SAFETY_S, stop_timeout=15)
        self.redis_url = redis_url
        self.replica = replica
        self.symbols = symbols

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=10.0)

    def metric(self, name: str, symbol: str = SYM) -> float:
        text = self.get("/metrics").text
        needle = f'{name}{{symbol="{symbol}"}} '
        for line in text.splitlines():
            if line.startswith(needle):
                return float(line[len(needle):])
        return 0.0


def book_at(proc: BookProcess, feed: Feed, depth: int = 1000,
            timeout: float = SAFETY_S) -> dict[str, Any]:
    """Poll ``GET /book`` until it reaches the reference's sequence; return the body."""
    def check() -> dict[str, Any] | None:
        res = proc.get(f"/book/{feed.symbol}", depth=depth)
        if res.status_code != 200:
            return None
        body: dict[str, Any] = res.json()
        return body if body["sequence"] >= feed.ref.sequence else None

    body: dict[str, Any] = wait_for(check, f"{feed.symbol} at {feed.ref.sequence}",
                                    timeout=timeout, proc=proc)
    return body



@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """Every test here runs on one Redis, then on the Redis Cluster."""
    return any_redis_url

@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[list[BookProcess]]:
    """Started processes, stopped after the test (their logs shown if it failed)."""
    started: list[BookProcess] = []
    yield started
    failed = getattr(request.node, "rep_call", None)
    for p in started:
        if p.process is not None:
            with contextlib.suppress(Exception):
                p.stop()
        if failed is not None and failed.failed:
            sys.stderr.write(f"--- {p.replica} log ---\n{p.log_text()}\n")
        p.close()


def spawn(procs: list[BookProcess], *args: Any, **kwargs: Any) -> BookProcess:
    proc = BookProcess(*args, **kwargs)
    procs.append(proc)
    return proc.start()


# --------------------------------------------------------------------------- tests


def test_snapshot_request_then_book_equals_reference(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feed = Feed(redis_sync)
    feed.publish(400)
    requests = redis_sync.pubsub(  # type: ignore[no-untyped-call]
        ignore_subscribe_messages=True)
    requests.subscribe(keys.snapshot_requests(SYM))
    try:
        book = spawn(procs, redis_url, "solo")
        # No snapshot, no checkpoint: not synced, and the feed is asked for one.
        res = book.get(f"/book/{SYM}")
        assert res.status_code == 503 and "detail" in res.json()
        assert book.get(f"/book/{SYM}/l3").status_code == 503
        assert book.get("/readyz").status_code == 503
        ask = wait_for(lambda: requests.get_message(timeout=0.1), "a snapshot request",
                       proc=book)
        assert int(ask["data"]) >= 0
    finally:
        requests.close()
    feed.publish(300)
    feed.store_snapshot()
    feed.publish(300)
    body = book_at(book, feed)
    assert body == feed.expected()
    # Smaller depths, the L3 view and queue positions agree with the reference too.
    assert book.get(f"/book/{SYM}", depth=3).json() == feed.expected(3)
    assert book.get(f"/book/{SYM}").json() == feed.expected(12)
    l3 = book.get(f"/book/{SYM}/l3", depth=2).json()
    bids, asks = feed.ref.l3(2)
    assert l3["sequence"] == feed.ref.sequence
    for got, want in ((l3["bids"], bids), (l3["asks"], asks)):
        assert [lv["price"] for lv in got] == [lv.text for lv in want]
        assert [[o["orderId"] for o in lv["orders"]] for lv in got] == [
            [o.order_id for o in lv.orders] for lv in want]
    assert len(book.get(f"/book/{SYM}/l3").json()["bids"]) == min(5, len(feed.ref.l3()[0]))
    level = bids[0]
    order = level.orders[-1]
    pos = feed.ref.queue_position(order.order_id)
    assert pos is not None
    got = book.get(f"/book/{SYM}/orders/{order.order_id}").json()
    assert got == {"orderId": order.order_id, "side": "buy", "price": level.text,
                   "size": str(order.size), "ts": order.ts, "position": pos.position,
                   "sizeAhead": str(pos.size_ahead)}
    # 404 and 422 cases.
    assert book.get(f"/book/{SYM}/orders/nope").status_code == 404
    assert book.get("/book/NOPE").status_code == 404
    assert book.get("/book/NOPE/l3").status_code == 404
    assert book.get("/book/xbtusdm").status_code == 404
    for bad in (0, 1001, "x"):
        assert book.get(f"/book/{SYM}", depth=bad).status_code == 422
        assert book.get(f"/book/{SYM}/l3", depth=bad).status_code == 422
    assert book.get(f"/book/{SYM}", depth=1000).status_code == 200
    # Service endpoints.
    assert book.get("/healthz").json()["status"] == "ok"
    ready = wait_for(lambda: book.get("/readyz").status_code == 200, "ready", proc=book)
    assert ready
    books = book.get("/books").json()["books"]
    assert books == [{"symbol": SYM, "sequence": feed.ref.sequence, "synced": True,
                      "owner": "solo", "ownerUrl": book.url, "local": True}]
    top = wait_for(lambda: (t := redis_sync.hgetall(keys.top(SYM)))
                   and t[b"sequence"] == str(feed.ref.sequence).encode() and t, "top")
    assert top[b"synced"] == b"1"
    assert top[b"bestBid"].decode() == feed.ref.best_bid_text()
    assert top[b"bestAsk"].decode() == feed.ref.best_ask_text()
    assert book.metric("kumex_book_synced") == 1.0
    assert book.metric("kumex_book_snapshot_requests_total") >= 1.0
    assert book.metric("kumex_book_messages_applied_total") > 0
    assert "kumex_book_http_request_duration_seconds_bucket" in book.get("/metrics").text


def serving(procs: list[BookProcess], redis_url: str, feed: Feed, after: int,
            **env: str) -> BookProcess:
    """A book started on a stored snapshot plus ``after`` messages, equal to the reference."""
    feed.publish(200)
    feed.store_snapshot()
    feed.publish(after)
    book = spawn(procs, redis_url, "solo", **env)
    assert book_at(book, feed) == feed.expected()
    return book


def unavailable(book: BookProcess, why: str) -> str:
    """Wait for ``GET /book`` to answer 503; its ``detail``."""
    wait_for(lambda: book.get(f"/book/{SYM}").status_code == 503, why, proc=book)
    detail: str = book.get(f"/book/{SYM}").json()["detail"]
    return detail


def test_gap_makes_503_then_resyncs_on_a_new_snapshot(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feed = Feed(redis_sync, seed=8)
    book = serving(procs, redis_url, feed, 200)
    # The feed loses 10 messages: the book must stop serving, never show a wrong book.
    feed.publish(100, lose=10)
    assert "not synced" in unavailable(book, "503 after the gap")
    assert book.get("/books").json()["books"][0]["synced"] is False
    feed.publish(50)
    # Still no usable snapshot: still 503.
    assert book.get(f"/book/{SYM}").status_code == 503
    feed.store_snapshot()
    feed.publish(100)
    assert book_at(book, feed) == feed.expected()
    assert book.metric("kumex_book_gaps_total") >= 1
    assert book.metric("kumex_book_resyncs_total") == 1
    assert book.metric("kumex_book_snapshots_used_total") == 2


def test_feed_disconnected_makes_503_until_the_book_is_shown_current(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feed = Feed(redis_sync, seed=9)
    book = serving(procs, redis_url, feed, 100)
    # The feed lost the exchange: the book is right at its sequence, but may be stale.
    redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "disconnected",
                                          "reason": "PingTimeout: no pong"})
    detail = unavailable(book, "503 after disconnected")
    assert "stale" in detail and "PingTimeout" in detail and str(feed.ref.sequence) in detail
    assert book.get(f"/book/{SYM}/l3").status_code == 503
    assert book.get("/books").json()["books"][0]["synced"] is False
    wait_for(lambda: redis_sync.hget(keys.top(SYM), "synced") in ("0", b"0"),
             "top synced=0 (refreshed at most 10 times a second)", proc=book)
    assert book.metric("kumex_book_synced") == 0.0
    # Back: ctl=connected, then the next contiguous message shows the book current.
    redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "connected", "connectId": "x"})
    feed.publish(50)
    assert book_at(book, feed) == feed.expected()
    assert book.metric("kumex_book_feed_disconnects_total") == 1.0
    assert book.metric("kumex_book_resyncs_total") == 0.0  # no snapshot was needed
    assert book.metric("kumex_book_snapshots_used_total") == 1.0


def test_feed_silent_makes_503_until_the_book_is_shown_current(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    # A feed killed outright writes no ctl=disconnected: its heartbeat key lapses.
    feed = Feed(redis_sync, seed=10)
    alive = keys.feed_alive(SYM)
    redis_sync.set(alive, '{"connectId":"first"}')
    book = serving(procs, redis_url, feed, 100, BOOK_FEED_CHECK_SECONDS="0.2")
    feed.publish(30)
    assert book_at(book, feed) == feed.expected()  # heartbeat there: served
    assert book.metric("kumex_book_feed_silent_total") == 0.0
    # Only a heartbeat the book saw while served tells it which connection it follows.
    wait_for(lambda: "following the feed's connection" in book.log_text(),
             "the book to see the heartbeat", proc=book)
    redis_sync.delete(alive)
    detail = unavailable(book, "503 once the heartbeat lapsed")
    assert "no heartbeat from the feed" in detail and str(feed.ref.sequence) in detail
    assert book.get("/books").json()["books"][0]["synced"] is False
    assert book.metric("kumex_book_feed_silent_total") == 1.0
    # Back on the same connection (it never broke: the feed was only late), in a quiet
    # market: served again without waiting for a message.
    redis_sync.set(alive, '{"connectId":"first"}')
    assert book_at(book, feed) == feed.expected()
    # Silent again; this time a new feed: its heartbeat alone proves nothing (what
    # happened between the two connections is unknown)...
    redis_sync.delete(alive)
    unavailable(book, "503 once the heartbeat lapsed again")
    assert book.metric("kumex_book_feed_silent_total") == 2.0
    redis_sync.set(alive, '{"connectId":"second"}')
    time.sleep(1.0)  # five of the book's checks (0.2 s): none may take it as the old one
    assert book.get(f"/book/{SYM}").status_code == 503
    # ...its ctl=connected and then a contiguous message show the book current.
    redis_sync.xadd(keys.l3_stream(SYM), {keys.FIELD_CTL: "connected", "connectId": "second"})
    feed.publish(50)
    assert book_at(book, feed) == feed.expected()
    assert book.metric("kumex_book_resyncs_total") == 0.0


def test_malformed_entry_goes_to_the_dlq(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feed = Feed(redis_sync, seed=9)
    feed.store_snapshot()
    feed.publish(100)
    book = spawn(procs, redis_url, "solo")
    book_at(book, feed)
    stream = keys.l3_stream(SYM)
    bad_id = redis_sync.xadd(stream, {keys.FIELD_MSG: '{"type":"message","subject":"open"'})
    other_id = redis_sync.xadd(stream, {"weird": "entry"})
    feed.publish(100)
    assert book_at(book, feed) == feed.expected()
    letters = wait_for(lambda: (d := redis_sync.xrange(keys.dlq(SYM))) and len(d) == 2 and d,
                       "two DLQ entries", proc=book)
    first = letters[0][1]
    assert first[b"raw"] == b'{"type":"message","subject":"open"'
    assert first[b"streamId"] == bad_id and first[b"reason"]
    assert letters[1][1][b"streamId"] == other_id
    assert book.metric("kumex_book_messages_refused_total") == 2
    assert book.get("/readyz").status_code == 200


def test_kill_and_restart_resumes_from_the_checkpoint(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feed = Feed(redis_sync, seed=10)
    feed.publish(300)
    feed.store_snapshot()
    feed.publish(500)
    book = spawn(procs, redis_url, "solo")
    book_at(book, feed)
    wait_for(lambda: redis_sync.hget(keys.checkpoint(SYM), "sequence")
             == str(feed.ref.sequence).encode(), "a checkpoint at the head", proc=book)
    book.kill()
    # No snapshot to fall back on: only the checkpoint can bring the book back.
    redis_sync.delete(keys.snapshot(SYM))
    feed.publish(400)
    requests = redis_sync.pubsub(  # type: ignore[no-untyped-call]
        ignore_subscribe_messages=True)
    requests.subscribe(keys.snapshot_requests(SYM))
    try:
        # The same replica id takes its lease back at once.
        book.start()
        assert book_at(book, feed) == feed.expected()
        assert book.metric("kumex_book_checkpoint_restores_total") == 1
        assert book.metric("kumex_book_snapshot_requests_total") == 0
        assert book.metric("kumex_book_snapshots_used_total") == 0
        assert requests.get_message(timeout=0.2) is None
    finally:
        requests.close()
    # SIGTERM: a last checkpoint, and the lease is released for the next replica.
    feed.publish(50)
    book_at(book, feed)
    assert book.stop() == 0
    assert redis_sync.hget(keys.checkpoint(SYM), "sequence") == str(feed.ref.sequence).encode()
    assert redis_sync.get(keys.owner(SYM, "book")) is None


def test_a_replica_paused_behind_many_read_batches_is_served_only_once_at_the_end(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    """SIGSTOP past ``BOOK_MAX_AGE_SECONDS`` while the stream grows by hundreds of read
    batches. After SIGCONT the book reads them batch by batch: a full batch may have more
    behind it, so no answer may be a 200 before the book holds everything written before
    the pause ended (each full batch showing the book "current" served it seconds old)."""
    feed = Feed(redis_sync, seed=12)
    feed.store_snapshot()
    feed.publish(200)
    book = spawn(procs, redis_url, "paused", BOOK_READ_BATCH="10", BOOK_MAX_AGE_SECONDS="1")
    book_at(book, feed)
    assert book.process is not None
    os.kill(book.process.pid, signal.SIGSTOP)
    try:
        feed.publish(4000)
        time.sleep(1.5)  # past the book's max age: nothing it holds is current any more
        target = feed.ref.sequence
    finally:
        os.kill(book.process.pid, signal.SIGCONT)
    answers: list[tuple[int, int]] = []
    with httpx.Client(base_url=book.url, timeout=10.0) as http:
        while not answers or answers[-1] != (200, target):
            assert len(answers) < 100_000, "the book never reached the head"
            r = http.get(f"/book/{SYM}", params={"depth": 1})
            answers.append((r.status_code, r.json()["sequence"] if r.status_code == 200 else 0))
    early = [seq for status, seq in answers if status == 200 and seq < target]
    print(f"{len(answers)} answers while catching up, "
          f"{sum(1 for s, _ in answers if s == 503)} 503s")
    assert not early, f"served behind the head: {early[:5]} < {target}"
    assert sum(1 for s, _ in answers if s == 503) >= 1  # the catching up was seen
    # A last batch that is full and ends the stream: the next read, finding nothing new,
    # shows the book current, and it stays served with no more messages. (Written while
    # the book is stopped, so that it reads them in batches of exactly 10.)
    msgs = feed.gen.take(40) + feed.gen.flush()
    whole = msgs[:len(msgs) - len(msgs) % 10]
    os.kill(book.process.pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)  # its blocked read times out (0.1 s): no read waits for these
        pipe = redis_sync.pipeline(transaction=False)
        for raw in whole:
            feed.ref.apply(parse_message(raw))
            pipe.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: raw})
        pipe.execute()
    finally:
        os.kill(book.process.pid, signal.SIGCONT)
    book_at(book, feed)
    time.sleep(2.0)  # twice the max age, nothing new on the stream
    assert book.get(f"/book/{SYM}", depth=1).status_code == 200


def test_sigterm_while_the_stream_flows_stops_cleanly(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    # Every XREAD goes through asyncio.wait_for (the client has a socket
    # timeout), which on Python 3.11 can swallow the one cancellation sent at
    # shutdown while a read completes: the consumer then read on and the
    # process never exited. Stop several times while three streams flow.
    feeds = [Feed(redis_sync, symbol, seed=30 + i) for i, symbol in enumerate(SYMBOLS)]
    for feed in feeds:
        feed.store_snapshot()
    flowing = threading.Event()
    flowing.set()
    published: list[BaseException] = []

    def flow() -> None:
        try:
            while flowing.is_set():
                for feed in feeds:
                    feed.publish(10)
                time.sleep(0.002)
        except BaseException as exc:  # reported by the test, not lost in the thread
            published.append(exc)

    writer = threading.Thread(target=flow, name="flow", daemon=True)
    writer.start()
    book = spawn(procs, redis_url, "solo", symbols=SYMBOLS)
    try:
        for _ in range(4):
            for symbol in SYMBOLS:
                wait_for(lambda s=symbol: book.get(f"/book/{s}").status_code == 200,
                         f"{symbol} served", timeout=SAFETY_S, proc=book)
            assert book.stop() == 0  # raises "ignored SIGTERM" if it hangs
            for symbol in SYMBOLS:
                assert redis_sync.get(keys.owner(symbol, "book")) is None
                assert redis_sync.hget(keys.checkpoint(symbol), "sequence") is not None
            book.start()
    finally:
        flowing.clear()
        writer.join()
    assert not published
    # Still right after all that: the book equals the reference once the flow stops.
    for feed in feeds:
        assert book_at(book, feed)["sequence"] == feed.ref.sequence
    assert book_at(book, feeds[0]) == feeds[0].expected()


def test_checkpoint_behind_a_trimmed_stream_is_not_used(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feed = Feed(redis_sync, seed=12)
    feed.store_snapshot()
    feed.publish(200)
    book = spawn(procs, redis_url, "solo")
    book_at(book, feed)
    assert book.stop() == 0  # a last checkpoint at the head, newer than the snapshot
    assert redis_sync.hget(keys.checkpoint(SYM), "sequence") == str(feed.ref.sequence).encode()
    # Meanwhile the feed went on and trimmed what followed the checkpoint.
    feed.publish(300)
    redis_sync.xtrim(keys.l3_stream(SYM), maxlen=100, approximate=False)
    requests = redis_sync.pubsub(  # type: ignore[no-untyped-call]
        ignore_subscribe_messages=True)
    requests.subscribe(keys.snapshot_requests(SYM))
    try:
        book.start()
        # Neither the checkpoint nor the old snapshot bridges the trimmed part.
        wait_for(lambda: requests.get_message(timeout=0.1), "a snapshot request", proc=book)
    finally:
        requests.close()
    assert book.get(f"/book/{SYM}").status_code == 503
    feed.store_snapshot()
    feed.publish(50)
    assert book_at(book, feed) == feed.expected()
    assert book.metric("kumex_book_checkpoint_restores_total") == 0


def test_two_replicas_share_three_symbols_and_take_over(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feeds = {s: Feed(redis_sync, s, seed=20 + i) for i, s in enumerate(SYMBOLS)}
    for f in feeds.values():
        f.publish(100)
        f.store_snapshot()
        f.publish(100)
    a = spawn(procs, redis_url, "rep-a", SYMBOLS)
    b = spawn(procs, redis_url, "rep-b", SYMBOLS)

    def all_synced(p: BookProcess) -> list[dict[str, Any]] | None:
        """Every symbol synced, in even shares (the first replica hands one symbol off to
        the second when it joins: owners read before that would change under the test)."""
        res = p.get("/books")
        rows: list[dict[str, Any]] = res.json()["books"] if res.status_code == 200 else []
        even = len({r["owner"] for r in rows}) == 2
        return rows if len(rows) == 3 and even and all(r["synced"] for r in rows) else None

    rows = wait_for(lambda: all_synced(a), "every symbol synced, in even shares", proc=a)
    owners = {r["symbol"]: r["owner"] for r in rows}
    assert set(owners.values()) <= {"rep-a", "rep-b"}
    for f in feeds.values():
        f.publish(100)
    # Every symbol from either replica: served by its owner, forwarded by the other.
    for symbol, f in feeds.items():
        for p in (a, b):
            assert book_at(p, f) == f.expected()
            res = p.get(f"/book/{symbol}", depth=5)
            assert res.status_code == 200 and res.json() == f.expected(5)
            assert res.headers["x-kumex-replica"] == owners[symbol]
            l3 = p.get(f"/book/{symbol}/l3", depth=1)
            assert l3.status_code == 200 and l3.json()["sequence"] == f.ref.sequence
    assert a.get("/book/NOPE").status_code == 404 and b.get("/book/NOPE").status_code == 404
    assert b.get(f"/book/{SYM}", depth=0).status_code == 422
    # Kill the replica holding XBTUSDM: the other serves every symbol within the bound.
    victim, survivor = (a, b) if owners[SYM] == "rep-a" else (b, a)
    victim.kill()
    for f in feeds.values():
        f.publish(50)

    def survivor_serves_all() -> bool:
        for symbol, f in feeds.items():
            res = survivor.get(f"/book/{symbol}", depth=1000)
            if res.status_code != 200 or res.headers.get("x-kumex-replica") != survivor.replica:
                return False
            if res.json() != f.expected():
                return False
        return True

    wait_for(survivor_serves_all, "the survivor serving every symbol", timeout=TAKEOVER_S,
             proc=survivor)
    rows = survivor.get("/books").json()["books"]
    assert {r["owner"] for r in rows} == {survivor.replica}
    assert all(r["local"] and r["synced"] for r in rows)


def test_websocket_pushes_changes(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    feed = Feed(redis_sync, seed=11)
    feed.store_snapshot()
    feed.publish(100)
    owner = spawn(procs, redis_url, "ws-a")
    book_at(owner, feed)
    other = spawn(procs, redis_url, "ws-b")  # owns nothing: relays the owner's socket

    async def scenario() -> None:
        ws_base = owner.url.replace("http", "ws")
        relay_base = other.url.replace("http", "ws")
        async with ws_connect(f"{ws_base}/ws/book/{SYM}?depth=5") as direct, \
                ws_connect(f"{relay_base}/ws/book/{SYM}?depth=5") as relayed:
            for ws in (direct, relayed):
                first = json.loads(await asyncio.wait_for(ws.recv(), SAFETY_S))
                assert _book_part(first) == feed.expected(5)
                assert first["own"] == []
            for _ in range(3):
                feed.publish(60)
                for ws in (direct, relayed):
                    # Pushes are throttled and may skip states: read until the newest.
                    async with asyncio.timeout(SAFETY_S):
                        while True:
                            body = json.loads(await ws.recv())
                            if body.get("sequence") == feed.ref.sequence:
                                break
                    assert _book_part(body) == feed.expected(5)
                    assert body["trades"] == [
                        {"price": t.price, "size": t.size, "side": t.side, "ts": t.ts}
                        for t in feed.ref.trades]
            # Own orders (the order monitor's keys) are marked with their queue place.
            bids, _ = feed.ref.l3(1)
            mine = bids[0].orders[-1]
            redis_sync.sadd(keys.orders_active(SYM), "my-coid")
            redis_sync.hset(keys.order(SYM, "my-coid"), mapping={"orderId": mine.order_id})
            want = feed.ref.queue_position(mine.order_id)
            assert want is not None
            async with asyncio.timeout(SAFETY_S):
                while not (body := json.loads(await direct.recv())).get("own"):
                    pass
            assert body["own"] == [{"orderId": mine.order_id, "side": "buy",
                                    "price": want.price_text, "size": str(want.size),
                                    "position": want.position,
                                    "sizeAhead": str(want.size_ahead)}]
        with pytest.raises(InvalidStatus):
            async with ws_connect(f"{ws_base}/ws/book/NOPE"):
                pass

    asyncio.run(scenario())


def _book_part(body: dict[str, Any]) -> dict[str, Any]:
    """The ``GET /book`` fields of a WebSocket push (which adds ``trades`` and ``own``)."""
    return {k: body[k] for k in ("symbol", "sequence", "ts", "bids", "asks")}


def test_root_serves_the_live_page(redis_url: str, procs: list[BookProcess]) -> None:
    book = spawn(procs, redis_url, "page")
    res = httpx.get(f"{book.url}/", timeout=10)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert "/ws/book/" in res.text


# --------------------------------------------------------------------------- the fast route


def _responses(sock: Any, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``n`` HTTP/1.1 responses (with content-length) from ``sock``, in order."""
    buf = b""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while len(out) < n:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = buf[:head_end].decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, v in
                       (line.split(":", 1) for line in lines[1:])}
            size = int(headers["content-length"])
            if len(buf) >= head_end + 4 + size:
                body = buf[head_end + 4:head_end + 4 + size]
                out.append((int(lines[0].split()[1]), headers, body))
                buf = buf[head_end + 4 + size:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(out)} of {n} responses"
        buf += chunk
    return out


def test_fast_route_answers_as_the_app_does(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    """The book's fast route (bodies written from the HTTP parser) gives the app's answers,
    in order on a pipelined connection, and the HTTP bounds hold for it."""
    import socket

    feed = Feed(redis_sync)
    feed.store_snapshot()
    feed.publish(500)
    book = spawn(procs, redis_url, "fast")
    book_at(book, feed)

    def fast_count() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in book.get("/metrics").text
                   .splitlines() if line.startswith("kumex_book_http_fast_requests_total{"))

    before = fast_count()
    cases = [("", {}), ("", {"depth": 1}), ("", {"depth": 1000}), ("/l3", {}),
             ("/l3", {"depth": 2})]
    for suffix, params in cases:
        fast = book.get(f"/book/{SYM}{suffix}", **params)
        # Any other query parameter sends the request to the app (which ignores it).
        slow = book.get(f"/book/{SYM}{suffix}", **params, via="app")
        assert fast.status_code == slow.status_code == 200
        assert fast.content == slow.content
        for name in ("content-type", "x-kumex-replica", "content-length"):
            assert fast.headers[name] == slow.headers[name], name
    assert book.get(f"/book/{SYM}").json() == feed.expected(12)
    assert fast_count() - before == len(cases) + 1
    # Refusals stay the app's: 404, 422, a trailing slash.
    for path in (f"/book/{SYM}?depth=0", f"/book/{SYM}?depth=x", "/book/NOPE", f"/book/{SYM}/"):
        assert httpx.get(book.url + path, timeout=10).status_code in (404, 422, 307), path
    assert fast_count() - before == len(cases) + 1

    host, port = book.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Pipelined: fast, app, fast: the answers come back in the order asked.
        sock.sendall(f"GET /book/{SYM}?depth=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                     f"GET /books HTTP/1.1\r\nHost: x\r\n\r\n"
                     f"GET /book/{SYM}/l3?depth=2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first, second, third = _responses(sock, 3)
        assert json.loads(first[2]) == feed.expected(1)
        assert "books" in json.loads(second[2])
        assert len(json.loads(third[2])["bids"]) == 2
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # HTTP/1.0: answered, then closed.
        sock.sendall(f"GET /book/{SYM}?depth=1 HTTP/1.0\r\n\r\n".encode())
        [(status, headers, _)] = _responses(sock, 1)
        assert status == 200 and headers["connection"] == "close"
        assert sock.recv(100) == b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # A head over 16 KiB: 431, and the connection is closed.
        sock.sendall(f"GET /book/{SYM} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20_000}\r\n\r\n"
                     .encode())
        [(status, _, body)] = _responses(sock, 1)
        assert status == 431 and b"too large" in body
        assert sock.recv(100) == b""
    assert book.get("/healthz").status_code == 200


def three_books(procs: list[BookProcess], redis_url: str, redis_sync: redis.Redis,
                replica: str, *, seed: int, published: int = 100,
                **env: str) -> tuple[dict[str, Feed], BookProcess]:
    """A stream with a snapshot and ``published`` messages for each of :data:`SYMBOLS`,
    and one replica keeping the three books, each checked equal to the exchange's."""
    feeds = {s: Feed(redis_sync, s, seed=seed + i) for i, s in enumerate(SYMBOLS)}
    for f in feeds.values():
        f.store_snapshot()
        f.publish(published)
    book = spawn(procs, redis_url, replica, SYMBOLS, **env)
    for f in feeds.values():
        assert book_at(book, f) == f.expected()
    return feeds, book


def test_one_stream_read_keeps_every_symbol(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    """A replica keeping three books waits on one XREAD for all of them, not one each,
    and every book still equals the exchange's as its stream moves on."""
    feeds, book = three_books(procs, redis_url, redis_sync, "one-reader", seed=40,
                              published=200)
    # Idle streams: the reader is blocked in XREAD nearly all the time. One read loop per
    # symbol would show three blocked clients.
    blocked = []
    for _ in range(60):
        blocked.append(int(redis_sync.info("clients")["blocked_clients"]))
        time.sleep(0.02)
    assert max(blocked) == 1, blocked
    # One symbol moving, the others quiet: each still served, and equal to its reference.
    for _ in range(3):
        feeds[SYMBOLS[1]].publish(150)
        for f in feeds.values():
            assert book_at(book, f) == f.expected()


def test_a_feed_flush_over_several_streams_is_read_in_one_round_trip(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    """The feed appends to several streams in one pipeline. Redis answers a blocked XREAD
    with the one stream whose write woke it; the reader's follow-up read, sent with it,
    brings the others in the same round trip: one round trip per flush, not one per
    stream it touched, and every book equal to the exchange's."""
    if is_cluster_url(redis_url):
        pytest.skip("on a cluster each slot has its own reader (one stream each here)")
    feeds, book = three_books(procs, redis_url, redis_sync, "follow-up", seed=80,
                              BOOK_READ_BLOCK_SECONDS="2")

    def round_trips() -> float:
        for line in book.get("/metrics").text.splitlines():
            if line.startswith("kumex_book_stream_reads_total "):
                return float(line.split()[1])
        raise AssertionError("no kumex_book_stream_reads_total")

    flushes = 20
    before = round_trips()
    for _ in range(flushes):
        # One flush: a few messages on every stream, in one pipeline, as the feed writes.
        pipe = redis_sync.pipeline(transaction=False)
        for f in feeds.values():
            for raw in f.gen.take(3) + f.gen.flush():
                f.ref.apply(parse_message(raw))
                pipe.xadd(keys.l3_stream(f.symbol), {keys.FIELD_MSG: raw})
        pipe.execute()
        for f in feeds.values():
            assert book_at(book, f) == f.expected()
    reads = round_trips() - before
    # One per flush (a read can also end at the 2 s block time); without the follow-up,
    # each flush took a round trip per stream after the first too.
    assert flushes <= reads <= flushes + 3, reads


def test_a_stream_key_redis_refuses_to_read_stops_only_its_own_book(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    """Fault: one symbol's stream key is replaced by a string (WRONGTYPE for any XREAD
    naming it). The replica reads every stream in one XREAD: that symbol answers 503
    saying why, the other books go on equal to the exchange's, and the symbol is served
    again once its key is a stream again."""
    feeds, book = three_books(procs, redis_url, redis_sync, "poisoned", seed=60,
                              BOOK_MAX_AGE_SECONDS="1")
    bad, good = feeds[SYMBOLS[2]], [feeds[s] for s in SYMBOLS[:2]]
    redis_sync.delete(keys.l3_stream(bad.symbol))
    redis_sync.set(keys.l3_stream(bad.symbol), b"not a stream")
    for _ in range(3):
        for f in good:
            f.publish(100)
        for f in good:
            assert book_at(book, f) == f.expected()
    res = wait_for(lambda: (r := book.get(f"/book/{bad.symbol}")).status_code == 503 and r,
                   f"{bad.symbol} refused", proc=book)
    assert "WRONGTYPE" in res.json()["detail"], res.text
    assert book.metric("kumex_book_stream_read_refusals_total", bad.symbol) >= 1
    # The key is a stream again (a new snapshot announced on it): served again.
    redis_sync.delete(keys.l3_stream(bad.symbol))
    bad.store_snapshot()
    bad.publish(100)
    assert book_at(book, bad) == bad.expected()
    for f in good:
        f.publish(50)
        assert book_at(book, f) == f.expected()


def test_connections_to_redis_gone_silent_are_given_up_and_made_again(
    redis_url: str, redis_sync: redis.Redis, procs: list[BookProcess]
) -> None:
    """Fault: every connection the book has open to Redis goes silent (no reply, no reset:
    a failover behind an address, a flushed NAT table). The book must not wait on them
    forever: within its read deadline it makes new ones and its book moves on again."""
    if is_cluster_url(redis_url):
        pytest.skip("a proxy in front of one server: a cluster's clients reach each node "
                    "at the address it announces (the master-kill test covers the cluster)")
    where = redis_sync.connection_pool.connection_kwargs
    feed = Feed(redis_sync, seed=71)
    feed.store_snapshot()
    feed.publish(100)
    with TcpProxy(where["host"], where["port"]) as proxy:
        book = spawn(procs, f"redis://{proxy.url_host}/0", "silenced")
        assert book_at(book, feed) == feed.expected()
        assert proxy.blackhole() >= 1
        feed.publish(100)
        assert book_at(book, feed) == feed.expected()
        feed.publish(100)
        assert book_at(book, feed) == feed.expected()
