"""Terminal viewer of the book service: ``python -m kumex_l3 watch SYMBOL``.

It shows the book as a ladder, ``depth`` levels a side: asks above (the best
just above the spread), bids below; each level's price, size, order count and
a bar of the size summed from the best price outward; the spread and mid, the
sequence, and whether the book is synced, said plainly. It follows the book
service's WebSocket (``/ws/book/{symbol}?depth=N``) and, when the connection
drops, says so and reconnects with backoff. A ``NOT SYNCED`` push (the service
is starting or resyncing) hides the ladder: a stale book is never shown as a
live one.

With ``--l3`` each level also lists its orders in queue order (from
``GET /book/{symbol}/l3``, fetched after a push, throttled; the ladder then
shows that body's state, so that levels and queues agree), the user's own
orders highlighted with their place in the queue. Own orderIds come from Redis
(``--redis-url``): the clientOids of ``kumex:{SYM}:orders:active``, then the
``orderId`` field of each order's hash; and from an ``own`` list in the pushed
body, when the book service provides one.

:func:`render` is pure (bodies in, a rich renderable out; no sockets, no
clock), so frames are testable; :func:`watch` and :func:`watch_once` do the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from kumex_l3 import keys, redis_adapter
from kumex_l3.backoff import Backoff

__all__ = [
    "DEFAULT_URL",
    "LadderRow",
    "OwnOrderView",
    "ViewerState",
    "WatchOptions",
    "build_parser",
    "fetch_own_ids",
    "is_synced",
    "ladder_rows",
    "main",
    "own_orders",
    "render",
    "spread",
    "watch",
    "watch_once",
    "ws_url",
]

#: The book service on this machine (``BOOK_PORT`` default).
DEFAULT_URL: Final = "http://127.0.0.1:8080"

_PARTIAL: Final = ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")
_ASK_STYLE: Final = "red"
_BID_STYLE: Final = "green"
_OWN_STYLE: Final = "bold black on yellow"
_OWN_MARK: Final = "★"


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True, slots=True)
class LadderRow:
    """One level of a side, with the size summed from the best price down to it."""

    price: Decimal
    price_text: str
    size_text: str
    orders: int
    cumulative: Decimal


@dataclass(frozen=True, slots=True)
class OwnOrderView:
    """One own order resting on the book, where it stands in its price's queue."""

    order_id: str
    side: str
    price_text: str
    size_text: str
    position: int
    size_ahead: str


def _dec(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r:.40}") from None


def _text(value: Decimal) -> str:
    """A Decimal as plain text, never in exponent form (``100``, ``0.5``)."""
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def is_synced(body: Mapping[str, Any] | None) -> bool:
    """True for a ``GET /book`` body; False for a status body (``synced: false``) or None."""
    if body is None or body.get("synced") is False:
        return False
    return isinstance(body.get("bids"), list) and isinstance(body.get("asks"), list)


def ladder_rows(levels: Sequence[Sequence[Any]], depth: int | None = None) -> list[LadderRow]:
    """``[[price, size, orders], ...]`` (best first) as rows with their cumulative size."""
    rows: list[LadderRow] = []
    total = Decimal(0)
    for level in levels[:depth]:
        price_text, size_text, count = str(level[0]), str(level[1]), int(level[2])
        total += _dec(size_text)
        rows.append(LadderRow(_dec(price_text), price_text, size_text, count, total))
    return rows


def spread(bids: Sequence[LadderRow], asks: Sequence[LadderRow]) -> tuple[Decimal, Decimal] | None:
    """``(best ask - best bid, mid)``, or None when a side is empty."""
    if not bids or not asks:
        return None
    bid, ask = bids[0].price, asks[0].price
    return ask - bid, (ask + bid) / 2


_Queues = dict[tuple[str, Decimal], tuple[str, list[Mapping[str, Any]]]]


def _l3_queues(l3: Mapping[str, Any] | None) -> _Queues:
    """``(side, price) -> (price text, orders in queue order)`` from a ``/l3`` body."""
    queues: _Queues = {}
    if not l3:
        return queues
    for side, name in (("buy", "bids"), ("sell", "asks")):
        for level in l3.get(name) or ():
            try:
                text = str(level["price"])
                queues[(side, _dec(text))] = (text, list(level.get("orders") or ()))
            except (KeyError, TypeError, ValueError):
                continue
    return queues


def own_orders(body: Mapping[str, Any] | None, l3: Mapping[str, Any] | None,
               own_ids: Collection[str]) -> list[OwnOrderView]:
    """The own orders to show: the body's ``own`` list when it has one, else found in ``l3``.

    From ``l3`` the position is the index in the level's queue (0 = first) and
    ``size_ahead`` the sum of the sizes before it. Sorted as on the ladder:
    asks from the highest price down, then bids from the highest down.
    """
    found: list[OwnOrderView] = []
    listed = body.get("own") if body is not None else None
    if isinstance(listed, list) and listed:
        for item in listed:
            if not isinstance(item, Mapping) or "orderId" not in item:
                continue
            try:
                position = int(item.get("position", -1))
            except (TypeError, ValueError):
                position = -1
            found.append(OwnOrderView(
                str(item["orderId"]), str(item.get("side", "?")), str(item.get("price", "?")),
                str(item.get("size", "?")), position, str(item.get("sizeAhead", "?"))))
    elif own_ids:
        for (side, _), (price_text, queue) in _l3_queues(l3).items():
            ahead = Decimal(0)
            for position, order in enumerate(queue):
                try:
                    size = _dec(order.get("size", 0))
                except ValueError:
                    size = Decimal(0)
                if order.get("orderId") in own_ids:
                    found.append(OwnOrderView(str(order["orderId"]), side, price_text,
                                              _text(size), position, _text(ahead)))
                ahead += size

    def key(o: OwnOrderView) -> tuple[int, Decimal]:
        try:
            price = _dec(o.price_text)
        except ValueError:
            price = Decimal(0)
        return (0 if o.side == "sell" else 1, -price)

    return sorted(found, key=key)


def _l3_as_book(l3: Mapping[str, Any], body: Mapping[str, Any]) -> Mapping[str, Any]:
    """A ``GET /book`` body made of an ``/l3`` body (``body`` gives what L3 lacks)."""
    try:
        sides = {name: [[lv["price"], lv["size"], len(lv.get("orders") or ())]
                        for lv in l3[name]] for name in ("bids", "asks")}
    except (KeyError, TypeError):
        return body
    return {**body, "sequence": l3.get("sequence", body.get("sequence")),
            "ts": l3.get("ts", body.get("ts")), **sides}


def _bar(value: Decimal, scale: Decimal, width: int) -> str:
    """A horizontal bar ``value / scale`` of ``width`` cells, in eighths of a cell."""
    if scale <= 0 or value <= 0 or width <= 0:
        return ""
    eighths = int(min(value / scale, Decimal(1)) * width * 8)
    return "█" * (eighths // 8) + _PARTIAL[eighths % 8]


def _clock(ts: Any) -> str:
    """The book's ``ts`` (ns, µs or ms since the epoch) as UTC ``HH:MM:SS.mmm``."""
    if not isinstance(ts, int) or ts <= 0:
        return "-"
    seconds = ts / 1e9 if ts > 10**17 else ts / 1e6 if ts > 10**14 else ts / 1e3
    try:
        moment = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return "-"
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _queue_text(queue: Sequence[Mapping[str, Any]], own_ids: Collection[str],
                queue_max: int) -> Text:
    """Order sizes in queue order, own ones starred; past ``queue_max`` only own ones."""
    out = Text()
    for order in queue[:queue_max]:
        if out:
            out.append(" ")
        if order.get("orderId") in own_ids:
            out.append(f"{_OWN_MARK}{order.get('size', '?')}", style=_OWN_STYLE)
        else:
            out.append(str(order.get("size", "?")))
    if len(queue) > queue_max:
        out.append(f" …+{len(queue) - queue_max}", style="dim")
        for index, order in enumerate(queue[queue_max:], start=queue_max):
            if order.get("orderId") in own_ids:  # with its place: #0 is first
                out.append(f" {_OWN_MARK}{order.get('size', '?')}#{index}", style=_OWN_STYLE)
    return out


def _header(body: Mapping[str, Any] | None, symbol: str, synced: bool, connection: str | None,
            source: str | None) -> Text:
    head = Text()
    head.append(f" {symbol} ", style="bold reverse")
    head.append("  ")
    if connection is not None:
        head.append(" NOT CONNECTED ", style="bold black on yellow")
    elif synced:
        head.append(" SYNCED ", style="bold black on green")
    else:
        head.append(" NOT SYNCED ", style="bold white on red")
    if body is not None and body.get("sequence") is not None:
        head.append(f"  sequence {body['sequence']}")
    if synced and body is not None:
        head.append(f"  ts {_clock(body.get('ts'))} UTC", style="dim")
    if source:
        head.append(f"  {source}", style="dim")
    return head


def _banner(text: str, style: str) -> Table:
    grid = Table.grid(expand=True)
    grid.add_column(justify="center")
    grid.add_row(Text(text, style=style))
    return grid


def render(
    body: Mapping[str, Any] | None,
    own_ids: Collection[str] = frozenset(),
    *,
    l3: Mapping[str, Any] | None = None,
    depth: int = 12,
    symbol: str | None = None,
    connection: str | None = None,
    source: str | None = None,
    bar_width: int = 24,
    queue_max: int = 10,
    note: str | None = None,
) -> RenderableType:
    """One frame of the viewer.

    ``body`` is the latest ``GET /book`` body or WebSocket push (a status body
    ``{"symbol", "synced": false, "detail"}`` shows the NOT SYNCED banner and no
    ladder); ``connection`` is None while connected, else what is wrong with the
    connection (shown instead of the ladder, which would be stale). ``l3`` (a
    ``GET /book/{symbol}/l3`` body, used for the whole ladder when the book is
    synced) adds each level's queue, with the orders of
    ``own_ids`` (and of the body's optional ``own`` list) highlighted. ``note``
    is a side remark printed last, dimmed.
    """
    frame = _frame(body, own_ids, l3=l3, depth=depth, symbol=symbol, connection=connection,
                   source=source, bar_width=bar_width, queue_max=queue_max)
    return Group(frame, Text(note, style="dim")) if note else frame


def _frame(
    body: Mapping[str, Any] | None,
    own_ids: Collection[str],
    *,
    l3: Mapping[str, Any] | None,
    depth: int,
    symbol: str | None,
    connection: str | None,
    source: str | None,
    bar_width: int,
    queue_max: int,
) -> RenderableType:
    name = symbol or (str(body.get("symbol")) if body and body.get("symbol") else "?")
    synced = connection is None and is_synced(body)
    if synced and body is not None and l3 is not None:
        # The ladder and its queues from one state of the book: the L3 body's.
        body = _l3_as_book(l3, body)
    parts: list[RenderableType] = [_header(body, name, synced, connection, source)]
    if connection is not None:
        seen = f" (last sequence seen {body['sequence']})" if body and "sequence" in body else ""
        parts.append(_banner(f"NOT CONNECTED: {connection}{seen}", "bold black on yellow"))
        return Group(*parts)
    if body is None:
        parts.append(_banner("waiting for the first book...", "bold"))
        return Group(*parts)
    if not synced:
        detail = body.get("detail") or "the book service is not serving this book"
        parts.append(_banner(f"NOT SYNCED: {detail}", "bold white on red"))
        return Group(*parts)
    try:
        bids = ladder_rows(body["bids"], depth)
        asks = ladder_rows(body["asks"], depth)
    except (IndexError, TypeError, ValueError) as exc:
        parts.append(_banner(f"NOT SYNCED: unexpected book body ({exc})", "bold white on red"))
        return Group(*parts)

    own_view = own_orders(body, l3, own_ids)
    queues = _l3_queues(l3) if l3 is not None else None
    parts.append(_ladder(bids, asks, own_view, own_ids, queues, bar_width=bar_width,
                         queue_max=queue_max))
    if own_view:
        parts.append(_own_table(own_view))
    elif queues is not None and not own_ids:
        parts.append(Text("own orders: none active (their orderIds are read from Redis: "
                          "--redis-url)", style="dim"))
    return Group(*parts)


def _ladder(bids: Sequence[LadderRow], asks: Sequence[LadderRow], own_view: Sequence[OwnOrderView],
            own_ids: Collection[str], queues: _Queues | None, *,
            bar_width: int, queue_max: int) -> Table:
    """The ladder: asks (best last), the spread, bids (best first); own levels marked."""
    all_own = set(own_ids) | {o.order_id for o in own_view}
    own_prices: set[tuple[str, Decimal]] = set()
    for o in own_view:
        try:
            own_prices.add((o.side, _dec(o.price_text)))
        except ValueError:
            continue
    table = Table(box=box.HORIZONTALS, pad_edge=False, show_edge=False, expand=False)
    table.add_column("", width=1, no_wrap=True)
    table.add_column("price", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("orders", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("cumulative", min_width=bar_width, no_wrap=True, overflow="crop")
    if queues is not None:
        table.add_column("queue (first → last)", no_wrap=True, overflow="ellipsis")
    scale = max((side[-1].cumulative for side in (bids, asks) if side), default=Decimal(0))

    def add(row: LadderRow, side: str, style: str, *, end_section: bool = False) -> None:
        mark = _OWN_MARK if (side, row.price) in own_prices else ""
        cells: list[RenderableType] = [
            Text(mark, style="bold yellow"), Text(row.price_text, style=f"bold {style}"),
            row.size_text, str(row.orders), _text(row.cumulative),
            Text(_bar(row.cumulative, scale, bar_width), style=style)]
        if queues is not None:
            entry = queues.get((side, row.price))
            cells.append(_queue_text(entry[1], all_own, queue_max) if entry is not None
                         else Text("…", style="dim"))
        table.add_row(*cells, end_section=end_section)

    for i, row in enumerate(reversed(asks)):
        add(row, "sell", _ASK_STYLE, end_section=i == len(asks) - 1)
    gap = spread(bids, asks)
    if gap is None:
        middle = Text("one side is empty", style="bold")
        table.add_row("", Text("spread", style="bold"), Text("-", style="bold"), "", "", middle,
                      *([""] if queues is not None else []), end_section=True)
    else:
        value, mid = gap
        bps = (value / mid * 10_000).quantize(Decimal("0.01")) if mid > 0 else Decimal(0)
        middle = Text(f"mid {_text(mid)} · {_text(bps)} bp", style="bold")
        table.add_row("", Text("spread", style="bold"), Text(_text(value), style="bold"), "", "",
                      middle, *([""] if queues is not None else []), end_section=True)
    for row in bids:
        add(row, "buy", _BID_STYLE)
    if not asks:
        table.caption = "no asks"
    elif not bids:
        table.caption = "no bids"
    return table


def _own_table(own_view: Sequence[OwnOrderView]) -> Table:
    """The user's own orders: where each stands in its queue."""
    mine = Table(title="own orders", box=box.SIMPLE, title_justify="left", show_edge=False)
    for column in ("side", "price", "size", "position", "size ahead", "orderId"):
        mine.add_column(column, justify="right" if column != "orderId" else "left")
    for o in own_view:
        mine.add_row(o.side, o.price_text, o.size_text,
                     str(o.position) if o.position >= 0 else "?", o.size_ahead, o.order_id,
                     style=_ASK_STYLE if o.side == "sell" else _BID_STYLE)
    return mine


# --------------------------------------------------------------------------- I/O shell


@dataclass(frozen=True, slots=True)
class WatchOptions:
    """What ``watch`` shows and where it reads it."""

    symbol: str
    url: str = DEFAULT_URL
    depth: int = 12
    l3: bool = False
    redis_url: str | None = None
    #: Minimum seconds between two ``/l3`` fetches (and own-order refreshes).
    l3_interval: float = 0.25
    #: Seconds between two reads of the own orders from Redis.
    own_interval: float = 2.0
    timeout: float = 5.0
    #: The book's ``BOOK_API_TOKEN``, for its ``own`` list (:mod:`kumex_l3.access`).
    token: str | None = field(default=None, repr=False)


@dataclass(slots=True)
class ViewerState:
    """What the next frame shows (the live loop's mutable state)."""

    body: dict[str, Any] | None = None
    l3: dict[str, Any] | None = None
    own_ids: frozenset[str] = frozenset()
    connection: str | None = "connecting"
    pushes: int = 0
    #: A side remark shown under the frame (e.g. Redis unreachable).
    note: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def ws_url(base_url: str, symbol: str, depth: int) -> str:
    """The WebSocket URL of ``symbol`` on the book service at ``base_url`` (http -> ws)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    return f"{base}/ws/book/{symbol}?depth={depth}"


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def fetch_own_ids(client: aioredis.Redis, symbol: str) -> frozenset[str]:
    """OrderIds of the user's active orders: ``orders:active`` clientOids -> hash ``orderId``.

    Orders not yet acknowledged by the exchange have no orderId yet: left out.
    """
    members = await client.smembers(keys.orders_active(symbol))
    coids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    if not coids:
        return frozenset()
    pipe = client.pipeline(transaction=False)
    for coid in coids:
        pipe.hget(keys.order(symbol, coid), "orderId")
    values = await pipe.execute()
    return frozenset(v.decode() if isinstance(v, bytes) else str(v) for v in values if v)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Viewer:
    """The live loop: a WebSocket reader, an L3/own-order refresher, one Live display."""

    def __init__(self, options: WatchOptions, console: Console, http: httpx.AsyncClient,
                 redis_client: aioredis.Redis | None) -> None:
        self.options = options
        self.console = console
        self.http = http
        self.redis = redis_client
        self.state = ViewerState(connection=f"connecting to {self.url}")
        self.live: Live | None = None
        self.fatal: str | None = None

    @property
    def url(self) -> str:
        return ws_url(self.options.url, self.options.symbol, self.options.depth)

    def frame(self) -> RenderableType:
        s = self.state
        return render(s.body, s.own_ids, l3=s.l3 if self.options.l3 else None,
                      depth=self.options.depth, symbol=self.options.symbol,
                      connection=s.connection, source=self.options.url, note=s.note)

    def redraw(self) -> None:
        if self.live is not None:
            self.live.update(self.frame(), refresh=True)

    async def run(self, max_frames: int | None) -> int:
        with Live(self.frame(), console=self.console, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            self.live = live
            helper = asyncio.create_task(self._refresh_l3()) if self.options.l3 else None
            try:
                return await self._follow(max_frames)
            finally:
                if helper is not None:
                    helper.cancel()
                    await asyncio.gather(helper, return_exceptions=True)
                self.live = None

    async def _follow(self, max_frames: int | None) -> int:
        policy = Backoff(initial=0.5, factor=2.0, max_delay=10.0)
        frames = 0
        while True:
            try:
                async with ws_connect(self.url, open_timeout=self.options.timeout,
                                      ping_interval=20, ping_timeout=20, max_size=2**24,
                                      additional_headers=_auth(self.options.token)) as ws:
                    self.state.connection = None
                    self.redraw()
                    async for raw in ws:
                        self._push(raw)
                        policy.reset()
                        frames += 1
                        if max_frames is not None and frames >= max_frames:
                            return 0 if is_synced(self.state.body) else 1
                reason = "the book service closed the connection"
            except InvalidStatus as exc:
                status = exc.response.status_code
                if await self._unknown_symbol():
                    self.fatal = f"unknown symbol {self.options.symbol} (HTTP 404)"
                    return 2
                reason = f"WebSocket refused (HTTP {status})"
            except (OSError, TimeoutError, WebSocketException) as exc:
                reason = _describe(exc)
            delay = policy.next_delay()
            self.state.connection = (f"{reason}; reconnecting in {delay:.1f} s "
                                     f"(attempt {policy.attempts})")
            self.redraw()
            await asyncio.sleep(delay)

    def _push(self, raw: str | bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"synced": False, "detail": "the book service sent something that is not JSON"}
        if not isinstance(body, dict):
            body = {"synced": False, "detail": "the book service sent an unexpected body"}
        self.state.body = body
        self.state.pushes += 1
        if not is_synced(body):
            self.state.l3 = None
        self.state.changed.set()
        self.redraw()

    async def _unknown_symbol(self) -> bool:
        try:
            reply = await self.http.get(f"/book/{self.options.symbol}", params={"depth": 1})
        except httpx.HTTPError:
            return False
        return reply.status_code == 404

    async def _refresh_l3(self) -> None:
        loop = asyncio.get_running_loop()
        own_at = float("-inf")
        while True:
            await self.state.changed.wait()
            self.state.changed.clear()
            if is_synced(self.state.body):
                self.state.l3 = await _get_l3(self.http, self.options)
            if self.redis is not None and loop.time() - own_at >= self.options.own_interval:
                own_at = loop.time()
                try:
                    self.state.own_ids = await fetch_own_ids(self.redis, self.options.symbol)
                    self.state.note = None
                except (RedisError, OSError) as exc:
                    # Keep the last known set: Redis only adds the highlighting.
                    self.state.note = f"own orders not refreshed from Redis: {_describe(exc)}"
            self.redraw()
            await asyncio.sleep(self.options.l3_interval)


async def _get_l3(http: httpx.AsyncClient, options: WatchOptions) -> dict[str, Any] | None:
    try:
        reply = await http.get(f"/book/{options.symbol}/l3", params={"depth": options.depth})
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None
    data = reply.json()
    return data if isinstance(data, dict) else None


def _redis_client(url: str | None) -> aioredis.Redis | None:
    if not url:
        return None
    # A Redis Cluster when the URL names several nodes or REDIS_CLUSTER says so.
    cluster = "," in url or os.environ.get("REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
    return redis_adapter.connect(url, "viewer", timeout=2.0, decode=True, cluster=cluster)


async def watch(options: WatchOptions, console: Console | None = None, *,
                max_frames: int | None = None) -> int:
    """Follow the book live until Ctrl-C (or ``max_frames`` pushes); the exit status.

    0 when the last push was a synced book, 1 when it said NOT SYNCED, 2 when
    the symbol is unknown to the book service.
    """
    console = console or Console()
    redis_client = _redis_client(options.redis_url)
    try:
        async with httpx.AsyncClient(base_url=options.url, timeout=options.timeout) as http:
            viewer = _Viewer(options, console, http, redis_client)
            status = await viewer.run(max_frames)
            if viewer.fatal:
                console.print(Text(viewer.fatal, style="bold red"))
            return status
    finally:
        if redis_client is not None:
            await redis_client.aclose()


async def watch_once(options: WatchOptions, console: Console | None = None) -> int:
    """Print one frame from ``GET /book`` (and ``/l3``); 0 synced, 1 not synced, 2 failed."""
    console = console or Console()
    redis_client = _redis_client(options.redis_url)
    try:
        async with httpx.AsyncClient(base_url=options.url, timeout=options.timeout) as http:
            try:
                reply = await http.get(f"/book/{options.symbol}",
                                       params={"depth": options.depth})
            except httpx.HTTPError as exc:
                console.print(render(None, symbol=options.symbol, source=options.url,
                                     connection=f"cannot reach the book service "
                                                f"({_describe(exc)})"))
                return 2
            if reply.status_code == 404:
                console.print(Text(f"unknown symbol {options.symbol}: {_detail(reply)}",
                                   style="bold red"))
                return 2
            if reply.status_code == 200:
                body: dict[str, Any] = reply.json()
            else:
                body = {"symbol": options.symbol, "synced": False,
                        "detail": f"HTTP {reply.status_code}: {_detail(reply)}"}
            l3 = await _get_l3(http, options) if options.l3 and is_synced(body) else None
            own: frozenset[str] = frozenset()
            if redis_client is not None and options.l3:
                try:
                    own = await fetch_own_ids(redis_client, options.symbol)
                except (RedisError, OSError) as exc:
                    console.print(Text(f"own orders not read from Redis: {_describe(exc)}",
                                       style="dim"))
            console.print(render(body, own, l3=l3 if options.l3 else None, depth=options.depth,
                                 symbol=options.symbol, source=options.url))
            return 0 if is_synced(body) else 1
    finally:
        if redis_client is not None:
            await redis_client.aclose()


def _detail(reply: httpx.Response) -> str:
    try:
        data = reply.json()
    except ValueError:
        return reply.text[:200]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    return json.dumps(data)[:200]


# --------------------------------------------------------------------------- command line


def _symbol(text: str) -> str:
    if not (text.isalnum() and text.isupper()):
        raise argparse.ArgumentTypeError("a symbol is upper-case letters and digits, e.g. XBTUSDM")
    return text


def _depth(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("depth must be within 1..1000")
    return value


def build_parser(prog: str = "python -m kumex_l3 watch") -> argparse.ArgumentParser:
    """The ``watch`` command line."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Watch a book of the kumex-l3 book service live in the terminal.")
    parser.add_argument("symbol", type=_symbol, help="contract symbol, e.g. XBTUSDM")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"the book service (default {DEFAULT_URL})")
    parser.add_argument("--depth", type=_depth, default=12,
                        help="levels a side (default 12)")
    parser.add_argument("--l3", action="store_true",
                        help="show each level's orders in queue order, own orders highlighted")
    parser.add_argument("--redis-url", default=None,
                        help="Redis holding the own orders (default: $REDIS_URL, if set)")
    parser.add_argument("--once", action="store_true",
                        help="print one frame (from GET /book) and exit")
    parser.add_argument("--token", default=None,
                        help="the book's BOOK_API_TOKEN, for the own orders it pushes "
                             "(default: $BOOK_API_TOKEN, if set)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``kumex-watch SYMBOL [...]``: the exit status (see :func:`watch`, :func:`watch_once`)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    options = WatchOptions(symbol=args.symbol, url=args.url.rstrip("/"), depth=args.depth,
                           l3=args.l3, redis_url=args.redis_url or os.environ.get("REDIS_URL"),
                           token=args.token or os.environ.get("BOOK_API_TOKEN"))
    try:
        if args.once:
            return asyncio.run(watch_once(options))
        return asyncio.run(watch(options))
    except KeyboardInterrupt:
        return 0
