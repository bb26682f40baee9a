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
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final, cast

import httpx
import redis.asyncio
import redis.exceptions
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response

from kumex_l3 import redis_adapter
from kumex_l3.access import Guard, presented_token
from kumex_l3.httpserver import FastAnswer, FastRoute
from kumex_l3.logs import kv
from kumex_l3.metrics import metrics_router
from services.book.consumer import SymbolConsumer
from services.book.metrics import BookMetrics
from services.book.peers import PROXY_HEADER, REPLICA_HEADER, Peers
from services.book.replicas import BookService
from services.book.settings import BookSettings
from services.book.wsclients import WsSession

__all__ = ["PROXY_HEADER", "REPLICA_HEADER", "create_app"]

log = logging.getLogger(__name__)

_JSON: Final = "application/json"
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


_STATIC = pathlib.Path(__file__).with_name("static")


def _unavailable(detail: str, status: int = 503) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class _Book:
    """What the routes of one book app share (``app.state.book``): its settings and
    metrics, and while the app runs its :class:`BookService` and peer clients."""

    def __init__(self, settings: BookSettings, metrics: BookMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.symbols = frozenset(settings.symbols)
        self.replica = settings.replica
        self.guard = Guard(settings.api_token, settings.host)
        self.service: BookService | None = None
        self.peers: Peers | None = None
        self.ws_clients = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The app's lifespan: connect to Redis and run the :class:`BookService`."""
        settings = self.settings
        client = redis_adapter.connect(settings.redis_url, "book",
                                       block=settings.read_block_seconds,
                                       cluster=settings.redis_cluster)
        self.peers = Peers(settings)
        self.service = BookService(settings, client, self.metrics)
        self.ws_clients = 0
        await self.service.start()
        log.info("book service started", extra=kv(
            replica=self.replica, url=settings.url, symbols=",".join(settings.symbols)))
        try:
            yield
        finally:
            await self.service.stop()
            await self.peers.aclose()
            await client.aclose()
            log.info("book service stopped", extra=kv(replica=self.replica))

    def running_service(self) -> BookService:
        if self.service is None:
            raise HTTPException(503, "the book service is starting")
        return self.service

    def running_peers(self) -> Peers:
        if self.peers is None:
            raise HTTPException(503, "the book service is starting")
        return self.peers

    async def drain(self) -> int:
        """Hand every owned book off to the other replicas (SIGTERM, ``POST /admin/drain``)."""
        return 0 if self.service is None else await self.service.drain()

    async def serve(self, request: Request, symbol: str,
                    build: Callable[[SymbolConsumer], bytes | None],
                    missing: str = "") -> Response:
        """``build``'s body of ``symbol``'s book if served here, else the owner's answer."""
        if symbol not in self.symbols:
            raise HTTPException(404, f"unknown symbol {symbol}")
        consumer = self.running_service().local(symbol)
        if consumer is None:
            return await self.proxy(request, symbol)
        if not consumer.serving:
            return _unavailable(consumer.detail())
        body = build(consumer)
        if body is None:
            raise HTTPException(404, missing)
        return Response(body, media_type=_JSON, headers={REPLICA_HEADER: self.replica})

    async def proxy(self, request: Request, symbol: str) -> Response:
        """The owner's answer to ``request``, within the bounds of ``BOOK_PROXY_*``."""
        replica, metrics = self.replica, self.metrics
        if request.headers.get(PROXY_HEADER):
            return _unavailable(f"{symbol} is not served by replica {replica} any more")
        try:
            owner = await self.running_service().owner_of(symbol)
        except (redis.exceptions.RedisError, OSError):
            return _unavailable(f"{symbol}: cannot read its owner from Redis")
        if owner is None or owner.url is None:
            metrics.proxied.labels(symbol, "no_owner").inc()
            return _unavailable(f"no replica serves {symbol} at the moment")
        if owner.id == replica:
            return _unavailable(f"{symbol} book is starting on this replica")
        peers = self.running_peers()
        if not peers.allowed(owner.url):
            metrics.proxied.labels(symbol, "refused_url").inc()
            log.warning("owner URL refused: it does not match BOOK_PEER_URL_PATTERN",
                        extra=kv(symbol=symbol, owner=owner.id, url=owner.url[:200]))
            return _unavailable(f"{symbol}: its owner {owner.id} advertises a URL this "
                                "replica does not proxy to")
        limit = self.settings.proxy_max_bytes
        deadline = self.settings.proxy_timeout_seconds
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


def _book(request: Request) -> _Book:
    return cast(_Book, request.app.state.book)


#: A route's dependency on its app's :class:`_Book`.
BookDep = Annotated[_Book, Depends(_book)]

#: The routes of every book app (the state they need: :data:`BookDep`).
router = APIRouter()


@router.post("/admin/drain")
async def admin_drain(request: Request, book: BookDep) -> Response:
    """Hand every book of this replica off and take none any more (it keeps answering
    by proxy): before maintenance, or to move load off a busy host. The one call of
    the book that changes something: it needs the token of ``BOOK_API_TOKEN``, and
    is off while none is set, even on the loopback interface (SIGTERM drains too)."""
    guard, replica = book.guard, book.replica
    if guard.policy != "token":
        return _unavailable("draining by HTTP is off: set BOOK_API_TOKEN to use it "
                            "(SIGTERM drains the replica too)", 403)
    if not guard.allows(presented_token(request.headers, request.query_params)):
        return _unavailable(guard.refusal("draining", "BOOK_API_TOKEN"), 403)
    moved = await book.drain()
    log.info("drained on request", extra=kv(replica=replica, handed_off=moved))
    return JSONResponse({"replica": replica, "draining": True, "handedOff": moved},
                        headers={REPLICA_HEADER: replica})


@router.get("/book/{symbol}")
async def get_book(request: Request, symbol: Symbol, book: BookDep,
                   depth: Depth = 12) -> Response:
    """Aggregated levels: ``[price, size, orders]``, best first."""
    return await book.serve(request, symbol, lambda c: c.book_body(depth))


@router.get("/book/{symbol}/l3")
async def get_l3(request: Request, symbol: Symbol, book: BookDep, depth: Depth = 5) -> Response:
    """Levels with their orders in queue order."""
    return await book.serve(request, symbol, lambda c: c.l3_body(depth))


@router.get("/book/{symbol}/orders/{order_id}")
async def get_order(request: Request, symbol: Symbol, book: BookDep,
                    order_id: Annotated[str, Path(min_length=1, max_length=100)]) -> Response:
    """Where a resting order stands in its price's queue."""
    return await book.serve(request, symbol, lambda c: c.order_body(order_id),
                            f"order {order_id} does not rest on the {symbol} book")


@router.get("/books")
async def get_books(book: BookDep) -> Response:
    """Every configured symbol with its sequence, synced flag and owner."""
    try:
        rows = await book.running_service().books()
    except (redis.exceptions.RedisError, OSError):
        return _unavailable("cannot read the other replicas' state from Redis")
    return JSONResponse({"replica": book.replica, "books": rows},
                        headers={REPLICA_HEADER: book.replica})


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The live book page (one self-contained file, no build step)."""
    return FileResponse(_STATIC / "index.html", media_type="text/html")


@router.get("/healthz")
async def healthz(book: BookDep) -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok", "replica": book.replica}


@router.get("/readyz")
async def readyz(book: BookDep) -> JSONResponse:
    """Ready when the leases were taken and every owned book is synced."""
    svc = book.running_service()
    ok, detail = svc.ready()
    body = {"ready": ok, "detail": detail, "replica": book.replica, "owned": svc.owned}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.websocket("/ws/book/{symbol}")
async def ws_book(websocket: WebSocket, symbol: Symbol, depth: Depth = 12) -> None:
    """The ``GET /book`` body, pushed on change (throttled)."""
    book = cast(_Book, websocket.app.state.book)
    settings, metrics = book.settings, book.metrics
    if symbol not in book.symbols:
        await websocket.close(code=1008, reason=f"unknown symbol {symbol}")
        return
    if book.ws_clients >= settings.ws_max_clients:
        metrics.ws_refused.inc()
        # Accepted, then closed: a close code the client can read (not an HTTP 403).
        await websocket.accept()
        await websocket.close(code=CLOSE_TRY_AGAIN, reason=(
            f"try again later: {settings.ws_max_clients} WebSocket clients already"))
        return
    book.ws_clients += 1
    try:
        await websocket.accept()
        metrics.ws_clients.labels(symbol).inc()
        token = presented_token(websocket.headers, websocket.query_params)
        session = WsSession(websocket, symbol, depth, book.running_service(),
                             book.running_peers(), settings, metrics,
                             proxied=bool(websocket.headers.get(PROXY_HEADER)),
                             own=book.guard.allows(token), token=token)
        try:
            await session.run()
        finally:
            metrics.ws_clients.labels(symbol).dec()
    finally:
        book.ws_clients -= 1


def create_app(settings: BookSettings, *, metrics: BookMetrics | None = None) -> FastAPI:
    """The FastAPI app; its lifespan connects to Redis and runs the :class:`BookService`."""
    book = _Book(settings, metrics if metrics is not None else BookMetrics())
    if book.guard.policy == "off":
        log.warning("BOOK_API_TOKEN is not set and the book listens beyond the loopback "
                    "interface: own orders are not pushed on the WebSocket",
                    extra=kv(host=settings.host))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with book.running():
            yield

    app = FastAPI(title="kumex-l3 book", version="0.1.0", lifespan=lifespan)
    app.state.book = book
    app.state.fast_route = _fast_route(book)
    app.state.drain = book.drain
    app.add_middleware(_Timing, metrics=book.metrics)
    app.include_router(metrics_router(book.metrics.registry))
    app.include_router(router)
    return app


def _fast_route(book: _Book) -> FastRoute:
    """``GET /book/{symbol}`` and ``/book/{symbol}/l3`` of a book served here, for
    :func:`kumex_l3.httpserver.http_protocol`: the cached body, written without the app.

    Anything else (another replica's symbol, a book not served, a query other than
    ``depth=N``) returns ``None``: the app answers it, with its checks and messages.
    """
    symbols = book.symbols
    headers = ((b"content-type", _JSON.encode()),
               (REPLICA_HEADER.encode(), book.replica.encode()))
    count = book.metrics.fast_requests
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
        service = book.service
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
