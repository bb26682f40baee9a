"""A hostile world around the book service: bad peers, greedy clients, curious strangers.

One real book process (its stream written by the test, as in
:mod:`tests.chaos.test_http_abuse`) owns ``XBTUSDM``. The other two symbols
are "owned", as far as the leases in Redis say, by fake peers run by the test
on raw sockets: one that trickles its answer a byte a second, one that never
answers, one that answers a body far too large, one that answers at once. The
book must forward to them within bounds, per request and per peer:

* one deadline for a whole proxied request, not per read (a trickling owner);
* a connection pool per owner: 110 requests stuck on one slow owner do not
  keep a request for another owner's symbol from its answer;
* a bound on the body relayed (nothing of an oversized answer is relayed);
* only owner URLs of the configured shape (an URL planted in Redis is refused);
* a cap on WebSocket clients (a clear 1013 past it);
* a deadline on request headers (slowloris connections are closed);
* the user's own orders pushed on the WebSocket only to a client with the token.

Every case names the bound it checks; none asserts on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

import httpx
import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from kumex_l3 import keys
from kumex_l3.lease import LeaseOwner
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, flush_redis, metric, wait_for
from kumex_l3.testing.synthetic import StreamGenerator
from tests.chaos.conftest import book_process

SYM: Final = "XBTUSDM"
SLOW_SYM: Final = "XBTUSDTM"
FAST_SYM: Final = "ETHUSDTM"
TOKEN: Final = "hostile-world-token"
#: The book's deadline for a proxied request, its pool per owner, its body bound.
DEADLINE_S: Final = 2.0
POOL: Final = 8
MAX_BYTES: Final = 65_536
WS_MAX: Final = 6
#: A ceiling against hangs (never a measurement).
CEILING_S: Final = 60.0


class FakePeer(threading.Thread):
    """A replica that misbehaves as told, on a raw socket: ``behaviour(reader, writer)``
    answers each request."""

    def __init__(self, behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
                 ) -> None:
        super().__init__(daemon=True)
        self.behaviour = behaviour
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.requests = 0
        #: Connections open at once, and the most there ever were.
        self.open = 0
        self.most_open = 0
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        self.loop.run_forever()

    def start_and_wait(self) -> FakePeer:
        self.start()
        assert self._ready.wait(10)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._writers.add(writer)
        try:
            with contextlib.suppress(Exception):
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                await self.behaviour(reader, writer)
            with contextlib.suppress(Exception):
                writer.close()
        finally:
            self.open -= 1
            self._writers.discard(writer)

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(10)
        self.loop.close()


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = json.dumps({"symbol": SLOW_SYM, "trickled": "x" * 40}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    for i in range(len(body)):
        writer.write(body[i:i + 1])
        await writer.drain()
        await asyncio.sleep(1.0)


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # never answers; returns when the client gives up


async def _huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    size = 4 * 1024 * 1024
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    chunk = b"x" * 65_536
    for _ in range(size // len(chunk)):
        writer.write(chunk)
        await writer.drain()


async def _fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = json.dumps({"symbol": FAST_SYM, "sequence": 1, "bids": [], "asks": []}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()


class World:
    """The book under test and the keys the fake peers are named in."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        gen = StreamGenerator(SYM, seed=5, start_sequence=8_000_000, target_orders=100,
                              levels=30)
        gen.take(1500)
        gen.flush()
        self.redis.set(keys.snapshot(SYM), json.dumps(gen.snapshot()))
        with self.redis.pipeline(transaction=False) as pipe:
            for text in gen.take(300) + gen.flush():
                pipe.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: text})
            pipe.execute()
        self.sequence = gen.sequence
        self.book = book_process(
            redis_url, "hostile-book", KUMEX_SYMBOLS=f"{SYM},{SLOW_SYM},{FAST_SYM}",
            BOOK_FEED_CHECK_SECONDS="0", BOOK_PROXY_TIMEOUT_SECONDS=str(DEADLINE_S),
            BOOK_PROXY_CONNECTIONS=str(POOL), BOOK_PROXY_MAX_BYTES=str(MAX_BYTES),
            BOOK_WS_MAX_CLIENTS=str(WS_MAX), BOOK_API_TOKEN=TOKEN,
            BOOK_WS_THROTTLE_SECONDS="0.05")

    def own(self, symbol: str, peer_id: str, url: str) -> None:
        """Say in Redis that ``peer_id`` at ``url`` owns ``symbol`` (for a long while)."""
        self.redis.set(keys.owner(symbol, "book"), LeaseOwner(peer_id, url).to_json(),
                       px=3_600_000)

    def get(self, symbol: str, timeout: float = CEILING_S) -> httpx.Response:
        return httpx.get(f"{self.book.url}/book/{symbol}", params={"depth": 5},
                         timeout=timeout)


@pytest.fixture(scope="module")
def world(redis_server: RedisServer) -> Iterator[World]:
    flush_redis(redis_server.url)
    w = World(redis_server.url)
    # The fake peers own their symbols before the book can take them.
    w.own(SLOW_SYM, "slow-peer", "http://127.0.0.1:1")
    w.own(FAST_SYM, "fast-peer", "http://127.0.0.1:1")
    try:
        with w.book:
            wait_for(lambda: w.get(SYM, 10).status_code == 200, "the book served",
                     proc=w.book)
            yield w
    finally:
        w.redis.close()


@pytest.fixture
def peer() -> Iterator[Callable[..., FakePeer]]:
    started: list[FakePeer] = []

    def make(behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
             ) -> FakePeer:
        fake = FakePeer(behaviour).start_and_wait()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


# --------------------------------------------------------------------------- the proxy


def test_a_trickling_owner_is_given_one_deadline_for_the_whole_request(
        world: World, peer: Callable[..., FakePeer]) -> None:
    """A byte a second, forever within any per-read timeout: cut at the deadline, 503."""
    slow = peer(_trickle)
    world.own(SLOW_SYM, "slow-peer", slow.url)
    r = world.get(SLOW_SYM)
    assert r.status_code == 503, r.text
    assert f"within {DEADLINE_S:g} s" in r.json()["detail"]
    assert slow.requests == 1
    assert metric(world.book.url, "kumex_book_proxied_requests_total", symbol=SLOW_SYM,
                  outcome="timeout") >= 1


def test_one_slow_owner_cannot_take_the_connections_of_another(
        world: World, peer: Callable[..., FakePeer]) -> None:
    """110 requests stuck on an owner that never answers; meanwhile a request for a symbol
    of another owner gets its answer: each owner has its own pool."""
    silent, fast = peer(_silent), peer(_fast)
    world.own(SLOW_SYM, "slow-peer", silent.url)
    world.own(FAST_SYM, "fast-peer", fast.url)

    async def flood() -> tuple[list[int], str]:
        async with httpx.AsyncClient(timeout=CEILING_S,
                                     limits=httpx.Limits(max_connections=200)) as http:
            stuck = [asyncio.create_task(http.get(f"{world.book.url}/book/{SLOW_SYM}"))
                     for _ in range(110)]
            await asyncio.sleep(0.5)  # the stuck ones hold whatever they can
            other = await http.get(f"{world.book.url}/book/{FAST_SYM}")
            results = await asyncio.gather(*stuck)
            return [other.status_code, *(r.status_code for r in results)], other.text[:300]

    statuses, said = asyncio.run(flood())
    assert statuses[0] == 200, f"the other owner's symbol was starved: {said}"
    assert set(statuses[1:]) == {503}
    assert silent.most_open <= POOL  # never more connections to one owner than its pool


def test_an_oversized_answer_is_never_relayed(world: World,
                                              peer: Callable[..., FakePeer]) -> None:
    huge = peer(_huge)
    world.own(SLOW_SYM, "huge-peer", huge.url)
    r = world.get(SLOW_SYM)
    assert r.status_code == 502 and f"more than {MAX_BYTES} bytes" in r.json()["detail"]
    assert len(r.content) < 1000


@pytest.mark.parametrize("planted", [
    "http://user:pw@127.0.0.1:{port}", "http://127.0.0.1:{port}/admin",
    "http://127.0.0.1:{port}?x=1", "file:///etc/passwd", "gopher://127.0.0.1:{port}",
])
def test_an_owner_url_planted_in_redis_is_never_proxied_to(
        world: World, peer: Callable[..., FakePeer], planted: str) -> None:
    fast = peer(_fast)
    world.own(FAST_SYM, "evil-peer", planted.format(port=fast.port))
    r = world.get(FAST_SYM)
    assert r.status_code == 503 and "advertises a URL" in r.json()["detail"]
    assert fast.requests == 0


# --------------------------------------------------------------------------- clients


def test_websocket_clients_are_capped_with_a_clear_close(world: World) -> None:
    url = world.book.url.replace("http", "ws", 1) + f"/ws/book/{SYM}?depth=1"
    with contextlib.ExitStack() as stack:
        for _ in range(WS_MAX):
            ws = stack.enter_context(ws_connect(url, open_timeout=CEILING_S))
            ws.recv(timeout=CEILING_S)
        with ws_connect(url, open_timeout=CEILING_S) as extra, \
                pytest.raises(ConnectionClosed) as info:
            extra.recv(timeout=CEILING_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1013
        assert "try again later" in info.value.rcvd.reason
    assert metric(world.book.url, "kumex_book_ws_refused_total") >= 1
    # Below the cap again: served.
    with ws_connect(url, open_timeout=CEILING_S) as ws:
        assert json.loads(ws.recv(timeout=CEILING_S))["symbol"] == SYM


def test_slowloris_connections_are_closed_at_the_header_deadline(world: World) -> None:
    """Headers sent a byte at a time, or never: the server closes the connection. A
    WebSocket opened meanwhile (its headers came at once) is not touched by the deadline."""
    port = int(world.book.url.rsplit(":", 1)[1])
    url = world.book.url.replace("http", "ws", 1) + f"/ws/book/{SYM}?depth=1"
    with ws_connect(url, open_timeout=CEILING_S) as live:
        live.recv(timeout=CEILING_S)
        _slowloris(world, port)
        assert live.ping().wait(CEILING_S), "the WebSocket was closed with the slowloris ones"


def _slowloris(world: World, port: int) -> None:
    sockets = []
    for i in range(30):
        sock = socket.create_connection(("127.0.0.1", port), timeout=CEILING_S)
        if i % 2:
            sock.sendall(b"GET /book/XBTUSDM HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sockets.append(sock)
    try:
        for i, sock in enumerate(sockets):
            if i % 2:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a")  # still trickling
            try:
                got = sock.recv(1024)
            except ConnectionResetError:
                got = b""
            assert got == b"", "the server should have closed it"
    finally:
        for sock in sockets:
            sock.close()
    assert world.get(SYM, 10).status_code == 200  # and everyone else is served


def test_own_orders_are_pushed_only_to_a_client_with_the_token(world: World) -> None:
    url = world.book.url.replace("http", "ws", 1) + f"/ws/book/{SYM}?depth=1"

    def first_body(address: str, **kw: Any) -> dict[str, Any]:
        with ws_connect(address, open_timeout=CEILING_S, **kw) as ws:
            body: dict[str, Any] = json.loads(ws.recv(timeout=CEILING_S))
            return body

    assert "own" not in first_body(url)
    assert "own" not in first_body(url + "&token=wrong")
    assert isinstance(first_body(url + f"&token={TOKEN}")["own"], list)
    assert isinstance(first_body(url, additional_headers={
        "Authorization": f"Bearer {TOKEN}"})["own"], list)


def test_the_strategy_state_wants_its_token(redis_server: RedisServer) -> None:
    """``/state`` of a strategy listening beyond loopback: 403 without a token set, 401
    without the token, 200 with it."""
    env = {"REDIS_URL": redis_server.url, "KUMEX_SYMBOLS": SYM, "STRATEGY_DRY_RUN": "true",
           "STRATEGY_CENTRE_PRICE": "30000", "STRATEGY_HTTP_HOST": "0.0.0.0"}
    with ServiceProcess("services.strategy", env, port_var="STRATEGY_HTTP_PORT",
                        name="strategy") as open_strategy:
        r = httpx.get(f"{open_strategy.url}/state", timeout=10)
        assert r.status_code == 403 and "STRATEGY_API_TOKEN" in r.json()["detail"]
    with ServiceProcess("services.strategy", {**env, "STRATEGY_API_TOKEN": TOKEN},
                        port_var="STRATEGY_HTTP_PORT", name="strategy") as guarded:
        assert httpx.get(f"{guarded.url}/state", timeout=10).status_code == 401
        ok = httpx.get(f"{guarded.url}/state", timeout=10,
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and "ready" in ok.json()
