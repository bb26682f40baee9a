"""The feed, from its parts to the whole process, with real Redis and real sockets.

* the buffer and the snapshot budget (pure, quick);
* the writer against a real Redis: one pipeline per batch, text unchanged,
  ``MAXLEN ~``, control entries; an outage (our own ``redis-server``,
  stopped and restarted) during which the reader is never blocked, the bound
  holds, and a ``ctl=gap`` appears after recovery; a key Redis refuses for
  good does not block the others;
* the WebSocket client over real sockets: a fake exchange that never pongs or
  never welcomes, and the sandbox refusing a topic;
* ``python -m services.feed`` as a process against the sandbox process and a
  real Redis: frames stored byte for byte, ``ctl=connected``, snapshots,
  a forced disconnect, a snapshot request on the pub/sub channel, SIGTERM.

Waits are bounded by a generous safety timeout and never asserted: the
assertions are about content, order and counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
import uvicorn
from fastapi import FastAPI, WebSocket
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.websockets import WebSocketDisconnect

from kumex_l3 import OrderBook, keys, parse_message, parse_snapshot
from kumex_l3.backoff import Backoff
from kumex_l3.lease import LeaseOwner, acquire
from kumex_l3.logs import kv, setup_logging
from kumex_l3.tasks import cancel_and_wait
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, eventually
from kumex_l3.testing.sandbox_proc import SandboxProcess
from kumex_l3.wsclient import (
    PingTimeout,
    SubscribeError,
    WelcomeTimeout,
    WsClient,
    WsOptions,
    level3_topic,
)
from services.feed.buffer import Control, FeedBuffer
from services.feed.lines import reconnect_delay
from services.feed.metrics import FeedMetrics
from services.feed.snapshots import Snapshotter, TokenBucket, parse_request, request_payload
from services.feed.writer import ROLE, StreamWriter
from services.sandbox.replay import read_capture
from tests.truth import assert_l3_equals_engine

SAFETY_S = 30.0  # a ceiling against hangs, never a measurement
_ROOT = Path(__file__).resolve().parents[2]


def _decode(fields: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


async def _xrange(client: redis.asyncio.Redis, key: str) -> list[dict[str, str]]:
    """A stream's entries, fields decoded, oldest first."""
    entries: Any = await client.xrange(key)
    return [_decode(fields) for _, fields in entries]


# =========================================================================== pure parts


def test_buffer_bound_and_gap_marker_position() -> None:
    buf = FeedBuffer(3)
    assert all(buf.put("A", i, f"a{i}") for i in range(3))
    assert not buf.put("A", 3, "a3")
    assert not buf.put("B", 0, "b0")
    assert buf.dropped == {"A": 1, "B": 1}
    assert buf.data_count == 3
    buf.commit(2)  # Redis took two
    assert buf.put("A", 4, "a4")  # room again: A's gap marker goes first
    entries = buf.peek(10)
    assert [e[1] for e in entries[:1]] == [(2, "a2")]
    marker = entries[1][1]
    assert isinstance(marker, Control) and marker.fenced
    assert dict(marker.fields) == {"ctl": "gap", "reason": "buffer_overflow", "dropped": "1"}
    assert entries[2] == ("A", (4, "a4"))
    assert buf.pending_gaps == {"B": 1}
    assert buf.put("A", 5, "a5")  # full again: B's marker must wait for room
    assert buf.settle_gaps() == []
    buf.commit(4)  # a2, A's marker, a4, a5
    assert buf.settle_gaps() == ["B"]
    (last,) = buf.peek(10)
    assert last[0] == "B" and isinstance(last[1], Control)
    assert last[1].fields["dropped"] == "1"


def test_token_bucket_budget() -> None:
    bucket = TokenBucket(1.0, now=0.0)  # the real venue: 1 a minute
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(60.0)
    assert bucket.take(30.0) == pytest.approx(30.0)
    assert bucket.take(60.0) == 0.0
    bucket.empty(61.0)
    assert bucket.take(61.0) == pytest.approx(60.0)
    fast = TokenBucket(120.0, now=0.0)  # burst of 120, then 2 a second
    assert all(fast.take(0.0) == 0.0 for _ in range(120))
    assert fast.take(0.0) == pytest.approx(0.5)
    unlimited = TokenBucket(0.0, now=0.0)
    assert all(unlimited.take(0.0) == 0.0 for _ in range(1000))


def test_snapshot_request_payloads() -> None:
    assert parse_request(b"0") == (0, "")
    assert parse_request(b"") == (0, "")
    assert parse_request(b" 1639148481406 ") == (1639148481406, "")
    assert parse_request(b"1639148481406 gap") == (1639148481406, "gap")
    assert parse_request(request_payload(7, "session")) == (7, "session")
    assert parse_request(b"-5") is None
    assert parse_request("abc") is None
    assert parse_request("5 two words") is None


def test_log_lines_are_one_line_with_fields_and_redacted() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("info", "feed", secrets=["hunter2-secret", None, ""], stream=stream)
        log = logging.getLogger("services.feed.test")
        log.info("connected %s", "with hunter2-secret inside", extra=kv(
            connectId="c1", note="two words", token="x-hunter2-secret-y"))
        try:
            raise ValueError("boom\nhunter2-secret")
        except ValueError:
            log.exception("failed")
        log.debug("hidden")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "hunter2" not in stream.getvalue()
    ts, level, service, *_ = lines[0].split(" ")
    assert ts.endswith("Z") and "T" in ts
    assert (level, service) == ("INFO", "feed")
    assert lines[0].endswith('connectId=c1 note="two words" token=x-***-y')
    assert "connected with *** inside" in lines[0]
    assert lines[1].split(" ")[1] == "ERROR" and "exc=" in lines[1] and "boom" in lines[1]


# =========================================================================== the writer


def _client(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                        retry=Retry(NoBackoff(), 0))


def _writer(client: redis.asyncio.Redis, metrics: FeedMetrics | None = None,
            **kwargs: Any) -> StreamWriter:
    kwargs.setdefault("buffer_max", 100_000)
    kwargs.setdefault("batch_size", 500)
    kwargs.setdefault("maxlen", 100_000)
    kwargs.setdefault("backoff", Backoff(0.02, 2.0, 0.2, seed=1))
    return StreamWriter(client, metrics or FeedMetrics(), **kwargs)


_OWNER = LeaseOwner("feed-under-test")


async def _fence(writer: StreamWriter, client: redis.asyncio.Redis, *symbols: str) -> None:
    """Take the writer lease of ``symbols`` (for a minute) and write under it."""
    for symbol in symbols:
        assert await acquire(client, symbol, ROLE, _OWNER, 60.0)
        writer.fence(symbol, _OWNER.to_json())


def _append(writer: StreamWriter, symbol: str, seq: int) -> bool:
    return writer.append(symbol, seq, _frame(symbol, seq))


@contextlib.asynccontextmanager
async def running(writer: StreamWriter) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(writer.run())
    try:
        yield task
    finally:
        writer.close()
        try:
            async with asyncio.timeout(SAFETY_S):
                await task
        except TimeoutError:
            task.cancel()
            raise


def _frame(symbol: str, seq: int) -> str:
    # Odd spacing and unicode on purpose: stored text must be byte-equal.
    return ('{"type":"message","topic":"/contractMarket/level3v2:' + symbol + '",'
            '"subject":"received","data":{"symbol":"' + symbol + f'","sequence":{seq}, '
            f'"orderId":"o{seq}","clientOid":"é-{seq}","ts":1654073289160921530}}}}')


async def test_writer_batches_pipelines_and_keeps_text(redis_client: redis.asyncio.Redis) -> None:
    sent = [_frame("XBTUSDM", 1000 + i) for i in range(1200)]
    metrics = FeedMetrics()
    writer = _writer(redis_client, metrics, batch_size=500)
    await _fence(writer, redis_client, "XBTUSDM")
    for i, text in enumerate(sent):
        assert writer.append("XBTUSDM", 1000 + i, text)
    async with running(writer):
        await eventually(lambda: not writer.buffer, "the buffer to drain")
    entries = await _xrange(redis_client, keys.l3_stream("XBTUSDM"))
    assert entries == [{"msg": t} for t in sent]
    assert writer.pipelines == 3  # 1200 messages, 500 a pipeline
    assert metrics.registry.get_sample_value(
        "kumex_feed_messages_written_total", {"symbol": "XBTUSDM"}) == 1200
    assert await redis_client.get(keys.stream_head("XBTUSDM")) == b"2199"


async def test_writer_trims_streams_approximately(redis_client: redis.asyncio.Redis) -> None:
    writer = _writer(redis_client, maxlen=100, batch_size=1000)
    await _fence(writer, redis_client, "XBTUSDM")
    for i in range(3000):
        _append(writer, "XBTUSDM", i)
    async with running(writer):
        await eventually(lambda: not writer.buffer, "the buffer to drain")
    length = await redis_client.xlen(keys.l3_stream("XBTUSDM"))
    assert 100 <= length < 3000


async def test_control_entries_snapshot_and_dead_letters(
        redis_client: redis.asyncio.Redis) -> None:
    writer = _writer(redis_client)
    await _fence(writer, redis_client, "XBTUSDM")
    snap = b'{"symbol":"XBTUSDM","sequence":41,"ts":1,"asks":[],"bids":[]}'
    older = b'{"symbol":"XBTUSDM","sequence":40,"ts":1,"asks":[],"bids":[]}'
    writer.control("XBTUSDM", "connected", connectId="cid-1")
    _append(writer, "XBTUSDM", 42)
    writer.snapshot("XBTUSDM", snap, 41)
    writer.snapshot("XBTUSDM", older, 40)  # late: never replaces a newer one
    writer.dead_letter("XBTUSDM", "snapshot: bad", b"\x00raw")
    async with running(writer):
        await eventually(lambda: not writer.buffer, "the buffer to drain")
    stream = await _xrange(redis_client, keys.l3_stream("XBTUSDM"))
    assert stream == [
        {"ctl": "connected", "connectId": "cid-1"},
        {"msg": _frame("XBTUSDM", 42)},
        {"ctl": "snapshot", "sequence": "41"},
    ]
    assert await redis_client.get(keys.snapshot("XBTUSDM")) == snap
    (dead,) = await _xrange(redis_client, keys.dlq("XBTUSDM"))
    assert dead == {"reason": "snapshot: bad", "raw": "\x00raw"}


async def test_redis_outage_keeps_reader_free_bound_and_records_gap(tmp_path: Path) -> None:
    """Fault: Redis stops. The reader keeps appending, the bound holds, a gap is recorded."""
    bound = 50
    metrics = FeedMetrics()
    with RedisServer(dir=tmp_path, appendonly=True) as server:
        client = _client(server.url)
        writer = _writer(client, metrics, buffer_max=bound, batch_size=20)
        try:
            await _fence(writer, client, "XBTUSDM", "ETHUSDTM")
            async with running(writer) as task:
                for seq in range(10):
                    _append(writer, "XBTUSDM", seq)
                await eventually(lambda: not writer.buffer, "the first messages to be written")

                server.stop()
                # The reader's side: 300 messages while Redis is down. Each append
                # returns at once; the event loop keeps running (the writer is
                # retrying meanwhile) and nothing ever holds more than the bound.
                accepted: list[int] = []
                for seq in range(10, 310):
                    if _append(writer, "XBTUSDM", seq):
                        accepted.append(seq)
                    assert writer.buffer.data_count <= bound
                    if seq % 25 == 0:
                        await asyncio.sleep(0.01)
                _append(writer, "ETHUSDTM", 1)  # full too: dropped
                assert not task.done()
                assert accepted == list(range(10, 10 + bound))
                await eventually(lambda: bool(metrics.registry.get_sample_value(
                    "kumex_feed_redis_errors_total", {"op": "write"})), "a write error")
                assert not writer.redis_ok.is_set()

                server.start()  # same port, same append-only data
                await eventually(lambda: not writer.buffer, "the buffer to drain after recovery")
                for seq in (310, 311):
                    _append(writer, "XBTUSDM", seq)
                await eventually(lambda: not writer.buffer, "the last messages")
                assert not task.done()
                assert writer.redis_ok.is_set()

            stream = await _xrange(client, keys.l3_stream("XBTUSDM"))
            msgs = [json.loads(e["msg"])["data"]["sequence"] if "msg" in e else e
                    for e in stream]
            # The gap marker sits where the loss happened, before the next message.
            assert msgs == [*range(10 + bound),
                            {"ctl": "gap", "reason": "buffer_overflow",
                             "dropped": str(300 - bound)},
                            310, 311]
            eth = await _xrange(client, keys.l3_stream("ETHUSDTM"))
            assert eth == [{"ctl": "gap", "reason": "buffer_overflow", "dropped": "1"}]
            sample = metrics.registry.get_sample_value
            assert sample("kumex_feed_messages_dropped_total", {"symbol": "XBTUSDM"}) == 250
            assert sample("kumex_feed_gaps_total", {"symbol": "XBTUSDM"}) == 1
            assert sample("kumex_feed_gaps_total", {"symbol": "ETHUSDTM"}) == 1
            assert sample("kumex_feed_messages_written_total", {"symbol": "XBTUSDM"}) == 62
        finally:
            await client.aclose()


async def test_a_key_redis_refuses_does_not_block_others(
        redis_client: redis.asyncio.Redis) -> None:
    """Fault: one symbol's stream key holds a string (WRONGTYPE): that symbol loses, not others."""
    await redis_client.set(keys.l3_stream("XBTUSDTM"), b"not a stream")
    metrics = FeedMetrics()
    writer = _writer(redis_client, metrics)
    await _fence(writer, redis_client, "XBTUSDM", "XBTUSDTM")
    for seq in range(5):
        _append(writer, "XBTUSDM", seq)
        _append(writer, "XBTUSDTM", seq)
    async with running(writer) as task:
        await eventually(lambda: not writer.buffer and not writer.buffer.pending_gaps,
                         "the buffer to drain")
        assert not task.done()
    assert await redis_client.xlen(keys.l3_stream("XBTUSDM")) == 5
    sample = metrics.registry.get_sample_value
    assert sample("kumex_feed_messages_dropped_total", {"symbol": "XBTUSDTM"}) == 5
    assert (sample("kumex_feed_redis_errors_total", {"op": "write"}) or 0) >= 5


async def test_writer_is_fenced_by_the_lease_and_writes_each_sequence_once(
        redis_client: redis.asyncio.Redis) -> None:
    """Only the lease holder writes; a sequence at or below the stream head is not written
    again (a retried batch, a takeover that starts early); a head that cannot be right
    (far above every frame) does not stop the stream."""
    metrics = FeedMetrics()
    fenced: list[str] = []
    writer = _writer(redis_client, metrics, on_fenced=fenced.append)
    await _fence(writer, redis_client, "XBTUSDM")
    for seq in (1, 2, 3, 2, 3, 4):
        _append(writer, "XBTUSDM", seq)
    async with running(writer):
        await eventually(lambda: not writer.buffer, "the buffer to drain")
        stream = await _xrange(redis_client, keys.l3_stream("XBTUSDM"))
        assert [json.loads(e["msg"])["data"]["sequence"] for e in stream] == [1, 2, 3, 4]
        sample = metrics.registry.get_sample_value
        assert sample("kumex_feed_messages_repeated_total", {"symbol": "XBTUSDM"}) == 2
        # Another feed takes the lease (ours lapsed while we were paused, say).
        await redis_client.set(keys.owner("XBTUSDM", ROLE), LeaseOwner("other").to_json())
        _append(writer, "XBTUSDM", 5)
        writer.control("XBTUSDM", "disconnected", reason="late")
        await eventually(lambda: not writer.buffer, "the buffer to drain")
        assert await redis_client.xlen(keys.l3_stream("XBTUSDM")) == 4
        assert fenced == ["XBTUSDM"]
        assert sample("kumex_feed_messages_fenced_total", {"symbol": "XBTUSDM"}) == 2
        # A head nobody could have written honestly (a wedge) is not obeyed.
        await redis_client.set(keys.owner("XBTUSDM", ROLE), _OWNER.to_json())
        await redis_client.set(keys.stream_head("XBTUSDM"), str(2**63 - 1))
        _append(writer, "XBTUSDM", 6)
        await eventually(lambda: not writer.buffer, "the buffer to drain")
        assert await redis_client.get(keys.stream_head("XBTUSDM")) == b"6"
        assert await redis_client.xlen(keys.l3_stream("XBTUSDM")) == 5


# =========================================================================== ws client


class FakeExchange:
    """bullet-public and a WS endpoint that misbehave on request (welcome, pong)."""

    def __init__(self, *, welcome: bool = True, pong: bool = True) -> None:
        self.welcome = welcome
        self.pong = pong
        self.port = 0
        self.pings = 0
        self.app = FastAPI()
        self.app.post("/api/v1/bullet-public")(self._bullet)
        self.app.websocket("/endpoint")(self._endpoint)

    async def _bullet(self) -> dict[str, Any]:
        return {"code": "200000", "data": {"token": "fake-token", "instanceServers": [{
            "endpoint": f"ws://127.0.0.1:{self.port}/endpoint", "encrypt": False,
            "protocol": "websocket", "pingInterval": 100, "pingTimeout": 300}]}}

    async def _endpoint(self, ws: WebSocket) -> None:
        await ws.accept()
        cid = ws.query_params.get("connectId")
        if self.welcome:
            await ws.send_text(json.dumps({"id": cid, "type": "welcome"}))
        try:
            while True:
                msg = json.loads(await ws.receive_text())
                if msg["type"] == "ping":
                    self.pings += 1
                    if self.pong:
                        await ws.send_text(json.dumps({"id": msg["id"], "type": "pong"}))
                elif msg["type"] == "subscribe":
                    await ws.send_text(json.dumps({"id": msg["id"], "type": "ack"}))
        except WebSocketDisconnect:
            pass



@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """Every test here runs on one Redis, then on the Redis Cluster."""
    return any_redis_url

@pytest.fixture
async def fake_exchange() -> AsyncIterator[Callable[..., Awaitable[FakeExchange]]]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def make(**kwargs: Any) -> FakeExchange:
        fake = FakeExchange(**kwargs)
        config = uvicorn.Config(fake.app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", ws_ping_interval=None)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        await eventually(lambda: server.started, "the fake exchange to start")
        fake.port = int(server.servers[0].sockets[0].getsockname()[1])
        servers.append((server, task))
        return fake

    yield make
    for server, task in servers:
        server.should_exit = True
        await task


async def test_wsclient_keeps_pinging_while_pongs_come(
        fake_exchange: Callable[..., Awaitable[FakeExchange]]) -> None:
    fake = await fake_exchange()
    async with WsClient(f"http://127.0.0.1:{fake.port}") as client, \
            client.connect([level3_topic("XBTUSDM")]) as conn:
        assert conn.topics == [level3_topic("XBTUSDM")]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):  # pings every 100 ms, no data comes
                await conn.recv()
        assert fake.pings >= 2


async def test_wsclient_no_pong_means_dead(
        fake_exchange: Callable[..., Awaitable[FakeExchange]]) -> None:
    """Fault: the server stops answering pings; recv() raises PingTimeout."""
    fake = await fake_exchange(pong=False)
    async with WsClient(f"http://127.0.0.1:{fake.port}",
                        options=WsOptions(close_timeout=0.5)) as client, \
            client.connect([level3_topic("XBTUSDM")]) as conn:
        with pytest.raises(PingTimeout):
            async with asyncio.timeout(SAFETY_S):
                await conn.recv()


async def test_wsclient_no_welcome_times_out(
        fake_exchange: Callable[..., Awaitable[FakeExchange]]) -> None:
    fake = await fake_exchange(welcome=False)
    async with WsClient(f"http://127.0.0.1:{fake.port}",
                        options=WsOptions(welcome_timeout=0.3)) as client:
        with pytest.raises(WelcomeTimeout):
            async with client.connect([level3_topic("XBTUSDM")]):
                pass


async def test_wsclient_subscribe_refused_by_the_sandbox(sandbox: SandboxProcess) -> None:
    async with WsClient(sandbox.base_url) as client:
        with pytest.raises(SubscribeError) as info:
            async with client.connect([level3_topic("XBTUSDM"), level3_topic("NOPEUSDM")]):
                pass
    assert info.value.topic == level3_topic("NOPEUSDM")


# =========================================================================== the process


class FeedProcess(ServiceProcess):
    """``python -m services.feed`` with its log in a temporary file, started at once."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__("services.feed", {"FEED_HTTP_HOST": "127.0.0.1", **env},
                         port_var="FEED_HTTP_PORT",
                         prefix=("FEED_", "KUMEX_", "REDIS_URL", "LOG_LEVEL"),
                         stop_timeout=SAFETY_S, check_stop=False)
        self.start(wait=False)

    @property
    def http_port(self) -> int:
        return self.port

    async def get(self, path: str) -> httpx.Response | None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            try:
                return await client.get(self.url + path)
            except httpx.HTTPError:
                return None

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        reply = await self.get("/metrics")
        assert reply is not None and reply.status_code == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(reply.text)
                for s in family.samples}

    async def ready(self) -> bool:
        self.check_running()
        reply = await self.get("/readyz")
        return reply is not None and reply.status_code == 200


@pytest.fixture
def feed_process(request: pytest.FixtureRequest) -> Iterator[Callable[[dict[str, str]],
                                                                        FeedProcess]]:
    started: list[FeedProcess] = []

    def start(env: dict[str, str]) -> FeedProcess:
        proc = FeedProcess(env)
        started.append(proc)
        return proc

    yield start
    report = getattr(request.node, "rep_call", None)
    for proc in started:
        proc.stop()
        if report is not None and report.failed:
            sys.stderr.write(f"--- feed log ---\n{proc.log_text()}\n")
        proc.close()


def _metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
            **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    """``name`` summed over every label set."""
    return sum(v for (n, _), v in samples.items() if n == name)


async def _entries(client: redis.asyncio.Redis, symbol: str) -> list[dict[str, str]]:
    return await _xrange(client, keys.l3_stream(symbol))


def _ctl(entries: list[dict[str, str]], ctl: str) -> list[dict[str, str]]:
    return [e for e in entries if e.get("ctl") == ctl]


async def _step(sandbox: SandboxProcess, n: int) -> None:
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
        (await http.post("/sandbox/step", json={"n": n})).raise_for_status()


def _sequences(entries: list[dict[str, str]]) -> list[int]:
    out = []
    for e in entries:
        if "msg" in e:
            msg = parse_message(e["msg"])
            out.append(msg.sequence)  # type: ignore[union-attr]
    return out


async def test_feed_process_against_the_sandbox(
    sandbox: SandboxProcess, redis_url: str, redis_client: redis.asyncio.Redis,
    feed_process: Callable[[dict[str, str]], FeedProcess], tmp_path: Path,
) -> None:
    symbols = ("XBTUSDM", "XBTUSDTM")
    capture = tmp_path / "capture.jsonl.gz"
    feed = feed_process({
        "REDIS_URL": redis_url, "KUMEX_BASE_URL": sandbox.base_url,
        "KUMEX_SYMBOLS": ",".join(symbols), "KUMEX_API_SECRET": "never-log-this-s3cret",
        "FEED_SNAPSHOT_PER_MIN": "60", "FEED_BACKOFF_INITIAL": "0.1",
        "FEED_BACKOFF_MAX": "0.5", "FEED_CAPTURE": str(capture), "LOG_LEVEL": "info",
        "FEED_HEARTBEAT_TTL_SECONDS": "1",
    })
    await eventually(feed.ready, "the feed to be ready")

    async def heartbeat_of(symbol: str) -> str | None:
        raw = await redis_client.get(keys.feed_alive(symbol))
        return None if raw is None else str(json.loads(raw)["connectId"])

    # Start: ctl=connected, then a snapshot stored and announced, for every symbol.
    async def snapshots_announced(count: int) -> bool:
        for s in symbols:
            if len(_ctl(await _entries(redis_client, s), "snapshot")) < count:
                return False
        return True

    await eventually(lambda: snapshots_announced(1), "the first snapshots")
    for symbol in symbols:
        entries = await _entries(redis_client, symbol)
        assert entries[0]["ctl"] == "connected" and entries[0]["connectId"]
        (announced,) = _ctl(entries, "snapshot")
        stored = await redis_client.get(keys.snapshot(symbol))
        assert stored is not None
        snap = parse_snapshot(stored)
        assert snap.symbol == symbol
        assert str(snap.sequence) == announced["sequence"]

    # Data: what the sandbox sends is what lands in the stream, byte for byte.
    seen: dict[str, dict[int, str]] = {s: {} for s in symbols}
    async with WsClient(sandbox.base_url) as client, \
            client.connect([level3_topic(s) for s in symbols]) as conn:
        await _step(sandbox, 150)

        async def collect() -> None:
            while True:
                text = await conn.recv()
                msg = parse_message(text)
                seen[msg.symbol][msg.sequence] = text  # type: ignore[union-attr]

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await collect()
    assert all(seen[s] for s in symbols)

    async def stored_all() -> bool:
        for s in symbols:
            if not set(seen[s]) <= set(_sequences(await _entries(redis_client, s))):
                return False
        return True

    await eventually(stored_all, "the stepped messages in the streams")
    for symbol in symbols:
        entries = await _entries(redis_client, symbol)
        by_seq = {parse_message(e["msg"]).sequence: e["msg"]  # type: ignore[union-attr]
                  for e in entries if "msg" in e}
        for seq, text in seen[symbol].items():
            assert by_seq[seq].encode() == text.encode()
        seqs = _sequences(entries)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # consecutive

    # Fault: the sandbox drops every socket. The feed reconnects: a second
    # ctl=connected (new connectId) and a fresh snapshot, for every symbol.
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
        (await http.post("/sandbox/disconnect")).raise_for_status()

    async def reconnected() -> bool:
        for s in symbols:
            if len(_ctl(await _entries(redis_client, s), "connected")) < 2:
                return False
        return True

    await eventually(reconnected, "a second ctl=connected")
    await eventually(lambda: snapshots_announced(2), "the snapshots after the reconnect")
    await eventually(feed.ready, "the feed to be ready again")
    for symbol in symbols:
        entries = await _entries(redis_client, symbol)
        first, second = _ctl(entries, "connected")
        assert first["connectId"] != second["connectId"]
        # The heartbeat, kept alive with a short TTL, names the connection of now.
        await eventually(lambda s=symbol, c=second["connectId"]: _equals(heartbeat_of(s), c),
                         "the heartbeat of the second connection")
        assert 0 < await redis_client.pttl(keys.feed_alive(symbol)) <= 1000
        # The end of the first connection is marked after its data, before the second.
        (down,) = _ctl(entries, "disconnected")
        assert down["connectId"] == first["connectId"] and down["reason"]
        order = [e.get("ctl") for e in entries if e.get("ctl") in ("connected", "disconnected")]
        assert order == ["connected", "disconnected", "connected"]
    samples = await feed.metrics()
    assert _metric(samples, "kumex_feed_reconnects_total") >= 1
    assert _metric(samples, "kumex_feed_connections_total") >= 2

    # Data after the reconnect keeps its sequence (no flow ran while it was down).
    before = {s: _sequences(await _entries(redis_client, s))[-1] for s in symbols}
    await _step(sandbox, 60)

    async def more_data() -> bool:
        for s in symbols:
            if _sequences(await _entries(redis_client, s))[-1] <= before[s]:
                return False
        return True

    await eventually(more_data, "data after the reconnect")
    for symbol in symbols:
        seqs = _sequences(await _entries(redis_client, symbol))
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    # A consumer asks for a snapshot on the pub/sub channel: served within the budget.
    samples = await feed.metrics()
    fetched = _metric(samples, "kumex_feed_snapshots_fetched_total", symbol="XBTUSDM")
    # The feed's own requests (one at each session start) came through the channel too.
    asked = _metric(samples, "kumex_feed_snapshot_requests_total", symbol="XBTUSDM")
    assert asked == 2
    await redis_client.publish(keys.snapshot_requests("XBTUSDM"), b"0")
    await eventually(lambda: _snapshot_count(redis_client, "XBTUSDM", 3),
                     "the requested snapshot")
    samples = await feed.metrics()
    assert _metric(samples, "kumex_feed_snapshot_requests_total", symbol="XBTUSDM") == asked + 1
    assert _metric(samples, "kumex_feed_snapshots_fetched_total",
                   symbol="XBTUSDM") == fetched + 1
    # Asking for what is already stored is answered without spending budget.
    latest = _ctl(await _entries(redis_client, "XBTUSDM"), "snapshot")[-1]["sequence"]
    await redis_client.publish(keys.snapshot_requests("XBTUSDM"), latest.encode())
    await eventually(lambda: _snapshot_count(redis_client, "XBTUSDM", 4),
                     "the re-announced snapshot")
    samples = await feed.metrics()
    assert _metric(samples, "kumex_feed_snapshots_fetched_total",
                   symbol="XBTUSDM") == fetched + 1
    assert _ctl(await _entries(redis_client, "XBTUSDM"), "snapshot")[-1]["sequence"] == latest

    # SIGTERM: a clean stop (buffer flushed, capture closed), the end marked in every stream.
    assert feed.stop() == 0
    for symbol in symbols:
        last = (await _entries(redis_client, symbol))[-1]
        assert last.get("ctl") == "disconnected" and last["reason"] == "the feed is stopping"
        # No feed, no heartbeat: it lapses (after at most its 1 s TTL).
        await eventually(lambda s=symbol: _equals(heartbeat_of(s), None), "the heartbeat lapsed")
    log = feed.log_text()
    assert "never-log-this-s3cret" not in log
    assert " INFO feed line connected and subscribed " in log
    assert " INFO feed snapshot stored " in log
    captured = list(read_capture(capture))
    for symbol in symbols:
        stream = [e["msg"] for e in await _entries(redis_client, symbol) if "msg" in e]
        assert [t for t in captured if f'level3v2:{symbol}"' in t] == stream


async def test_a_feed_capture_replays_to_the_exchange_book(
    sandbox: SandboxProcess, redis_url: str, redis_client: redis.asyncio.Redis,
    feed_process: Callable[[dict[str, str]], FeedProcess], tmp_path: Path,
) -> None:
    """FEED_CAPTURE, then ``python -m kumex_l3 replay`` from a snapshot taken while it ran:
    the replayed book is the engine's, order by order; the samples follow the book."""
    symbol = "XBTUSDM"
    capture = tmp_path / "capture.jsonl.gz"
    feed = feed_process({
        "REDIS_URL": redis_url, "KUMEX_BASE_URL": sandbox.base_url,
        "KUMEX_SYMBOLS": f"{symbol},ETHUSDTM", "FEED_SNAPSHOT_PER_MIN": "60",
        "FEED_CAPTURE": str(capture), "FEED_LINES": "1",
    })
    await eventually(feed.ready, "the feed to be ready")
    await eventually(lambda: _has_snapshot(redis_client, symbol), "the feed's first snapshot")
    await _step(sandbox, 300)
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
        snap = (await http.get(f"/sandbox/snapshot/{symbol}")).json()
        (tmp_path / "snapshot.json").write_text(json.dumps(snap))
        await _step(sandbox, 1500)
        engine = (await http.get(f"/sandbox/book/{symbol}")).json()

    async def written() -> bool:
        got = _sequences(await _entries(redis_client, symbol))
        return bool(got) and got[-1] == engine["sequence"]

    await eventually(written, "every message in the stream")
    assert feed.stop() == 0  # the capture is closed
    resting = next(o["orderId"] for lv in engine["bids"] for o in lv["orders"])
    done = subprocess.run(
        [sys.executable, "-m", "kumex_l3", "replay", str(capture),
         "--snapshot", str(tmp_path / "snapshot.json"), "--out", str(tmp_path / "out.json"),
         "--every", "1", "--samples", str(tmp_path / "depth.csv"), "--depth", "3"],
        capture_output=True, text=True, timeout=SAFETY_S, check=False)
    assert done.returncode == 0, done.stderr
    book = OrderBook.from_snapshot(json.loads((tmp_path / "out.json").read_text()))
    bids, asks = book.l3()
    ours = {"sequence": book.sequence, **{
        side: [{"price": lv.text, "orders": [{"orderId": o.order_id, "size": o.size}
                                              for o in lv.orders]} for lv in levels]
        for side, levels in (("bids", bids), ("asks", asks))}}
    assert_l3_equals_engine(ours, engine)
    assert f"{symbol}: " in done.stderr and " msg/s" in done.stderr
    # A depth sample after every message, the last one the final book's top.
    with (tmp_path / "depth.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["sequence"] for r in rows}) > 100
    assert int(rows[-1]["sequence"]) == book.sequence
    last = [r for r in rows if r["sequence"] == rows[-1]["sequence"]]
    for side, levels in zip(("buy", "sell"), book.depth(3), strict=True):
        assert [(r["price"], r["size"], int(r["orders"])) for r in last if r["side"] == side] \
            == [(str(p), str(sz), n) for p, sz, n in levels]
    # An order's queue place, sampled the same way.
    done = subprocess.run(
        [sys.executable, "-m", "kumex_l3", "replay", str(capture),
         "--snapshot", str(tmp_path / "snapshot.json"), "--every", "1",
         "--samples", str(tmp_path / "queue.csv"), "--order", resting],
        capture_output=True, text=True, timeout=SAFETY_S, check=False)
    assert done.returncode == 0, done.stderr
    with (tmp_path / "queue.csv").open() as fh:
        places = list(csv.DictReader(fh))
    assert places and places[-1]["orderId"] == resting
    assert int(places[-1]["sequence"]) == book.sequence
    pos = book.queue_position(resting)
    assert pos is not None and int(places[-1]["position"]) == pos.position


async def _has_snapshot(client: redis.asyncio.Redis, symbol: str) -> bool:
    return bool(_ctl(await _entries(client, symbol), "snapshot"))


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _snapshot_count(client: redis.asyncio.Redis, symbol: str, count: int) -> bool:
    return len(_ctl(await _entries(client, symbol), "snapshot")) >= count


async def test_feed_backs_off_when_the_venue_refuses_snapshots(
    sandbox: SandboxProcess, redis_url: str, redis_client: redis.asyncio.Redis,
    feed_process: Callable[[dict[str, str]], FeedProcess],
) -> None:
    """Fault: the venue allows 1 snapshot a minute, the feed's budget says more: 429s."""
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
        (await http.post("/sandbox/faults",
                         json={"snapshot_rate_per_min": 1})).raise_for_status()
    feed = feed_process({
        "REDIS_URL": redis_url, "KUMEX_BASE_URL": sandbox.base_url,
        "KUMEX_SYMBOLS": "XBTUSDM,XBTUSDTM", "FEED_SNAPSHOT_PER_MIN": "0",
        "FEED_BACKOFF_INITIAL": "0.1", "FEED_BACKOFF_MAX": "0.5",
    })
    await eventually(feed.ready, "the feed to be ready")

    async def refused() -> bool:
        samples = await feed.metrics()
        return sum(v for (name, labels), v in samples.items()
                   if name == "kumex_feed_snapshots_refused_total"
                   and ("reason", "rate_limited") in labels) >= 1

    await eventually(refused, "a rate-limited snapshot")
    stored = [s for s in ("XBTUSDM", "XBTUSDTM")
              if await redis_client.get(keys.snapshot(s)) is not None]
    assert len(stored) <= 1  # one a minute, as the venue said
    assert await feed.ready()
    assert feed.stop() == 0


def test_feed_refuses_a_bad_setting_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEED_", "KUMEX_"))}
    env.update({"FEED_BATCH_SIZE": "lots", "REDIS_URL": "redis://127.0.0.1:1/0"})
    done = subprocess.run([sys.executable, "-m", "services.feed"], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=SAFETY_S, check=False)
    assert done.returncode == 2
    assert "FEED_BATCH_SIZE" in done.stderr
    # A variable every service shares is named as it is, not with the feed's prefix.
    for name, value in (("REDIS_URL", "http://nope"), ("KUMEX_EVENT_LOOP", "twisted"),
                        ("KUMEX_SYMBOLS", "bad-1"), ("KUMEX_CA_FILE", "/no/such/ca.pem")):
        bad = {**env, name: value}
        done = subprocess.run([sys.executable, "-m", "services.feed"], cwd=_ROOT, env=bad,
                              capture_output=True, text=True, timeout=SAFETY_S, check=False)
        assert done.returncode == 2
        assert f"  {name}: " in done.stderr and f"FEED_{name}" not in done.stderr


def test_capture_is_replayable_text(tmp_path: Path) -> None:
    from services.feed.capture import Capture

    path = tmp_path / "cap.jsonl"
    cap = Capture(path)
    cap.write('{"a":1}')
    cap.write('{"b":\n2}')
    cap.close()
    cap2 = Capture(path)  # appends
    cap2.write('{"c":3}')
    cap2.close()
    assert list(read_capture(path)) == ['{"a":1}', '{"b": 2}', '{"c":3}']
    assert math.isfinite(len(path.read_bytes()))


# ========================================================= redundancy, fail-over, budget


def _feed_env(redis_url: str, sandbox: SandboxProcess, symbols: str = "XBTUSDM",
              **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "KUMEX_BASE_URL": sandbox.base_url,
            "KUMEX_SYMBOLS": symbols, "FEED_SNAPSHOT_PER_MIN": "0",
            "FEED_BACKOFF_INITIAL": "0.1", "FEED_BACKOFF_MAX": "0.5", **extra}


async def _subscribers(http: httpx.AsyncClient, symbol: str = "XBTUSDM") -> int:
    subs = (await http.get("/sandbox/state")).json()["hub"]["subscriptions"]
    return int(subs.get(level3_topic(symbol), 0))


async def _stream_sequences(client: redis.asyncio.Redis, symbol: str = "XBTUSDM") -> list[int]:
    return _sequences(await _entries(client, symbol))


async def _settled(http: httpx.AsyncClient, client: redis.asyncio.Redis) -> None:
    """Faults off, a few more messages, and the stream at the engine's sequence."""
    await http.post("/sandbox/faults", json={"drop_rate": 0})
    await _step(http, 20)
    target = int((await http.get("/sandbox/state")).json()["sequences"]["XBTUSDM"])

    async def caught_up() -> bool:
        seqs = await _stream_sequences(client)
        return bool(seqs) and seqs[-1] == target

    await eventually(caught_up, f"the stream at sequence {target}")


async def test_two_lines_cover_each_others_drops(
    sandbox: SandboxProcess, redis_url: str, redis_client: redis.asyncio.Redis,
    feed_process: Callable[[dict[str, str]], FeedProcess],
) -> None:
    """Fault: 5 % of the messages dropped on each connection, independently. The stream
    misses only what both lines lost (about 0.25 %), and says so in the metrics."""
    feed = feed_process(_feed_env(redis_url, sandbox, FEED_LINES="2"))
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
        await eventually(lambda: _equals(_subscribers(http), 2), "both lines subscribed")
        await eventually(feed.ready, "the feed to be ready")
        # A few messages first: a loss before the first one written is no gap to anyone.
        await _settled(http, redis_client)
        before = (await http.get("/sandbox/state")).json()
        start = int(before["sequences"]["XBTUSDM"])
        # The session's sandbox counts every drop since it started (earlier tests too).
        dropped_before = before["faults"]["counts"].get("dropped", 0)
        await http.post("/sandbox/faults", json={"drop_rate": 0.05})
        for _ in range(8):
            await _step(http, 500)
        await _settled(http, redis_client)
        dropped = (await http.get("/sandbox/state")).json()["faults"]["counts"][
            "dropped"] - dropped_before
    seqs = [s for s in await _stream_sequences(redis_client) if s > start]
    assert seqs == sorted(set(seqs)), "each sequence written once, in order"
    missing = (seqs[-1] - start) - len(seqs)
    samples = await feed.metrics()
    lost = _metric(samples, "kumex_feed_arbitration_lost_total", symbol="XBTUSDM")
    covered = _total(samples, "kumex_feed_line_covered_total")
    assert dropped > 100
    assert missing == lost, "every message missing from the stream is a declared loss"
    assert missing < dropped / 10, (missing, dropped)
    assert covered >= (dropped - 2 * missing) * 0.9, (covered, dropped)
    print(f"\n{dropped} drops on the two connections, {missing} messages missing from the "
          f"stream, {covered:g} covered by the other line")


async def _snapshots_served(http: httpx.AsyncClient) -> int:
    counts = (await http.get("/sandbox/state")).json()["faults"]["counts"]
    return int(counts.get("snapshots_served", 0))


async def _writer_id(client: redis.asyncio.Redis, symbol: str = "XBTUSDM") -> str | None:
    raw = await client.get(keys.owner(symbol, ROLE))
    return None if raw is None else LeaseOwner.from_json(raw).id


async def test_kill_9_of_the_writing_feed_costs_no_gap(
    sandbox: SandboxProcess, redis_url: str, redis_client: redis.asyncio.Redis,
    feed_process: Callable[[dict[str, str]], FeedProcess],
) -> None:
    """Two feeds: one writes, the other stands by with the same messages in memory. The
    writer is killed mid-flow: the standby takes over from the stream's last sequence
    and the stream has no hole and no sequence twice."""
    writer = feed_process(_feed_env(redis_url, sandbox, FEED_ID="feed-a",
                                    FEED_LEASE_TTL_SECONDS="1"))
    await eventually(lambda: _equals(_writer_id(redis_client), "feed-a"), "feed-a writing")
    standby = feed_process(_feed_env(redis_url, sandbox, FEED_ID="feed-b",
                                     FEED_LEASE_TTL_SECONDS="1"))
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
        await eventually(lambda: _equals(_subscribers(http), 4), "both feeds' lines")
        await eventually(standby.ready, "the standby to be ready")
        start = int((await http.get("/sandbox/state")).json()["sequences"]["XBTUSDM"])
        await http.post("/sandbox/flow/resume", json={"rate": 300})
        await eventually(lambda: _longer(_stream_sequences(redis_client), 200),
                         "the flow in the stream")
        served = await _snapshots_served(http)
        writer.kill()
        await eventually(lambda: _equals(_writer_id(redis_client), "feed-b"),
                         "feed-b taking over")
        head = (await _stream_sequences(redis_client))[-1]
        await eventually(lambda: _past(_stream_sequences(redis_client), head + 300),
                         "the flow after the takeover")
        await http.post("/sandbox/flow/pause")
        await _settled(http, redis_client)
        # Taken over mid-session: the stream just goes on, no snapshot is spent.
        assert await _snapshots_served(http) == served
    seqs = [s for s in await _stream_sequences(redis_client) if s > start]
    assert seqs == list(range(start + 1, start + 1 + len(seqs))), "no hole, nothing twice"
    samples = await standby.metrics()
    assert _metric(samples, "kumex_feed_takeovers_total", symbol="XBTUSDM") == 1
    assert _metric(samples, "kumex_feed_writer", symbol="XBTUSDM") == 1
    log = standby.log_text()
    assert "writing the stream" in log and "took over with a gap" not in log


async def _longer(value: Awaitable[list[int]], count: int) -> bool:
    return len(await value) >= count


async def _past(value: Awaitable[list[int]], sequence: int) -> bool:
    seqs = await value
    return bool(seqs) and seqs[-1] >= sequence


async def test_a_429_waits_for_the_venues_retry_after_not_a_whole_budget(
    sandbox: SandboxProcess, redis_client: redis.asyncio.Redis,
) -> None:
    """At 1 snapshot a minute, a 429 "retry after 1 s" is retried 1 s later: the token
    was never spent at the venue. (The budget then holds: the next symbol waits.)"""
    clock = [1000.0]
    metrics = FeedMetrics()
    writer = _writer(redis_client, metrics)
    async with httpx.AsyncClient(timeout=10.0) as http:
        snaps = Snapshotter(http, sandbox.base_url, ["XBTUSDM", "XBTUSDTM"], writer, metrics,
                            per_min=1.0, backoff=lambda: Backoff(0.1, 2.0, 1.0, seed=1),
                            clock=lambda: clock[0], active=True)
        snaps.request("XBTUSDM", 0, "test")
        (await http.post(f"{sandbox.base_url}/sandbox/rest-error",
                         json={"status": 429, "seconds": 1})).raise_for_status()
        request, wait = snaps.queue.next(clock[0])
        assert request is not None and wait == 0.0
        await snaps._fetch(request)
        assert _labelled(metrics, "kumex_feed_snapshots_refused_total",
                         symbol="XBTUSDM", reason="rate_limited") == 1
        clock[0] += 0.5
        assert snaps.queue.next(clock[0])[1] == pytest.approx(0.5)  # Retry-After: 1
        await asyncio.sleep(1.1)  # the venue's window ends
        clock[0] += 0.6
        request, wait = snaps.queue.next(clock[0])
        assert request is not None and request.symbol == "XBTUSDM"
        assert wait == 0.0, "a 429 must not cost a whole budget period"
        await snaps._fetch(request)
        assert snaps.stored.get("XBTUSDM") is not None and "XBTUSDM" not in snaps.queue
        snaps.request("XBTUSDTM", 0, "test")
        assert snaps.queue.next(clock[0])[1] == pytest.approx(60.0, abs=1.0)


async def test_a_snapshot_remembered_but_gone_from_redis_is_fetched_again(
    sandbox: SandboxProcess, redis_client: redis.asyncio.Redis,
) -> None:
    """Redis restarted without persistence: the scheduler still remembers the snapshot it
    stored, but the key is gone. A request that snapshot would have answered is fetched
    again (before: announced from memory forever, and the book waited for good)."""
    metrics = FeedMetrics()
    writer = _writer(redis_client, metrics)
    writing = asyncio.create_task(writer.run())
    async with httpx.AsyncClient(timeout=10.0) as http:
        snaps = Snapshotter(http, sandbox.base_url, ["XBTUSDM"], writer, metrics,
                            per_min=600.0, backoff=lambda: Backoff(0.1, 2.0, 1.0, seed=1),
                            active=True)
        worker = asyncio.create_task(snaps.run())
        try:
            snaps.request("XBTUSDM", 0, "test")
            await eventually(lambda: snaps.stored.get("XBTUSDM") is not None,
                             "the first snapshot")
            remembered = snaps.stored["XBTUSDM"]
            await eventually(lambda: _exists(redis_client, keys.snapshot("XBTUSDM")),
                             "the snapshot key")
            # Answered from what is stored: no fetch.
            snaps.request("XBTUSDM", remembered, "test")
            await eventually(lambda: "XBTUSDM" not in snaps.queue, "the answer")
            assert _labelled(metrics, "kumex_feed_snapshots_fetched_total",
                             symbol="XBTUSDM") == 1
            await redis_client.flushall()
            snaps.request("XBTUSDM", remembered, "test")
            await eventually(lambda: _exists(redis_client, keys.snapshot("XBTUSDM")),
                             "the snapshot stored again")
            assert _labelled(metrics, "kumex_feed_snapshots_fetched_total",
                             symbol="XBTUSDM") == 2
            assert snaps.stored["XBTUSDM"] >= remembered
        finally:
            await cancel_and_wait(worker, writing)


async def _exists(client: redis.asyncio.Redis, key: str) -> bool:
    return bool(await client.exists(key))


def _labelled(metrics: FeedMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_venue_that_drops_every_socket_is_reconnected_at_once(
    sandbox: SandboxProcess, redis_url: str,
    feed_process: Callable[[dict[str, str]], FeedProcess],
) -> None:
    """Fault: every connection is cut after 0.4-0.8 s. Each session delivered data, so the
    backoff never grows: every reconnection is at once (a jitter under 0.25 s), although
    FEED_BACKOFF_INITIAL is 1 s."""
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
        await http.post("/sandbox/flow/resume", json={"rate": 50})
        feed = feed_process(_feed_env(redis_url, sandbox, FEED_LINES="1",
                                      FEED_BACKOFF_INITIAL="1", FEED_BACKOFF_MAX="30"))
        await eventually(feed.ready, "the feed to be ready")
        await http.post("/sandbox/faults", json={"disconnect_every_s": 0.4,
                                                 "disconnect_every_max_s": 0.8})

        async def reconnected(times: int) -> bool:
            samples = await feed.metrics()
            return _metric(samples, "kumex_feed_reconnects_total") >= times

        await eventually(lambda: reconnected(6), "six reconnections")
        await http.post("/sandbox/faults", json={"disconnect_every_s": 0})
        await http.post("/sandbox/flow/pause")
    delays = [float(line.split("retry_in=")[1].split("s")[0])
              for line in feed.log_text().splitlines()
              if "exchange connection ended; reconnecting" in line]
    assert len(delays) >= 6
    assert max(delays) <= 0.25, delays


def test_reconnect_delay_resets_after_a_healthy_session() -> None:
    rng = random.Random(3)
    backoff = Backoff(1.0, 2.0, 30.0, seed=3)
    failing = [reconnect_delay(backoff, healthy=False, rng=rng) for _ in range(5)]
    assert failing == sorted(failing) and failing[-1] > 4.0  # grows while attempts fail
    healthy = [reconnect_delay(backoff, healthy=True, rng=rng) for _ in range(20)]
    assert max(healthy) <= 0.25 and backoff.attempts == 0
    assert reconnect_delay(backoff, healthy=False, rng=rng) <= 1.0  # starts small again


async def test_feed_takes_every_listed_contract_over_connections_of_100_topics(
    redis_url: str, redis_client: redis.asyncio.Redis,
    feed_process: Callable[[dict[str, str]], FeedProcess],
) -> None:
    """``KUMEX_SYMBOLS=all`` against a sandbox listing its whole catalog (102 contracts):
    the feed reads the contract list, and each of its two lines holds two connections
    (100 topics at most each, one subscribe message for each), and every symbol's
    stream gets the sandbox's messages."""
    env = {"SANDBOX_SYMBOLS": "all", "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "5",
           "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0"}
    with SandboxProcess(env) as sandbox:
        async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=10.0) as http:
            listed = [c["symbol"] for c in
                      (await http.get("/api/v1/contracts/active")).json()["data"]]
            assert len(listed) >= 100
            feed = feed_process(_feed_env(redis_url, sandbox, "all", FEED_LINES="2"))
            await eventually(feed.ready, "the feed to be ready")
            status = (await feed.get("/readyz")).json()  # type: ignore[union-attr]
            assert status["symbols"] == listed
            hub = (await http.get("/sandbox/state")).json()["hub"]
            topics = sorted(c["topics"] for c in hub["connections"])
            assert topics == [len(listed) - 100, len(listed) - 100, 100, 100], topics
            assert hub["subscriptions"] == {level3_topic(s): 2 for s in sorted(listed)}
            (await http.post("/sandbox/step", json={"n": 3000})).raise_for_status()
            state = (await http.get("/sandbox/state")).json()["sequences"]

            async def every_stream_current() -> bool:
                for symbol in listed:
                    seqs = await _stream_sequences(redis_client, symbol)
                    if not seqs or seqs[-1] != int(state[symbol]):
                        return False
                return True

            await eventually(every_stream_current, "every stream at the engine's sequence")
            active = [s for s in listed if len(await _stream_sequences(redis_client, s)) > 1]
            print(f"{len(listed)} contracts over {len(topics)} connections; "
                  f"{len(active)} streams with messages after 3,000 steps")
