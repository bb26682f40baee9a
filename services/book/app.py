"""The book service's HTTP and WebSocket API (DESIGN.md, "HTTP (book service)").

Every replica answers for every configured symbol: it serves the books it owns
and forwards the rest to the owner's URL (read from the lease), marking the
forwarded request so that two replicas never bounce it between them. A book
that is not synced answers 503 with a ``detail``; never a stale book. Bodies
are built once per book version, depth and kind (see
:class:`~services.book.consumer.SymbolConsumer`).

WebSocket clients get the ``GET /book`` body whenever it changes, at most once
per ``BOOK_WS_THROTTLE_SECONDS`` (always the latest: nothing queues up), and
``{"symbol", "synced": false, "detail"}`` while the book is not served. A
client that cannot take a message within ``BOOK_WS_SEND_TIMEOUT_SECONDS`` is
dropped. On a replica that does not own the symbol, the socket relays the
owner's WebSocket.

Every wait is bounded, per peer:

* a proxied request has one deadline for all of it (``BOOK_PROXY_TIMEOUT_SECONDS``:
  the pool, the connection, the answer and its body), a connection pool of its
  own per owner (``BOOK_PROXY_CONNECTIONS``: one slow owner cannot starve the
  requests for another's symbols), and a bound on the body relayed
  (``BOOK_PROXY_MAX_BYTES``); an owner URL read from Redis is used only if it
  matches ``BOOK_PEER_URL_PATTERN``;
* a relayed WebSocket pings the owner (``BOOK_WS_RELAY_PING_SECONDS``) and
  follows ownership: when the symbol moves (here, or to another replica) the
  relay is dropped and started again where it is now;
* at most ``BOOK_WS_MAX_CLIENTS`` WebSocket clients a replica; past it a new
  one is closed with 1013 ("try again later").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final

import httpx
import redis.asyncio
import redis.exceptions
from fastapi import FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.websockets import WebSocketState
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from kumex_l3 import redis_adapter
from kumex_l3.access import Guard, presented_token
from kumex_l3.httpserver import FastAnswer, FastRoute
from kumex_l3.logs import kv
from kumex_l3.metrics import metrics_router
from services.book.consumer import SymbolConsumer
from services.book.metrics import BookMetrics
from services.book.replicas import BookService
from services.book.settings import BookSettings

__all__ = ["PROXY_HEADER", "REPLICA_HEADER", "create_app"]

log = logging.getLogger(__name__)

#: Set on a request forwarded by another replica (its id): never forwarded again.
PROXY_HEADER: Final = "x-kumex-proxied-by"
#: The replica that built the response.
REPLICA_HEADER: Final = "x-kumex-replica"

_JSON: Final = "application/json"
_RELAY_RETRY_S: Final = 1.0
#: How often a relay looks at who owns its symbol now.
_RELAY_WATCH_S: Final = 1.0
#: Owners' connection pools kept at most (the least recently used is closed).
_PEERS_MAX: Final = 64
#: Fast answers kept for reuse at most (symbols x routes x depths asked for).
_FAST_ANSWERS_MAX: Final = 4096
#: Close code of a WebSocket refused because the replica has enough clients.
CLOSE_TRY_AGAIN: Final = 1013

Depth = Annotated[int, Query(ge=1, le=1000, description="levels per side")]
Symbol = Annotated[str, Path(min_length=1, max_length=40)]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


class _Timing:
    """ASGI middleware: HTTP latency per method, route template and status."""

    def __init__(self, app: _ASGIApp, metrics: BookMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: _Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_latency.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - started)


class _SlowClient(Exception):
    """A WebSocket client did not take a message in time."""


_STATIC = pathlib.Path(__file__).with_name("static")


def _unavailable(detail: str, status: int = 503) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class _Peers:
    """The other replicas, as far as proxying goes: which owner URLs are acceptable, and
    one connection pool per owner (:attr:`BookSettings.proxy_connections`)."""

    def __init__(self, settings: BookSettings) -> None:
        self._settings = settings
        self._pattern = re.compile(settings.peer_url_pattern)
        self._clients: OrderedDict[str, httpx.AsyncClient] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def allowed(self, url: str) -> bool:
        """Whether ``url`` has the shape every replica's URL must have."""
        return self._pattern.fullmatch(url) is not None

    def client(self, url: str) -> httpx.AsyncClient:
        """The pool for the owner at ``url`` (made on first use)."""
        client = self._clients.get(url)
        if client is not None:
            self._clients.move_to_end(url)
            return client
        n = self._settings.proxy_connections
        client = httpx.AsyncClient(
            timeout=self._settings.proxy_timeout_seconds,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        self._clients[url] = client
        while len(self._clients) > _PEERS_MAX:
            _, old = self._clients.popitem(last=False)
            task = asyncio.get_running_loop().create_task(old.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)


def create_app(settings: BookSettings, *, metrics: BookMetrics | None = None) -> FastAPI:
    """The FastAPI app; its lifespan connects to Redis and runs the :class:`BookService`."""
    metrics = metrics if metrics is not None else BookMetrics()
    symbols = frozenset(settings.symbols)
    replica = settings.replica
    holder: dict[str, Any] = {}
    guard = Guard(settings.api_token, settings.host)
    if guard.policy == "off":
        log.warning("BOOK_API_TOKEN is not set and the book listens beyond the loopback "
                    "interface: own orders are not pushed on the WebSocket",
                    extra=kv(host=settings.host))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_adapter.connect(settings.redis_url, "book",
                                       block=settings.read_block_seconds,
                                       cluster=settings.redis_cluster)
        peers = _Peers(settings)
        service = BookService(settings, client, metrics)
        holder["service"], holder["peers"] = service, peers
        holder["ws_clients"] = 0
        await service.start()
        log.info("book service started",
                 extra=kv(replica=replica, url=settings.url, symbols=",".join(settings.symbols)))
        try:
            yield
        finally:
            await service.stop()
            await peers.aclose()
            await client.aclose()
            log.info("book service stopped", extra=kv(replica=replica))

    app = FastAPI(title="kumex-l3 book", version="0.1.0", lifespan=lifespan)
    app.add_middleware(_Timing, metrics=metrics)
    app.state.fast_route = _fast_route(symbols, holder, replica, metrics)
    app.include_router(metrics_router(metrics.registry))

    def service() -> BookService:
        svc: BookService = holder["service"]
        return svc

    async def drain() -> int:
        """Hand every owned book off to the other replicas (SIGTERM, ``POST /admin/drain``)."""
        svc: BookService | None = holder.get("service")
        return 0 if svc is None else await svc.drain()

    app.state.drain = drain

    @app.post("/admin/drain")
    async def admin_drain(request: Request) -> Response:
        """Hand every book of this replica off and take none any more (it keeps answering
        by proxy): before maintenance, or to move load off a busy host. The one call of
        the book that changes something: it needs the token of ``BOOK_API_TOKEN``, and
        is off while none is set, even on the loopback interface (SIGTERM drains too)."""
        if guard.policy != "token":
            return _unavailable("draining by HTTP is off: set BOOK_API_TOKEN to use it "
                                "(SIGTERM drains the replica too)", 403)
        if not guard.allows(presented_token(request.headers, request.query_params)):
            return _unavailable(guard.refusal("draining", "BOOK_API_TOKEN"), 403)
        moved = await drain()
        log.info("drained on request", extra=kv(replica=replica, handed_off=moved))
        return JSONResponse({"replica": replica, "draining": True, "handedOff": moved},
                            headers={REPLICA_HEADER: replica})

    def known(symbol: str) -> None:
        if symbol not in symbols:
            raise HTTPException(404, f"unknown symbol {symbol}")

    async def proxy(request: Request, symbol: str) -> Response:
        if request.headers.get(PROXY_HEADER):
            return _unavailable(f"{symbol} is not served by replica {replica} any more")
        try:
            owner = await service().owner_of(symbol)
        except (redis.exceptions.RedisError, OSError):
            return _unavailable(f"{symbol}: cannot read its owner from Redis")
        if owner is None or owner.url is None:
            metrics.proxied.labels(symbol, "no_owner").inc()
            return _unavailable(f"no replica serves {symbol} at the moment")
        if owner.id == replica:
            return _unavailable(f"{symbol} book is starting on this replica")
        peers: _Peers = holder["peers"]
        if not peers.allowed(owner.url):
            metrics.proxied.labels(symbol, "refused_url").inc()
            log.warning("owner URL refused: it does not match BOOK_PEER_URL_PATTERN",
                        extra=kv(symbol=symbol, owner=owner.id, url=owner.url[:200]))
            return _unavailable(f"{symbol}: its owner {owner.id} advertises a URL this "
                                "replica does not proxy to")
        limit = settings.proxy_max_bytes
        deadline = settings.proxy_timeout_seconds
        try:
            async with asyncio.timeout(deadline), peers.client(owner.url).stream(
                    "GET", owner.url + request.url.path, params=request.query_params,
                    headers={PROXY_HEADER: replica}) as upstream:
                chunks: list[bytes] = []
                size = 0
                async for chunk in upstream.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        metrics.proxied.labels(symbol, "too_large").inc()
                        log.warning("owner's answer over the bound: not relayed",
                                    extra=kv(symbol=symbol, owner=owner.id, limit=limit))
                        return _unavailable(f"{symbol}: its owner {owner.id} answered more "
                                            f"than {limit} bytes", 502)
                    chunks.append(chunk)
        except TimeoutError:
            metrics.proxied.labels(symbol, "timeout").inc()
            log.warning("proxy to the owner ran out of time",
                        extra=kv(symbol=symbol, owner=owner.id, deadline=deadline))
            return _unavailable(f"{symbol}: its owner {owner.id} did not answer within "
                                f"{deadline:g} s")
        except httpx.HTTPError as exc:
            metrics.proxied.labels(symbol, "error").inc()
            log.warning("proxy to the owner failed: %s", exc or type(exc).__name__,
                        extra=kv(symbol=symbol, owner=owner.id))
            return _unavailable(f"{symbol}: its owner {owner.id} did not answer")
        metrics.proxied.labels(symbol, "ok").inc()
        headers = {PROXY_HEADER: replica}
        if REPLICA_HEADER in upstream.headers:
            headers[REPLICA_HEADER] = upstream.headers[REPLICA_HEADER]
        return Response(b"".join(chunks), status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type", _JSON))

    async def serve(request: Request, symbol: str,
                    build: Callable[[SymbolConsumer], bytes | None],
                    missing: str = "") -> Response:
        known(symbol)
        consumer = service().local(symbol)
        if consumer is None:
            return await proxy(request, symbol)
        if not consumer.serving:
            return _unavailable(consumer.detail())
        body = build(consumer)
        if body is None:
            raise HTTPException(404, missing)
        return Response(body, media_type=_JSON, headers={REPLICA_HEADER: replica})

    @app.get("/book/{symbol}")
    async def get_book(request: Request, symbol: Symbol, depth: Depth = 12) -> Response:
        """Aggregated levels: ``[price, size, orders]``, best first."""
        return await serve(request, symbol, lambda c: c.book_body(depth))

    @app.get("/book/{symbol}/l3")
    async def get_l3(request: Request, symbol: Symbol, depth: Depth = 5) -> Response:
        """Levels with their orders in queue order."""
        return await serve(request, symbol, lambda c: c.l3_body(depth))

    @app.get("/book/{symbol}/orders/{order_id}")
    async def get_order(request: Request, symbol: Symbol,
                        order_id: Annotated[str, Path(min_length=1, max_length=100)]) -> Response:
        """Where a resting order stands in its price's queue."""
        return await serve(request, symbol, lambda c: c.order_body(order_id),
                           f"order {order_id} does not rest on the {symbol} book")

    @app.get("/books")
    async def get_books() -> Response:
        """Every configured symbol with its sequence, synced flag and owner."""
        try:
            rows = await service().books()
        except (redis.exceptions.RedisError, OSError):
            return _unavailable("cannot read the other replicas' state from Redis")
        return JSONResponse({"replica": replica, "books": rows},
                            headers={REPLICA_HEADER: replica})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        """The live book page (one self-contained file, no build step)."""
        return FileResponse(_STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up and its event loop answers."""
        return {"status": "ok", "replica": replica}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready when the leases were taken and every owned book is synced."""
        svc = service()
        ok, detail = svc.ready()
        body = {"ready": ok, "detail": detail, "replica": replica, "owned": svc.owned}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.websocket("/ws/book/{symbol}")
    async def ws_book(websocket: WebSocket, symbol: Symbol, depth: Depth = 12) -> None:
        """The ``GET /book`` body, pushed on change (throttled)."""
        if symbol not in symbols:
            await websocket.close(code=1008, reason=f"unknown symbol {symbol}")
            return
        if holder["ws_clients"] >= settings.ws_max_clients:
            metrics.ws_refused.inc()
            # Accepted, then closed: a close code the client can read (not an HTTP 403).
            await websocket.accept()
            await websocket.close(code=CLOSE_TRY_AGAIN, reason=(
                f"try again later: {settings.ws_max_clients} WebSocket clients already"))
            return
        holder["ws_clients"] += 1
        try:
            await websocket.accept()
            metrics.ws_clients.labels(symbol).inc()
            token = presented_token(websocket.headers, websocket.query_params)
            session = _WsSession(websocket, symbol, depth, service(), holder["peers"],
                                 settings, metrics,
                                 proxied=bool(websocket.headers.get(PROXY_HEADER)),
                                 own=guard.allows(token), token=token)
            try:
                await session.run()
            finally:
                metrics.ws_clients.labels(symbol).dec()
        finally:
            holder["ws_clients"] -= 1

    return app


def _fast_route(symbols: frozenset[str], holder: dict[str, Any], replica: str,
                metrics: BookMetrics) -> FastRoute:
    """``GET /book/{symbol}`` and ``/book/{symbol}/l3`` of a book served here, for
    :func:`kumex_l3.httpserver.http_protocol`: the cached body, written without the app.

    Anything else (another replica's symbol, a book not served, a query other than
    ``depth=N``) returns ``None``: the app answers it, with its checks and messages.
    """
    headers = ((b"content-type", _JSON.encode()), (REPLICA_HEADER.encode(), replica.encode()))
    count = metrics.fast_requests
    routes = {"": ("/book/{symbol}", 12), "l3": ("/book/{symbol}/l3", 5)}
    #: The answer last made for each (symbol, route, depth), reused while its body is.
    answers: dict[tuple[str, str, int], FastAnswer] = {}

    def fast(path: str, query: bytes) -> FastAnswer | None:
        parts = path.split("/")
        if len(parts) == 3:
            route, default = routes[""]
        elif len(parts) == 4 and parts[3] == "l3":
            route, default = routes["l3"]
        else:
            return None
        service: BookService | None = holder.get("service")
        symbol = parts[2]
        if parts[1] != "book" or symbol not in symbols or service is None:
            return None
        depth = _depth(query, default)
        consumer = service.local(symbol)
        if depth is None or consumer is None or not consumer.serving:
            return None
        body = consumer.book_body(depth) if len(parts) == 3 else consumer.l3_body(depth)
        key = (symbol, route, depth)
        answer = answers.get(key)
        if answer is None or answer.body is not body:
            if answer is None and len(answers) >= _FAST_ANSWERS_MAX:
                answers.clear()
            answer = answers[key] = FastAnswer.of(200, body, headers)
        count[route] += 1
        return answer

    return fast


def _depth(query: bytes, default: int) -> int | None:
    """``depth`` from a query that is empty or exactly ``depth=N`` (1..1000), else ``None``."""
    if not query:
        return default
    if not query.startswith(b"depth=") or len(query) > 10:
        return None
    digits = query[6:]
    if not digits.isdigit():
        return None
    depth = int(digits)
    return depth if 1 <= depth <= 1000 else None


class _WsSession:
    """One WebSocket client: pushes local changes, or relays the owner's socket."""

    def __init__(self, websocket: WebSocket, symbol: str, depth: int, service: BookService,
                 peers: _Peers, settings: BookSettings, metrics: BookMetrics, *,
                 proxied: bool, own: bool = False, token: str | None = None) -> None:
        self.ws = websocket
        #: Whether this client may see the user's own orders (and the token it showed,
        #: passed on to the owner when relaying).
        self.own = own
        self.token = token
        self.symbol = symbol
        self.depth = depth
        self.service = service
        self.peers = peers
        self.settings = settings
        self.metrics = metrics
        self.proxied = proxied
        self._last: bytes | str | None = None

    async def run(self) -> None:
        pushed, _ = await _first_of(self._push(), self._listen())
        if isinstance(pushed, _SlowClient):
            self.metrics.ws_dropped.labels(self.symbol).inc()
            log.info("slow WebSocket client dropped", extra=kv(symbol=self.symbol))
            await self._close(1008, "too slow")
        elif pushed is None and self.ws.client_state is WebSocketState.CONNECTED:
            await self._close(1000, "")
        elif isinstance(pushed, Exception):
            # Mostly a client gone in the middle of a send.
            log.debug("WebSocket session ended: %r", pushed, extra=kv(symbol=self.symbol))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.ws.close(code=code, reason=reason)

    async def _listen(self) -> None:
        # Clients have nothing to say; reading notices their leaving at once.
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return

    async def _send(self, text: bytes | str) -> None:
        if text == self._last:
            return
        data = text.decode() if isinstance(text, bytes) else text
        try:
            async with asyncio.timeout(self.settings.ws_send_timeout_seconds):
                await self.ws.send_text(data)
        except TimeoutError:
            raise _SlowClient from None
        self._last = text

    async def _push(self) -> None:
        while True:
            consumer = self.service.local(self.symbol)
            if consumer is not None:
                await self._push_local(consumer)
            elif self.proxied:
                # Forwarded here by a replica that thinks we own it: let it look again.
                await self._send(_status(self.symbol, "not served by this replica"))
                return
            else:
                await self._relay()

    async def _push_local(self, consumer: SymbolConsumer) -> None:
        throttle = self.settings.ws_throttle_seconds
        sent_at = float("-inf")
        while consumer.active and self.service.local(self.symbol) is consumer:
            changed = consumer.changed
            body = (consumer.ws_body(self.depth, own=self.own) if consumer.serving
                    else consumer.status_body())
            if body != self._last:
                wait = sent_at + throttle - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # send what is current after the pause
                await self._send(body)
                sent_at = time.monotonic()
            await changed.wait()

    async def _relay(self) -> None:
        try:
            owner = await self.service.owner_of(self.symbol)
        except (redis.exceptions.RedisError, OSError):
            owner = None
        if (owner is None or owner.url is None or owner.id == self.service.owner.id
                or not self.peers.allowed(owner.url)):
            await self._send(_status(self.symbol, f"no replica serves {self.symbol} right now"))
            await asyncio.sleep(_RELAY_RETRY_S)
            return
        url = ("ws" + owner.url[4:] if owner.url.startswith("http") else owner.url)
        url = f"{url}/ws/book/{self.symbol}?depth={self.depth}"
        headers = {PROXY_HEADER: self.service.owner.id}
        if self.own and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        ping = self.settings.ws_relay_ping_seconds
        try:
            async with ws_connect(url, additional_headers=headers,
                                  open_timeout=self.settings.proxy_timeout_seconds,
                                  ping_interval=ping, ping_timeout=ping,
                                  max_size=self.settings.proxy_max_bytes) as upstream:

                async def pump() -> None:
                    async for message in upstream:
                        await self._send(message)

                pumped, _ = await _first_of(pump(), self._watch(owner.id))
                if isinstance(pumped, _SlowClient):
                    raise pumped
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.info("WebSocket relay to the owner ended: %s", exc or type(exc).__name__,
                     extra=kv(symbol=self.symbol, owner=owner.id))
        await asyncio.sleep(_RELAY_RETRY_S / 4)

    async def _watch(self, owner_id: str) -> None:
        """Return when the symbol is not ``owner_id``'s any more (here, elsewhere, nobody's)."""
        while True:
            await asyncio.sleep(_RELAY_WATCH_S)
            if self.service.local(self.symbol) is not None:
                return
            try:
                now = await self.service.owner_of(self.symbol)
            except (redis.exceptions.RedisError, OSError):
                continue
            if now is None or now.id != owner_id:
                return


async def _first_of(a: Coroutine[Any, Any, None],
                    b: Coroutine[Any, Any, None]) -> tuple[object, object]:
    """Run ``a`` and ``b`` until either ends, cancel the other: what each ended with
    (``None``, an exception, or the cancellation)."""
    tasks = (asyncio.create_task(a), asyncio.create_task(b))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return results[0], results[1]


def _status(symbol: str, detail: str) -> str:
    return json.dumps({"symbol": symbol, "synced": False, "detail": detail},
                      separators=(",", ":"))
