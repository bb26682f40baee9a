"""The terminal viewer: frames from real book shapes, and the command against a real server.

Frames are rendered from bodies built the way the book service builds them
(:meth:`kumex_l3.OrderBook.depth_rows` and :meth:`~kumex_l3.OrderBook.l3` of a
book fed by the synthetic stream). The command runs as a subprocess
(``python -m kumex_l3 watch --once``) against a small FastAPI server, started
here on a free port, that serves the documented ``/book``, ``/book/{symbol}/l3``
and ``WS /ws/book`` shapes; the live loop (:func:`kumex_l3.viewer.watch`) is
run in-process against the same server, through a dropped connection.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from rich.console import Console
from starlette.websockets import WebSocketDisconnect

from kumex_l3 import OrderBook, keys, parse_message
from kumex_l3.messages import format_qty
from kumex_l3.testing.synthetic import StreamGenerator
from kumex_l3.viewer import (
    WatchOptions,
    fetch_own_ids,
    is_synced,
    ladder_rows,
    own_orders,
    render,
    spread,
    watch,
)

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "XBTUSDM"
UNSYNCED = "ETHUSDTM"
SAFETY_S = 30.0
_BAR_EIGHTHS = {"▏": 1, "▎": 2, "▍": 3, "▌": 4, "▋": 5, "▊": 6, "▉": 7}


# --------------------------------------------------------------------------- real shapes


def make_book(seed: int = 3, warm: int = 3000, after: int = 500) -> OrderBook:
    """A book from a synthetic snapshot, then ``after`` live messages applied."""
    gen = StreamGenerator(SYMBOL, seed=seed)
    gen.take(warm)
    book = OrderBook.from_snapshot(gen.snapshot())
    for raw in gen.take(after):
        book.apply(parse_message(raw))
    book.check()
    return book


def book_body(book: OrderBook, depth: int = 12) -> dict[str, Any]:
    """``GET /book/{symbol}`` as the service writes it."""
    bids, asks = book.depth_rows(depth)
    return {"symbol": book.symbol, "sequence": book.sequence, "ts": book.ts,
            "bids": bids, "asks": asks}


def l3_body(book: OrderBook, depth: int = 12) -> dict[str, Any]:
    """``GET /book/{symbol}/l3`` as the service writes it."""
    bids, asks = book.l3(depth)

    def levels(side: list[Any]) -> list[dict[str, Any]]:
        return [{"price": lv.text, "size": format_qty(lv.size),
                 "orders": [{"orderId": o.order_id, "size": format_qty(o.size), "ts": o.ts}
                            for o in lv.orders]} for lv in side]

    return {"symbol": book.symbol, "sequence": book.sequence, "ts": book.ts,
            "bids": levels(bids), "asks": levels(asks)}


def status_body(symbol: str, detail: str) -> dict[str, Any]:
    """What the WebSocket pushes (and a 503 carries) while a book is not served."""
    return {"symbol": symbol, "synced": False, "detail": detail}


def text_of(renderable: Any, width: int = 160) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


def bar_eighths(cell: str) -> int:
    return sum(8 if ch == "█" else _BAR_EIGHTHS.get(ch, 0) for ch in cell)


def ladder_lines(text: str, book: OrderBook) -> tuple[list[str], list[str]]:
    """The rendered ask rows (top to bottom) and bid rows, found by their price text."""
    bids, asks = book.depth_rows(12)
    lines = text.splitlines()

    def line_of(price: str) -> str:
        found = [ln for ln in lines if re.search(rf"(?<![\d.]){re.escape(price)}(?![\d.])", ln)]
        assert found, f"price {price} not shown"
        return found[0]

    return [line_of(p) for p, _, _ in reversed(asks)], [line_of(p) for p, _, _ in bids]


# --------------------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def book() -> OrderBook:
    return make_book()


def test_ladder_rows_cumulative_is_monotone(book: OrderBook) -> None:
    body = book_body(book)
    for side in ("bids", "asks"):
        rows = ladder_rows(body[side])
        assert len(rows) == 12
        sums = [r.cumulative for r in rows]
        assert sums == sorted(sums)
        assert sums[-1] == sum(Decimal(size) for _, size, _ in body[side])
        assert [r.orders for r in rows] == [n for _, _, n in body[side]]


def test_frame_shows_twelve_levels_a_side_asks_above_bids(book: OrderBook) -> None:
    text = text_of(render(book_body(book)))
    asks, bids = ladder_lines(text, book)
    lines = text.splitlines()
    order = [lines.index(ln) for ln in asks + bids]
    assert order == sorted(order), "asks (worst to best) above bids (best to worst)"
    assert "SYNCED" in text and "NOT SYNCED" not in text
    assert f"sequence {book.sequence}" in text
    # price, size and order count of the best bid on its line
    price, size, count = book.depth_rows(1)[0][0]
    assert re.search(rf"{re.escape(price)}\s+{size}\s+{count}\b", bids[0])


def test_cumulative_bars_grow_outward_from_the_spread(book: OrderBook) -> None:
    text = text_of(render(book_body(book)))
    asks, bids = ladder_lines(text, book)
    ask_bars = [bar_eighths(ln) for ln in reversed(asks)]  # best ask first
    bid_bars = [bar_eighths(ln) for ln in bids]
    for bars in (ask_bars, bid_bars):
        assert bars == sorted(bars)
    assert max(ask_bars[-1], bid_bars[-1]) == 24 * 8  # the deeper side fills the bar


def test_spread_and_mid_are_shown(book: OrderBook) -> None:
    body = book_body(book)
    gap = spread(ladder_rows(body["bids"]), ladder_rows(body["asks"]))
    assert gap is not None
    value, mid = gap
    assert value == book.best_ask() - book.best_bid() and value > 0
    text = text_of(render(body))
    line = next(ln for ln in text.splitlines() if "spread" in ln)
    assert str(value) in line and f"mid {mid.normalize():f}" in line


def test_not_synced_banner_hides_the_ladder(book: OrderBook) -> None:
    status = status_body(SYMBOL, "XBTUSDM book is not synced (waiting for a snapshot)")
    assert not is_synced(status)
    text = text_of(render(status))
    assert "NOT SYNCED: XBTUSDM book is not synced (waiting for a snapshot)" in text
    best = book.depth_rows(1)[0][0][0]
    assert best not in text and "spread" not in text


def test_lost_connection_is_said_and_the_stale_book_hidden(book: OrderBook) -> None:
    body = book_body(book)
    text = text_of(render(body, connection="connection refused; reconnecting in 1.0 s"))
    assert "NOT CONNECTED: connection refused; reconnecting in 1.0 s" in text
    assert f"last sequence seen {book.sequence}" in text
    assert "spread" not in text and "SYNCED " not in text.replace("NOT SYNCED", "")


def test_one_side_empty_shows_no_spread() -> None:
    body = {"symbol": SYMBOL, "sequence": 5, "ts": 0, "bids": [["100.0", "3", 1]], "asks": []}
    text = text_of(render(body))
    assert "one side is empty" in text and "no asks" in text and "100.0" in text


def test_l3_queues_and_own_orders_highlighted(book: OrderBook) -> None:
    bids, asks = book.l3(12)
    mine = {bids[1].orders[-1].order_id, asks[0].orders[0].order_id}
    text = text_of(render(book_body(book), mine, l3=l3_body(book)), width=200)
    assert "queue (first → last)" in text and "own orders" in text
    views = own_orders(book_body(book), l3_body(book), mine)
    assert {v.order_id for v in views} == mine
    for view in views:
        where = book.queue_position(view.order_id)
        assert where is not None
        assert view.position == where.position
        assert view.size_ahead == format_qty(where.size_ahead)
        assert view.order_id in text
    # the two levels holding them are marked on the ladder
    marked = [ln for ln in text.splitlines() if ln.lstrip().startswith("★")]
    assert len(marked) == 2


def test_own_order_deep_in_a_long_queue_is_still_shown(book: OrderBook) -> None:
    bids, _ = book.l3(12)
    level = next(lv for lv in bids if len(lv.orders) >= 4)
    deep = level.orders[3]
    text = text_of(render(book_body(book), {deep.order_id}, l3=l3_body(book), queue_max=2),
                   width=200)
    line = next(ln for ln in text.splitlines() if f" {level.text} " in ln)
    assert f"…+{len(level.orders) - 2}" in line
    assert f"★{format_qty(deep.size)}#3" in line


def test_own_list_in_the_body_is_used_when_present(book: OrderBook) -> None:
    bid = book.l3(1)[0][0]
    body = dict(book_body(book), own=[{"orderId": "mine-1", "side": "buy", "price": bid.text,
                                       "size": "3", "position": 4, "sizeAhead": "17"}])
    text = text_of(render(body))
    assert "own orders" in text and "mine-1" in text
    assert re.search(r"buy\s+" + re.escape(bid.text) + r"\s+3\s+4\s+17", text)


async def test_own_ids_come_from_redis(redis_client: redis.asyncio.Redis) -> None:
    await redis_client.sadd(keys.orders_active(SYMBOL), "grid-1", "grid-2", "grid-3")
    await redis_client.hset(keys.order(SYMBOL, "grid-1"), mapping={"orderId": "ex-1"})
    await redis_client.hset(keys.order(SYMBOL, "grid-2"), mapping={"orderId": "ex-2"})
    await redis_client.hset(keys.order(SYMBOL, "grid-3"), mapping={"status": "pending"})
    assert await fetch_own_ids(redis_client, SYMBOL) == {"ex-1", "ex-2"}
    assert await fetch_own_ids(redis_client, "ETHUSDTM") == frozenset()


# --------------------------------------------------------------------------- a real server


@dataclass
class FakeBookService:
    """Serves the documented book-service shapes for one synced and one unsynced symbol."""

    book: OrderBook
    port: int = 0
    ws_connections: int = 0
    #: Bodies pushed to each WebSocket client, then the server closes the connection.
    pushes: list[dict[str, Any]] = field(default_factory=list)
    app: FastAPI = field(init=False)

    def __post_init__(self) -> None:
        app = FastAPI()
        detail = f"{UNSYNCED} book is not synced (waiting for a snapshot)"

        @app.get("/book/{symbol}")
        async def get_book(symbol: str, depth: int = 12) -> JSONResponse:
            if symbol == SYMBOL:
                return JSONResponse(book_body(self.book, depth))
            if symbol == UNSYNCED:
                return JSONResponse({"detail": detail}, status_code=503)
            return JSONResponse({"detail": f"unknown symbol {symbol}"}, status_code=404)

        @app.get("/book/{symbol}/l3")
        async def get_l3(symbol: str, depth: int = 5) -> JSONResponse:
            if symbol != SYMBOL:
                return JSONResponse({"detail": "not served"}, status_code=503)
            return JSONResponse(l3_body(self.book, depth))

        @app.websocket("/ws/book/{symbol}")
        async def ws_book(websocket: WebSocket, symbol: str, depth: int = 12) -> None:
            if symbol not in {SYMBOL, UNSYNCED}:
                await websocket.close(code=1008)
                return
            await websocket.accept()
            self.ws_connections += 1
            bodies = self.pushes or [book_body(self.book, depth) if symbol == SYMBOL
                                     else status_body(symbol, detail)]
            try:
                for body in bodies:
                    await websocket.send_text(json.dumps(body))
                    await asyncio.sleep(0.02)
            except WebSocketDisconnect:
                return
            await websocket.close()  # the viewer must reconnect

        self.app = app


@pytest.fixture
async def service(book: OrderBook) -> AsyncIterator[FakeBookService]:
    fake = FakeBookService(book)
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off",
                                           ws_ping_interval=None))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(SAFETY_S):
        while not server.started:
            await asyncio.sleep(0.01)
    fake.port = int(server.servers[0].sockets[0].getsockname()[1])
    yield fake
    server.should_exit = True
    await task


async def run_watch(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kumex_l3", "watch", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", **(env or {})})
    async with asyncio.timeout(SAFETY_S):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_watch_once_prints_the_book(service: FakeBookService, book: OrderBook) -> None:
    code, out, err = await run_watch(SYMBOL, "--url", f"http://127.0.0.1:{service.port}",
                                     "--once")
    assert code == 0, err
    bids, asks = book.depth_rows(12)
    for price, _, _ in bids + asks:
        assert price in out
    assert "SYNCED" in out and "NOT SYNCED" not in out and "spread" in out
    assert f"sequence {book.sequence}" in out


async def test_watch_once_depth_limits_the_levels(service: FakeBookService,
                                                  book: OrderBook) -> None:
    code, out, err = await run_watch(SYMBOL, "--url", f"http://127.0.0.1:{service.port}",
                                     "--once", "--depth", "3")
    assert code == 0, err
    bids, asks = book.depth_rows(4)
    assert all(p in out for p, _, _ in bids[:3] + asks[:3])
    assert bids[3][0] not in out and asks[3][0] not in out


async def test_watch_once_not_synced(service: FakeBookService) -> None:
    code, out, _ = await run_watch(UNSYNCED, "--url", f"http://127.0.0.1:{service.port}",
                                   "--once")
    assert code == 1
    assert "NOT SYNCED" in out and "waiting for a snapshot" in out


async def test_watch_once_unknown_symbol_and_no_server(service: FakeBookService) -> None:
    code, out, _ = await run_watch("XBTUSDTM", "--url", f"http://127.0.0.1:{service.port}",
                                   "--once")
    assert code == 2 and "unknown symbol XBTUSDTM" in out
    from kumex_l3.testing.devredis import free_port

    code, out, _ = await run_watch(SYMBOL, "--url", f"http://127.0.0.1:{free_port()}", "--once")
    assert code == 2 and "NOT CONNECTED" in out and "cannot reach the book service" in out


async def test_watch_once_l3_highlights_own_orders_from_redis(
        service: FakeBookService, book: OrderBook, redis_client: redis.asyncio.Redis,
        redis_url: str) -> None:
    target = book.l3(12)[0][0].orders[0]  # first in the best bid's queue
    await redis_client.sadd(keys.orders_active(SYMBOL), "grid-7")
    await redis_client.hset(keys.order(SYMBOL, "grid-7"), mapping={"orderId": target.order_id})
    code, out, err = await run_watch(SYMBOL, "--url", f"http://127.0.0.1:{service.port}",
                                     "--once", "--l3", "--redis-url", redis_url)
    assert code == 0, err
    assert "queue (first → last)" in out and "own orders" in out
    assert target.order_id in out and "★" in out


async def test_live_watch_follows_pushes_and_reconnects(service: FakeBookService,
                                                        book: OrderBook) -> None:
    first = book_body(book)
    second = dict(first, sequence=book.sequence + 1)
    service.pushes = [first, second]  # then the server closes: a reconnect is needed
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)
    options = WatchOptions(symbol=SYMBOL, url=f"http://127.0.0.1:{service.port}", l3=True)
    async with asyncio.timeout(SAFETY_S):
        code = await watch(options, console, max_frames=3)
    assert code == 0
    assert service.ws_connections == 2
    text = out.getvalue()
    assert f"sequence {book.sequence}" in text  # the third push: first body, new connection
    assert "queue (first → last)" in text


async def test_live_watch_shows_not_synced_pushes(service: FakeBookService) -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)
    options = WatchOptions(symbol=UNSYNCED, url=f"http://127.0.0.1:{service.port}")
    async with asyncio.timeout(SAFETY_S):
        code = await watch(options, console, max_frames=1)
    assert code == 1
    assert "NOT SYNCED" in out.getvalue()


async def test_live_watch_stops_on_an_unknown_symbol(service: FakeBookService) -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)
    options = WatchOptions(symbol="XBTUSDTM", url=f"http://127.0.0.1:{service.port}")
    async with asyncio.timeout(SAFETY_S):
        code = await watch(options, console)
    assert code == 2
    assert "unknown symbol XBTUSDTM" in out.getvalue()
