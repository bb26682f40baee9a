"""The sandbox's REST API shell: envelopes, errors, faults and order parsing (kumex-api.md §1-7).

The routes themselves are in :mod:`services.sandbox.api`.

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
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final, cast

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.sandbox.auth import AuthRefused
from services.sandbox.engine import OrderRequest, RejectError
from services.sandbox.exchange import Exchange
from services.sandbox.stops import STOP_DIRECTIONS, STOP_PRICE_TYPES, StopSpec

__all__ = [
    "CODE_INTERNAL",
    "CODE_INVALID_PARAMETER",
    "CODE_OK",
    "CODE_RATE_LIMITED",
    "INTEGER",
    "ApiRefusal",
    "ApiShell",
    "ExchangeDep",
    "error_response",
    "install_error_handlers",
    "invalid",
    "ok",
    "parse_order",
]

CODE_OK: Final = "200000"
CODE_INVALID_PARAMETER: Final = "400100"
CODE_RATE_LIMITED: Final = "429000"
CODE_INTERNAL: Final = "500000"

_ERROR_CODES: Final = {429: CODE_RATE_LIMITED, 500: CODE_INTERNAL}
_CLIENT_OID: Final = re.compile(r"[A-Za-z0-9_-]{1,40}")
INTEGER: Final = re.compile(r"[+]?[0-9]+")
_MAX_PAGE_SIZE: Final = 1000
_DEFAULT_PAGE_SIZE: Final = 50


class ApiRefusal(Exception):
    """A request the API refuses: ``code``, ``msg``, ``http_status``."""

    def __init__(self, code: str, msg: str, http_status: int = 400) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status


def _exchange(request: Request) -> Exchange:
    return cast(Exchange, request.app.state.exchange)


#: A route's dependency on the app's :class:`~services.sandbox.exchange.Exchange`
#: (``app.state.exchange``, set by :func:`services.sandbox.app.create_app`).
ExchangeDep = Annotated[Exchange, Depends(_exchange)]


def invalid(msg: str) -> ApiRefusal:
    """A 400100 refusal saying ``msg``."""
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
            raise invalid(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string")
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise invalid(f"{name} must be true or false")


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise invalid(f"{name} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return int(value)
        raise invalid(f"{name} must be an integer")
    if isinstance(value, str) and INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise invalid(f"{name} must be an integer")


def _number_text(body: Mapping[str, Any], name: str) -> str | None:
    """A positive-number field as text (JSON number or numeric string)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise invalid(f"{name} must be a number")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise invalid(f"{name} must be a number") from None
    if not number.is_finite():
        raise invalid(f"{name} must be a number")
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
            raise invalid("stopPrice and stopPriceType need stop (down or up)")
        return None
    if stop not in STOP_DIRECTIONS:
        raise invalid("stop must be down or up")
    if price_type is None:
        raise invalid("stopPriceType is required with stop")
    if price_type not in STOP_PRICE_TYPES:
        raise invalid("stopPriceType must be TP, MP or IP")
    if price_type != "TP":
        raise invalid(f"stopPriceType {price_type} ({STOP_PRICE_TYPES[price_type]}) is not "
                       "supported by the sandbox: use TP (last trade price)")
    if price_text is None:
        raise invalid("stopPrice is required with stop")
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
        raise invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    client_oid = _text(body, "clientOid", required=True)
    assert client_oid is not None
    if not _CLIENT_OID.fullmatch(client_oid):
        raise invalid("clientOid must be 1 to 40 characters of [A-Za-z0-9_-]")
    side = _text(body, "side", required=True)
    if side not in ("buy", "sell"):
        raise invalid("side must be buy or sell")
    symbol = _text(body, "symbol", required=True)
    assert symbol is not None
    leverage = _number_text(body, "leverage")
    if leverage is None:
        raise invalid("leverage is required")
    order_type = _text(body, "type") or "limit"
    if order_type not in ("limit", "market"):
        raise invalid("type must be limit or market")
    stop = _stop_spec(body)
    price_text = _number_text(body, "price")
    price: Decimal | None = None
    if price_text is not None:
        price = Decimal(price_text)
    elif order_type == "limit":
        raise invalid("price is required for limit orders")
    size = _integer(body, "size")
    if size is None:
        raise invalid("size is required")
    if size <= 0:
        raise invalid("size must be a positive integer")
    time_in_force = _text(body, "timeInForce") or "GTC"
    if time_in_force not in ("GTC", "IOC"):
        raise invalid("timeInForce must be GTC or IOC")
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
