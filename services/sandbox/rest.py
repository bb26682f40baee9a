"""The sandbox's REST API: the real KuCoin Futures paths and envelopes (kumex-api.md §1-7).

Success is ``{"code": "200000", "data": ...}`` with HTTP 200; every failure is
``{"code": "...", "msg": "..."}`` with the venue's HTTP status. Bad input
never yields FastAPI's 422 or a bare 500: :func:`install_error_handlers` maps
validation errors to 400100 and anything unexpected to 500000.

Private endpoints are verified (:mod:`services.sandbox.auth`) on the exact
raw body bytes and the path as sent, query string included; orders belong to
the key's user.

:class:`ApiShell` (ASGI middleware, ``/api/...`` only) applies two faults
from :class:`~services.sandbox.faults.FaultState`: the REST error window
(every call answers 429/429000 or 500/500000, counted as ``rest_errors``) and
``rest_latency_ms``, waited *after* the handler (and so the engine) has acted
and before the reply is sent, so that the L3 push overtakes the REST reply as
on the real venue.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.sandbox.auth import AuthRefused, AuthResult, verify
from services.sandbox.engine import EngineOrder, OrderRequest, RejectError
from services.sandbox.exchange import Exchange
from services.sandbox.stops import STOP_DIRECTIONS, STOP_PRICE_TYPES, StopOrder, StopSpec

__all__ = [
    "CODE_INTERNAL",
    "CODE_INVALID_PARAMETER",
    "CODE_OK",
    "CODE_RATE_LIMITED",
    "ApiRefusal",
    "ApiShell",
    "api_router",
    "error_response",
    "install_error_handlers",
    "ok",
    "parse_order",
]

CODE_OK: Final = "200000"
CODE_INVALID_PARAMETER: Final = "400100"
CODE_RATE_LIMITED: Final = "429000"
CODE_INTERNAL: Final = "500000"

_ERROR_CODES: Final = {429: CODE_RATE_LIMITED, 500: CODE_INTERNAL}
_CLIENT_OID: Final = re.compile(r"[A-Za-z0-9_-]{1,40}")
_INTEGER: Final = re.compile(r"[+]?[0-9]+")
_MAX_PAGE_SIZE: Final = 1000
_DEFAULT_PAGE_SIZE: Final = 50


class ApiRefusal(Exception):
    """A request the API refuses: ``code``, ``msg``, ``http_status``."""

    def __init__(self, code: str, msg: str, http_status: int = 400) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status


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


def _invalid(msg: str) -> ApiRefusal:
    return ApiRefusal(CODE_INVALID_PARAMETER, msg)


def ok(data: Any) -> JSONResponse:
    """The success envelope."""
    return JSONResponse({"code": CODE_OK, "data": data})


def error_response(code: str, msg: str, http_status: int) -> JSONResponse:
    """The failure envelope."""
    return JSONResponse({"code": code, "msg": msg}, status_code=http_status)


# ---------------------------------------------------------------------- error handlers


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the venue's envelope: never a 422, never a bare 500."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, (ApiRefusal, RejectError, AuthRefused))
        return error_response(exc.code, exc.msg, exc.http_status)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        detail = "invalid parameter"
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
            detail = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))
        return error_response(CODE_INVALID_PARAMETER, detail, 400)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        msg = "Url Not Found" if status == 404 else str(exc.detail)
        response = error_response(f"{status}000", msg, status)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(CODE_INTERNAL, "Internal Server Error", 500)

    for kind in (ApiRefusal, RejectError, AuthRefused):
        app.add_exception_handler(kind, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


# ---------------------------------------------------------------------- ASGI shell


class ApiShell:
    """ASGI middleware for ``/api/...``: the REST error fault and the REST latency."""

    def __init__(self, app: ASGIApp, exchange: Exchange) -> None:
        self.app = app
        self.exchange = exchange

    async def _latency(self) -> None:
        delay = self.exchange.faults.rest_latency_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/api/"):
            await self.app(scope, receive, send)
            return
        faults = self.exchange.faults
        now = time.monotonic()
        status = faults.rest_error_active(now)
        if status is not None:
            faults.counts["rest_errors"] += 1
            await self._latency()
            code = _ERROR_CODES.get(status, CODE_INTERNAL)
            msg = "Too Many Requests" if status == 429 else "Internal Server Error"
            response = error_response(code, msg, status)
            if status == 429:  # as a rate limit does: when to come back
                response.headers["Retry-After"] = str(
                    max(1, math.ceil(faults.rest_error_until - now)))
            await response(scope, receive, send)
            return

        async def delayed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                await self._latency()
            await send(message)

        await self.app(scope, receive, delayed_send)


# ---------------------------------------------------------------------- order parsing


def _text(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _invalid(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string")
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _invalid(f"{name} must be true or false")


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _invalid(f"{name} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return int(value)
        raise _invalid(f"{name} must be an integer")
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise _invalid(f"{name} must be an integer")


def _number_text(body: Mapping[str, Any], name: str) -> str | None:
    """A positive-number field as text (JSON number or numeric string)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise _invalid(f"{name} must be a number")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise _invalid(f"{name} must be a number") from None
    if not number.is_finite():
        raise _invalid(f"{name} must be a number")
    return str(value).strip()


def _stop_spec(body: Mapping[str, Any]) -> StopSpec | None:
    """The stop fields of an order body (None: an ordinary order), their format checked.

    Clients send ``"stop": ""``, ``"stopPrice": 0`` and ``"stopPriceType": ""`` with
    ordinary orders (the venue's own example does): empty means absent. A stop price
    or type without ``stop`` is refused rather than silently dropped.
    """
    stop = _text(body, "stop") or None
    price_type = _text(body, "stopPriceType") or None
    price_text = _number_text(body, "stopPrice")
    if price_text is not None and Decimal(price_text) == 0:
        price_text = None
    if stop is None:
        if price_type is not None or price_text is not None:
            raise _invalid("stopPrice and stopPriceType need stop (down or up)")
        return None
    if stop not in STOP_DIRECTIONS:
        raise _invalid("stop must be down or up")
    if price_type is None:
        raise _invalid("stopPriceType is required with stop")
    if price_type not in STOP_PRICE_TYPES:
        raise _invalid("stopPriceType must be TP, MP or IP")
    if price_type != "TP":
        raise _invalid(f"stopPriceType {price_type} ({STOP_PRICE_TYPES[price_type]}) is not "
                       "supported by the sandbox: use TP (last trade price)")
    if price_text is None:
        raise _invalid("stopPrice is required with stop")
    return StopSpec(stop, Decimal(price_text), price_type)


def parse_order(raw: bytes, user_id: str) -> tuple[str, OrderRequest, StopSpec | None]:
    """The symbol, engine request and stop (None: not a stop order) of a
    ``POST /api/v1/orders`` body, or :class:`ApiRefusal`.

    Numbers may come as JSON numbers or strings (clients send both); JSON
    numbers are read as :class:`~decimal.Decimal`, never through a float.
    """
    try:
        body = json.loads(raw, parse_float=Decimal) if raw.strip() else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    client_oid = _text(body, "clientOid", required=True)
    assert client_oid is not None
    if not _CLIENT_OID.fullmatch(client_oid):
        raise _invalid("clientOid must be 1 to 40 characters of [A-Za-z0-9_-]")
    side = _text(body, "side", required=True)
    if side not in ("buy", "sell"):
        raise _invalid("side must be buy or sell")
    symbol = _text(body, "symbol", required=True)
    assert symbol is not None
    leverage = _number_text(body, "leverage")
    if leverage is None:
        raise _invalid("leverage is required")
    order_type = _text(body, "type") or "limit"
    if order_type not in ("limit", "market"):
        raise _invalid("type must be limit or market")
    stop = _stop_spec(body)
    price_text = _number_text(body, "price")
    price: Decimal | None = None
    if price_text is not None:
        price = Decimal(price_text)
    elif order_type == "limit":
        raise _invalid("price is required for limit orders")
    size = _integer(body, "size")
    if size is None:
        raise _invalid("size is required")
    if size <= 0:
        raise _invalid("size must be a positive integer")
    time_in_force = _text(body, "timeInForce") or "GTC"
    if time_in_force not in ("GTC", "IOC"):
        raise _invalid("timeInForce must be GTC or IOC")
    remark = _text(body, "remark")
    request = OrderRequest(
        user_id=user_id,
        client_oid=client_oid,
        side=side,
        type=order_type,
        price=price if order_type == "limit" else None,
        size=size,
        time_in_force=time_in_force,
        post_only=_flag(body, "postOnly"),
        hidden=_flag(body, "hidden"),
        iceberg=_flag(body, "iceberg"),
        visible_size=_integer(body, "visibleSize"),
        reduce_only=_flag(body, "reduceOnly"),
        close_order=_flag(body, "closeOrder"),
        leverage=leverage,
        remark=remark,
    )
    return symbol, request, stop


T = TypeVar("T")


def _side_and_type(query: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The optional ``side`` and ``type`` filters of a listing, checked."""
    side = query.get("side") or None
    if side is not None and side not in ("buy", "sell"):
        raise _invalid("side must be buy or sell")
    order_type = query.get("type") or None
    if order_type is not None and order_type not in ("limit", "market"):
        raise _invalid("type must be limit or market")
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
        raise _invalid(f"{name} must be a time in milliseconds")
    return int(text)


def _page(query: Mapping[str, str], name: str, default: int, upper: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not _INTEGER.fullmatch(text):
        raise _invalid(f"{name} must be an integer")
    value = int(text)
    if not 1 <= value <= upper:
        raise _invalid(f"{name} must be between 1 and {upper}")
    return value


# ---------------------------------------------------------------------- the router


def api_router(exchange: Exchange) -> APIRouter:
    """Every ``/api/...`` endpoint of the sandbox, bound to ``exchange``."""
    router = APIRouter()
    settings = exchange.settings

    async def authenticate(request: Request) -> AuthResult:
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

    def symbol_param(request: Request, *, required: bool) -> str | None:
        symbol = request.query_params.get("symbol")
        if not symbol:
            if required:
                raise _invalid("symbol is required")
            return None
        exchange.contract(symbol)
        return symbol

    def order_data(order: EngineOrder | StopOrder) -> dict[str, Any]:
        return exchange.order_api(order)

    def bullet(request: Request, user_id: str | None = None) -> dict[str, Any]:
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

    # -- public --------------------------------------------------------------

    @router.get("/api/v1/timestamp")
    async def timestamp() -> JSONResponse:
        return ok(time.time_ns() // 1_000_000)

    @router.get("/api/v1/status")
    async def status() -> JSONResponse:
        return ok({"status": "open", "msg": "sandbox exchange"})

    @router.get("/api/v1/contracts/active")
    async def contracts_active() -> JSONResponse:
        return ok([_contract_data(exchange, s) for s in exchange.contracts])

    @router.get("/api/v1/contracts/{symbol}")
    async def contract_detail(symbol: str) -> JSONResponse:
        exchange.contract(symbol, http_status=404)
        return ok(_contract_data(exchange, symbol))

    @router.post("/api/v1/bullet-public")
    async def bullet_public(request: Request) -> JSONResponse:
        return ok(bullet(request))

    @router.post("/api/v1/bullet-private")
    async def bullet_private(request: Request) -> JSONResponse:
        auth = await authenticate(request)
        return ok(bullet(request, auth.user_id))

    @router.get("/api/v2/level3/snapshot")
    async def level3_snapshot(request: Request) -> JSONResponse:
        return l3_snapshot(request, exchange.snapshot)

    @router.get("/api/v1/level3/snapshot")
    async def level3_snapshot_v1(request: Request) -> JSONResponse:
        return l3_snapshot(request, exchange.snapshot_v1)

    def l3_snapshot(request: Request, build: Callable[[str], dict[str, Any]]) -> JSONResponse:
        """An L3 snapshot, both versions under one limit per client (kumex-api.md §5)."""
        symbol = request.query_params.get("symbol")
        if not symbol:
            raise _invalid("symbol is required")
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

    def market_symbol(request: Request) -> str:
        symbol = request.query_params.get("symbol")
        if not symbol:
            raise _invalid("symbol is required")
        exchange.check_market_symbol(symbol)
        return symbol

    # Market data beyond L3, in the venue's shapes (docs.kumex.com: "Get Real-Time Ticker",
    # "Get Full Order Book - Level 2", "Transaction History"; README, "The sandbox exchange").

    @router.get("/api/v1/ticker")
    async def ticker(request: Request) -> JSONResponse:
        return ok(exchange.ticker(market_symbol(request)))

    @router.get("/api/v1/mark-price/{symbol}/current")
    async def current_mark_price(symbol: str) -> JSONResponse:
        """docs.kumex.com, "Get Current Mark Price": the sandbox's mark is the mid of the
        engine's book on the tick, computed at each call; its index is the same price."""
        exchange.contract(symbol, http_status=404)
        mark = exchange.mark_price(symbol)
        value = None if mark is None else float(mark)
        return ok({"symbol": symbol, "granularity": 1000,
                   "timePoint": time.time_ns() // 1_000_000, "value": value,
                   "indexPrice": value})

    @router.get("/api/v1/level2/snapshot")
    async def level2_snapshot(request: Request) -> JSONResponse:
        return ok(exchange.level2(market_symbol(request)))

    @router.get("/api/v1/trade/history")
    async def trade_history(request: Request) -> JSONResponse:
        return ok(exchange.trade_history(market_symbol(request)))

    # -- private: orders ---------------------------------------------------------

    @router.post("/api/v1/orders")
    async def place_order(request: Request) -> JSONResponse:
        """docs.kumex.com, "Place an Order": stop orders too (``stop``, ``stopPrice``,
        ``stopPriceType`` TP), held off the book until the last trade reaches them."""
        auth = await authenticate(request)
        symbol, order_request, stop = parse_order(await request.body(), auth.user_id)
        exchange.contract(symbol)
        order_id, client_oid = exchange.submit(symbol, order_request, stop)
        return ok({"orderId": order_id, "clientOid": client_oid})

    @router.post("/api/v1/orders/test")
    async def place_order_test(request: Request) -> JSONResponse:
        """KuCoin's "Place Order Test": the body, checks and reply of ``POST
        /api/v1/orders`` (every refusal the same), but nothing enters the engine."""
        auth = await authenticate(request)
        symbol, order_request, stop = parse_order(await request.body(), auth.user_id)
        exchange.contract(symbol)
        return ok(exchange.check_order(symbol, order_request, stop))

    @router.get("/api/v1/orders/byClientOid")
    async def order_by_client_oid(request: Request) -> JSONResponse:
        auth = await authenticate(request)
        client_oid = request.query_params.get("clientOid")
        if not client_oid:
            raise _invalid("clientOid is required")
        symbol = symbol_param(request, required=False)
        order = exchange.order_by_client_oid(auth.user_id, client_oid, symbol)
        if order is None:
            raise RejectError(
                "100004", f"order with clientOid {client_oid} does not exist", http_status=404
            )
        return ok(order_data(order))

    @router.get("/api/v1/orders/{order_id}")
    async def get_order(order_id: str, request: Request) -> JSONResponse:
        auth = await authenticate(request)
        order = exchange.order_of(auth.user_id, order_id)
        if order is None:
            raise RejectError("100004", f"order {order_id} does not exist", http_status=404)
        return ok(order_data(order))

    @router.get("/api/v1/orders")
    async def list_orders(request: Request) -> JSONResponse:
        auth = await authenticate(request)
        query = request.query_params
        status = query.get("status") or "done"
        if status not in ("active", "done"):
            raise _invalid("status must be active or done")
        symbol = symbol_param(request, required=False)
        side, order_type = _side_and_type(query)
        orders = [
            o
            for o in exchange.order_list(auth.user_id, active=status == "active", symbol=symbol)
            if (side is None or o.side == side) and (order_type is None or o.type == order_type)
        ]
        return ok(_paged(query, orders, order_data))

    @router.get("/api/v1/stopOrders")
    async def stop_orders(request: Request) -> JSONResponse:
        """docs.kumex.com, "Get Untriggered Stop Order List": newest first, by page."""
        auth = await authenticate(request)
        query = request.query_params
        symbol = symbol_param(request, required=False)
        side, order_type = _side_and_type(query)
        held = [s for s in exchange.stop_orders(auth.user_id, symbol)
                if (side is None or s.side == side)
                and (order_type is None or s.type == order_type)]
        return ok(_paged(query, held, order_data))

    @router.delete("/api/v1/stopOrders")
    async def cancel_stop_orders(request: Request) -> JSONResponse:
        """docs.kumex.com, "Stop Order Mass Cancelation": every untriggered stop order (of
        ``symbol``, when given)."""
        auth = await authenticate(request)
        symbol = symbol_param(request, required=False)
        return ok({"cancelledOrderIds": exchange.cancel_stops(auth.user_id, symbol)})

    @router.get("/api/v1/account-overview")
    async def account_overview(request: Request) -> JSONResponse:
        """docs.kumex.com, "Get Account Overview" (services.sandbox.account): ``currency``
        XBT by default."""
        auth = await authenticate(request)
        currency = request.query_params.get("currency") or "XBT"
        return ok(exchange.account_overview(auth.user_id, currency))

    @router.get("/api/v1/fills")
    async def fills(request: Request) -> JSONResponse:
        """docs.kumex.com, "Get Fills": the account's fills, newest first, by page."""
        auth = await authenticate(request)
        query = request.query_params
        symbol = symbol_param(request, required=False)
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
    async def position(request: Request) -> JSONResponse:
        """docs.kumex.com, "Get Position Details" (the fields services.sandbox.positions
        models)."""
        auth = await authenticate(request)
        symbol = symbol_param(request, required=True)
        (data,) = exchange.positions(auth.user_id, symbol)
        return ok(data)

    @router.get("/api/v1/positions")
    async def positions(request: Request) -> JSONResponse:
        """docs.kumex.com, "Get Position List": every contract the account traded."""
        auth = await authenticate(request)
        return ok(exchange.positions(auth.user_id))

    @router.get("/api/v1/recentFills")
    async def recent_fills(request: Request) -> JSONResponse:
        """docs.kumex.com, "Recent Fills": the last 24 hours' fills, newest first."""
        auth = await authenticate(request)
        since_ns = time.time_ns() - 24 * 3600 * 10**9
        return ok([f for f in exchange.fills(auth.user_id) if f["tradeTime"] >= since_ns])

    @router.delete("/api/v1/orders/client-order/{client_oid}")
    async def cancel_by_client_oid(client_oid: str, request: Request) -> JSONResponse:
        auth = await authenticate(request)
        symbol = symbol_param(request, required=False)
        return ok({"clientOid": exchange.cancel_order_by_client_oid(auth.user_id, client_oid,
                                                                    symbol)})

    @router.delete("/api/v1/orders/{order_id}")
    async def cancel_order(order_id: str, request: Request) -> JSONResponse:
        auth = await authenticate(request)
        return ok({"cancelledOrderIds": exchange.cancel_order(auth.user_id, order_id)})

    @router.delete("/api/v1/orders")
    async def cancel_all(request: Request) -> JSONResponse:
        auth = await authenticate(request)
        symbol = symbol_param(request, required=False)
        return ok({"cancelledOrderIds": exchange.cancel_all(auth.user_id, symbol)})

    return router


def _contract_data(exchange: Exchange, symbol: str) -> dict[str, Any]:
    mark = exchange.mark_price(symbol)
    return exchange.contracts[symbol].to_api(mark_price=mark, index_price=mark)
