"""The sandbox's REST routes: every ``/api/...`` endpoint (kumex-api.md §1-7).

The routes are declared once, at module level, and find the
:class:`~services.sandbox.exchange.Exchange` they serve through a FastAPI
dependency (``app.state.exchange``, set by :func:`services.sandbox.app.create_app`);
private routes take the verified key's :class:`~services.sandbox.auth.AuthResult`
as a dependency too, resolved before their body runs. The envelopes, the error
mapping and the order parsing are in :mod:`services.sandbox.rest`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from services.sandbox.auth import AuthResult, verify
from services.sandbox.engine import EngineOrder, RejectError
from services.sandbox.exchange import Exchange
from services.sandbox.rest import (
    CODE_INTERNAL,
    CODE_RATE_LIMITED,
    INTEGER,
    ApiRefusal,
    ExchangeDep,
    error_response,
    invalid,
    ok,
    parse_order,
)
from services.sandbox.stops import StopOrder

__all__ = ["router"]

_MAX_PAGE_SIZE: Final = 1000
_DEFAULT_PAGE_SIZE: Final = 50

router = APIRouter()


# ---------------------------------------------------------------------- dependencies


def _decoded_spelling(path: str, query: str) -> tuple[str, ...]:
    """The percent-decoded spelling of a request's path and query, when it means the same.

    Clients sign the path before their HTTP library quotes it, so a signature
    over the decoded spelling is accepted too, but only when the decoded query
    parses to the very parameters the request carries: ``?symbol%3DXBTUSDM``
    (no ``symbol`` at all, for the server) must not pass on a signature over
    ``?symbol=XBTUSDM``.
    """
    decoded_path, decoded_query = unquote(path), unquote(query)
    if (decoded_path, decoded_query) == (path, query):
        return ()
    if "?" in decoded_path or "#" in decoded_path:
        return ()
    if query and parse_qsl(decoded_query, keep_blank_values=True) != parse_qsl(
            query, keep_blank_values=True):
        return ()
    return (f"{decoded_path}?{decoded_query}" if query else decoded_path,)


async def _authenticate(request: Request, exchange: ExchangeDep) -> AuthResult:
    """The key's user, verified on the raw body and the path as sent (query included)."""
    body = await request.body()
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    path = bytes(raw_path).decode("latin-1")
    query = bytes(request.scope.get("query_string", b"")).decode("latin-1")
    full = f"{path}?{query}" if query else path
    return verify(
        request.headers,
        request.method,
        full,
        body,
        time.time_ns() // 1_000_000,
        exchange.credentials,
        alt_paths=_decoded_spelling(path, query),
    )


Auth = Annotated[AuthResult, Depends(_authenticate)]


# ---------------------------------------------------------------------- helpers


def _symbol_param(exchange: Exchange, request: Request, *, required: bool) -> str | None:
    symbol = request.query_params.get("symbol")
    if not symbol:
        if required:
            raise invalid("symbol is required")
        return None
    exchange.contract(symbol)
    return symbol


def _market_symbol(exchange: Exchange, request: Request) -> str:
    symbol = request.query_params.get("symbol")
    if not symbol:
        raise invalid("symbol is required")
    exchange.check_market_symbol(symbol)
    return symbol


def _bullet(exchange: Exchange, request: Request, user_id: str | None = None) -> dict[str, Any]:
    settings = exchange.settings
    endpoint = settings.public_url
    if endpoint is None:
        host = request.headers.get("host")
        if host:
            scheme = "wss" if request.url.scheme in ("https", "wss") else "ws"
            endpoint = f"{scheme}://{host}/endpoint"
        else:
            endpoint = settings.ws_endpoint
    return {
        "token": exchange.hub.issue_token(user_id),
        "instanceServers": [
            {
                "endpoint": endpoint,
                "encrypt": endpoint.startswith("wss://"),
                "protocol": "websocket",
                "pingInterval": settings.ws_ping_interval_ms,
                "pingTimeout": settings.ws_ping_timeout_ms,
            }
        ],
    }


def _l3_snapshot(exchange: Exchange, request: Request,
                 build: Callable[[str], dict[str, Any]]) -> JSONResponse:
    """An L3 snapshot, both versions under one limit per client (kumex-api.md §5)."""
    symbol = request.query_params.get("symbol")
    if not symbol:
        raise invalid("symbol is required")
    exchange.check_market_symbol(symbol)
    faults = exchange.faults
    if faults.refuse_snapshots:
        faults.counts["snapshots_refused"] += 1
        raise ApiRefusal(CODE_INTERNAL, "Internal Server Error", 500)
    client = request.client.host if request.client else "unknown"
    rate = faults.snapshot_rate_per_min
    now = time.monotonic()
    if not exchange.snapshot_limiter.allow(client, rate, now):
        faults.counts["snapshots_rate_limited"] += 1
        wait = exchange.snapshot_limiter.retry_after(client, rate, now)
        response = error_response(CODE_RATE_LIMITED, "Too Many Requests", 429)
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
    faults.counts["snapshots_served"] += 1
    return ok(build(symbol))


def _contract_data(exchange: Exchange, symbol: str) -> dict[str, Any]:
    mark = exchange.mark_price(symbol)
    return exchange.contracts[symbol].to_api(mark_price=mark, index_price=mark)


T = TypeVar("T")


def _side_and_type(query: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The optional ``side`` and ``type`` filters of a listing, checked."""
    side = query.get("side") or None
    if side is not None and side not in ("buy", "sell"):
        raise invalid("side must be buy or sell")
    order_type = query.get("type") or None
    if order_type is not None and order_type not in ("limit", "market"):
        raise invalid("type must be limit or market")
    return side, order_type


def _paged(query: Mapping[str, str], items: Sequence[T],
           show: Callable[[T], Any] = lambda item: item) -> dict[str, Any]:
    """The page ``currentPage``/``pageSize`` asks for of ``items`` in the venue's shape
    (only the page's items go through ``show``)."""
    page = _page(query, "currentPage", 1, 1_000_000)
    size = _page(query, "pageSize", _DEFAULT_PAGE_SIZE, _MAX_PAGE_SIZE)
    start = (page - 1) * size
    return {"currentPage": page, "pageSize": size, "totalNum": len(items),
            "totalPage": math.ceil(len(items) / size),
            "items": [show(item) for item in items[start:start + size]]}


def _ms_param(query: Mapping[str, str], name: str) -> int | None:
    """An optional time parameter in Unix milliseconds."""
    text = query.get(name)
    if not text:
        return None
    if not text.isdigit():
        raise invalid(f"{name} must be a time in milliseconds")
    return int(text)


def _page(query: Mapping[str, str], name: str, default: int, upper: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not INTEGER.fullmatch(text):
        raise invalid(f"{name} must be an integer")
    value = int(text)
    if not 1 <= value <= upper:
        raise invalid(f"{name} must be between 1 and {upper}")
    return value

# ---------------------------------------------------------------------- public


@router.get("/api/v1/timestamp")
async def timestamp() -> JSONResponse:
    return ok(time.time_ns() // 1_000_000)


@router.get("/api/v1/status")
async def status() -> JSONResponse:
    return ok({"status": "open", "msg": "sandbox exchange"})


@router.get("/api/v1/contracts/active")
async def contracts_active(exchange: ExchangeDep) -> JSONResponse:
    return ok([_contract_data(exchange, s) for s in exchange.contracts])


@router.get("/api/v1/contracts/{symbol}")
async def contract_detail(symbol: str, exchange: ExchangeDep) -> JSONResponse:
    exchange.contract(symbol, http_status=404)
    return ok(_contract_data(exchange, symbol))


@router.post("/api/v1/bullet-public")
async def bullet_public(request: Request, exchange: ExchangeDep) -> JSONResponse:
    return ok(_bullet(exchange, request))


@router.post("/api/v1/bullet-private")
async def bullet_private(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    return ok(_bullet(exchange, request, auth.user_id))


@router.get("/api/v2/level3/snapshot")
async def level3_snapshot(request: Request, exchange: ExchangeDep) -> JSONResponse:
    return _l3_snapshot(exchange, request, exchange.snapshot)


@router.get("/api/v1/level3/snapshot")
async def level3_snapshot_v1(request: Request, exchange: ExchangeDep) -> JSONResponse:
    return _l3_snapshot(exchange, request, exchange.snapshot_v1)


# Market data beyond L3, in the venue's shapes (docs.kumex.com: "Get Real-Time Ticker",
# "Get Full Order Book - Level 2", "Transaction History"; README, "The sandbox exchange").


@router.get("/api/v1/ticker")
async def ticker(request: Request, exchange: ExchangeDep) -> JSONResponse:
    return ok(exchange.ticker(_market_symbol(exchange, request)))


@router.get("/api/v1/mark-price/{symbol}/current")
async def current_mark_price(symbol: str, exchange: ExchangeDep) -> JSONResponse:
    """docs.kumex.com, "Get Current Mark Price": the sandbox's mark is the mid of the
    engine's book on the tick, computed at each call; its index is the same price."""
    exchange.contract(symbol, http_status=404)
    mark = exchange.mark_price(symbol)
    value = None if mark is None else float(mark)
    return ok({"symbol": symbol, "granularity": 1000,
               "timePoint": time.time_ns() // 1_000_000, "value": value,
               "indexPrice": value})


@router.get("/api/v1/level2/snapshot")
async def level2_snapshot(request: Request, exchange: ExchangeDep) -> JSONResponse:
    return ok(exchange.level2(_market_symbol(exchange, request)))


@router.get("/api/v1/trade/history")
async def trade_history(request: Request, exchange: ExchangeDep) -> JSONResponse:
    return ok(exchange.trade_history(_market_symbol(exchange, request)))


# ---------------------------------------------------------------------- private: orders


@router.post("/api/v1/orders")
async def place_order(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Place an Order": stop orders too (``stop``, ``stopPrice``,
    ``stopPriceType`` TP), held off the book until the last trade reaches them."""
    symbol, order_request, stop = parse_order(await request.body(), auth.user_id)
    exchange.contract(symbol)
    order_id, client_oid = exchange.submit(symbol, order_request, stop)
    return ok({"orderId": order_id, "clientOid": client_oid})


@router.post("/api/v1/orders/test")
async def place_order_test(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    """KuCoin's "Place Order Test": the body, checks and reply of ``POST
    /api/v1/orders`` (every refusal the same), but nothing enters the engine."""
    symbol, order_request, stop = parse_order(await request.body(), auth.user_id)
    exchange.contract(symbol)
    return ok(exchange.check_order(symbol, order_request, stop))


@router.get("/api/v1/orders/byClientOid")
async def order_by_client_oid(request: Request, exchange: ExchangeDep,
                              auth: Auth) -> JSONResponse:
    client_oid = request.query_params.get("clientOid")
    if not client_oid:
        raise invalid("clientOid is required")
    symbol = _symbol_param(exchange, request, required=False)
    order = exchange.order_by_client_oid(auth.user_id, client_oid, symbol)
    if order is None:
        raise RejectError(
            "100004", f"order with clientOid {client_oid} does not exist", http_status=404
        )
    return ok(exchange.order_api(order))


@router.get("/api/v1/orders/{order_id}")
async def get_order(order_id: str, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    order = exchange.order_of(auth.user_id, order_id)
    if order is None:
        raise RejectError("100004", f"order {order_id} does not exist", http_status=404)
    return ok(exchange.order_api(order))


@router.get("/api/v1/orders")
async def list_orders(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    query = request.query_params
    status = query.get("status") or "done"
    if status not in ("active", "done"):
        raise invalid("status must be active or done")
    symbol = _symbol_param(exchange, request, required=False)
    side, order_type = _side_and_type(query)
    orders: list[EngineOrder | StopOrder] = [
        o
        for o in exchange.order_list(auth.user_id, active=status == "active", symbol=symbol)
        if (side is None or o.side == side) and (order_type is None or o.type == order_type)
    ]
    return ok(_paged(query, orders, exchange.order_api))


@router.get("/api/v1/stopOrders")
async def stop_orders(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Get Untriggered Stop Order List": newest first, by page."""
    query = request.query_params
    symbol = _symbol_param(exchange, request, required=False)
    side, order_type = _side_and_type(query)
    held: list[EngineOrder | StopOrder] = [
        s for s in exchange.stop_orders(auth.user_id, symbol)
        if (side is None or s.side == side) and (order_type is None or s.type == order_type)]
    return ok(_paged(query, held, exchange.order_api))


@router.delete("/api/v1/stopOrders")
async def cancel_stop_orders(request: Request, exchange: ExchangeDep,
                             auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Stop Order Mass Cancelation": every untriggered stop order (of
    ``symbol``, when given)."""
    symbol = _symbol_param(exchange, request, required=False)
    return ok({"cancelledOrderIds": exchange.cancel_stops(auth.user_id, symbol)})


@router.get("/api/v1/account-overview")
async def account_overview(request: Request, exchange: ExchangeDep,
                           auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Get Account Overview" (services.sandbox.account): ``currency``
    XBT by default."""
    currency = request.query_params.get("currency") or "XBT"
    return ok(exchange.account_overview(auth.user_id, currency))


@router.get("/api/v1/fills")
async def fills(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Get Fills": the account's fills, newest first, by page."""
    query = request.query_params
    symbol = _symbol_param(exchange, request, required=False)
    order_id = query.get("orderId") or None
    side, order_type = _side_and_type(query)
    start_at, end_at = _ms_param(query, "startAt"), _ms_param(query, "endAt")
    items = [f for f in exchange.fills(auth.user_id, symbol)
             if (order_id is None or f["orderId"] == order_id)
             and (side is None or f["side"] == side)
             and (order_type is None or f["orderType"] == order_type)
             and (start_at is None or f["tradeTime"] // 1_000_000 >= start_at)
             and (end_at is None or f["tradeTime"] // 1_000_000 < end_at)]
    return ok(_paged(query, items))


@router.get("/api/v1/position")
async def position(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Get Position Details" (the fields services.sandbox.positions
    models)."""
    symbol = _symbol_param(exchange, request, required=True)
    (data,) = exchange.positions(auth.user_id, symbol)
    return ok(data)


@router.get("/api/v1/positions")
async def positions(exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Get Position List": every contract the account traded."""
    return ok(exchange.positions(auth.user_id))


@router.get("/api/v1/recentFills")
async def recent_fills(exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    """docs.kumex.com, "Recent Fills": the last 24 hours' fills, newest first."""
    since_ns = time.time_ns() - 24 * 3600 * 10**9
    return ok([f for f in exchange.fills(auth.user_id) if f["tradeTime"] >= since_ns])


@router.delete("/api/v1/orders/client-order/{client_oid}")
async def cancel_by_client_oid(client_oid: str, request: Request, exchange: ExchangeDep,
                               auth: Auth) -> JSONResponse:
    symbol = _symbol_param(exchange, request, required=False)
    return ok({"clientOid": exchange.cancel_order_by_client_oid(auth.user_id, client_oid,
                                                                symbol)})


@router.delete("/api/v1/orders/{order_id}")
async def cancel_order(order_id: str, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    return ok({"cancelledOrderIds": exchange.cancel_order(auth.user_id, order_id)})


@router.delete("/api/v1/orders")
async def cancel_all(request: Request, exchange: ExchangeDep, auth: Auth) -> JSONResponse:
    symbol = _symbol_param(exchange, request, required=False)
    return ok({"cancelledOrderIds": exchange.cancel_all(auth.user_id, symbol)})
