"""Async REST client of KuMEX / KuCoin Futures (kumex-api.md §1, §2, §5-7), over httpx.

:class:`KumexRestClient` unwraps the envelope ``{"code":"200000","data":...}``
and turns every failure into one of the errors below, in one table
(:data:`ERROR_CODES`); httpx exceptions are translated at the boundary with
``raise ... from exc``. JSON numbers are decoded as :class:`~decimal.Decimal`
(never through a float).

Errors: the :class:`~kumex_l3.errors.RestError` branch of :mod:`kumex_l3.errors`.

Every error says whether the exchange certainly did *not* act on the request
(:attr:`RestError.refused`): true for an answered error code (the venue
validates before it acts), false for a timeout or a broken connection after
the request may have gone out, and for a server error (the engine may have
acted before it failed). For an order, ``refused`` false means "outcome
unknown: ask by clientOid before sending it again".

Retries: GET and DELETE calls are retried with jittered exponential backoff
(:mod:`kumex_l3.backoff`) on rate limiting, server errors and transport
errors (:func:`should_retry`, pure). A ``POST /api/v1/orders`` is *never*
retried here: a timeout on it must not become a duplicate order; the caller
(:class:`kumex_l3.trading.Trader`) checks the order by clientOid first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final
from urllib.parse import quote, urlencode

import httpx
from pydantic import SecretStr

from kumex_l3.backoff import Backoff
from kumex_l3.errors import (
    ApiError,
    AuthError,
    CannotCancel,
    ConnectionFailed,
    DuplicateClientOid,
    InvalidParameter,
    InvalidSymbol,
    OrderNotFound,
    RateLimited,
    RequestTimeout,
    RestError,
    ServerError,
    TooManyOrders,
    TransportError,
    UnexpectedResponse,
)
from kumex_l3.signing import Credentials, signed_headers

__all__ = [
    "CODE_OK",
    "ERROR_CODES",
    "ApiError",
    "AuthError",
    "CannotCancel",
    "ConnectionFailed",
    "DuplicateClientOid",
    "ExchangeOrder",
    "InvalidParameter",
    "InvalidSymbol",
    "KumexRestClient",
    "OrderNotFound",
    "PlacedOrder",
    "RateLimited",
    "RequestTimeout",
    "RestError",
    "ServerError",
    "TooManyOrders",
    "TransportError",
    "UnexpectedResponse",
    "error_for",
    "should_retry",
]

_log = logging.getLogger(__name__)

CODE_OK: Final = "200000"
_ACTIVE_PAGE_SIZE: Final = 200
_MAX_PAGES: Final = 1000


# ---------------------------------------------------------------------- errors


#: Error code -> error class: the one table of the venue's codes (kumex-api.md §1).
ERROR_CODES: Final[Mapping[str, type[ApiError]]] = {
    "400001": AuthError,
    "400002": AuthError,
    "400003": AuthError,
    "400004": AuthError,
    "400005": AuthError,
    "400100": InvalidParameter,
    "300000": InvalidParameter,
    "300001": TooManyOrders,
    "300018": DuplicateClientOid,
    "100004": CannotCancel,
    "200003": InvalidSymbol,
    "429000": RateLimited,
    "500000": ServerError,
}


def error_for(code: str, msg: str, http_status: int, *, method: str = "", path: str = "",
              retry_after: float | None = None) -> ApiError:
    """The typed error of an exchange answer (code from the body, else the HTTP status)."""
    cls: type[ApiError] | None = ERROR_CODES.get(code)
    if cls is None and code.startswith("4000") and len(code) == 6:
        cls = AuthError
    if cls is CannotCancel and http_status == 404:
        cls = OrderNotFound
    if cls is None:
        if http_status == 401:
            cls = AuthError
        elif http_status == 429:
            cls = RateLimited
        elif http_status >= 500:
            cls = ServerError
        else:
            cls = ApiError
    if cls is RateLimited:
        return RateLimited(code, msg, http_status, method=method, path=path,
                           retry_after=retry_after)
    return cls(code, msg, http_status, method=method, path=path)


def should_retry(idempotent: bool, error: RestError) -> bool:
    """Whether a failed call may be sent again as it is (pure).

    Only idempotent calls (GET, DELETE, token requests) are retried, and only
    on rate limiting, a server error or no answer. A refusal for any other
    reason would be refused again.
    """
    if not idempotent:
        return False
    return isinstance(error, (RateLimited, ServerError, TransportError))


def _translate(exc: httpx.HTTPError, method: str, path: str) -> TransportError:
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return RequestTimeout(f"no connection in time ({type(exc).__name__})",
                              maybe_sent=False, method=method, path=path)
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(f"no answer in time ({type(exc).__name__})",
                              maybe_sent=True, method=method, path=path)
    if isinstance(exc, httpx.ConnectError):
        return ConnectionFailed(f"cannot connect ({type(exc).__name__})",
                                maybe_sent=False, method=method, path=path)
    return ConnectionFailed(f"connection failed ({type(exc).__name__}: {exc})",
                            maybe_sent=True, method=method, path=path)


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class PlacedOrder:
    """What ``POST /api/v1/orders`` answers: the engine accepted the order (its fate is on L3)."""

    order_id: str
    client_oid: str


def _int(value: Any) -> int:
    if value is None or value == "":
        return 0
    return int(Decimal(str(value)))


@dataclass(frozen=True, slots=True)
class ExchangeOrder:
    """An order as ``GET /api/v1/orders/...`` describes it (the main fields, and ``raw``)."""

    id: str
    client_oid: str
    symbol: str
    side: str
    type: str
    price: Decimal | None
    size: int
    filled_size: int
    is_active: bool
    cancel_exist: bool
    status: str
    leverage: str
    created_at: int
    updated_at: int
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> ExchangeOrder:
        """Build from the exchange's JSON object; raises ``ValueError`` on a bad one."""
        try:
            price = data.get("price")
            return cls(
                id=str(data["id"]),
                client_oid=str(data.get("clientOid") or ""),
                symbol=str(data["symbol"]),
                side=str(data["side"]),
                type=str(data.get("type") or "limit"),
                price=None if price in (None, "") else Decimal(str(price)),
                size=_int(data.get("size")),
                filled_size=_int(data.get("filledSize", data.get("dealSize"))),
                is_active=bool(data.get("isActive")),
                cancel_exist=bool(data.get("cancelExist")),
                status=str(data.get("status") or ""),
                leverage=str(data.get("leverage") or ""),
                created_at=_int(data.get("createdAt")),
                updated_at=_int(data.get("updatedAt")),
                raw=dict(data),
            )
        except (KeyError, TypeError, ArithmeticError) as exc:
            raise ValueError(f"not an order: {exc!r}") from exc

    @property
    def remaining_size(self) -> int:
        """``size - filled_size``."""
        return self.size - self.filled_size


# ---------------------------------------------------------------------- the client


def _text(value: Decimal | int | str) -> str:
    if isinstance(value, Decimal):
        return f"{value:f}"
    return str(value)


def _default_backoff() -> Backoff:
    return Backoff(initial=0.2, factor=2.0, max_delay=5.0)


class KumexRestClient:
    """Public and private REST calls; use as ``async with`` or call :meth:`aclose`.

    Credentials may be omitted for the public calls only (a private call then
    raises :class:`AuthError`). ``timeout`` is seconds per attempt;
    ``transport`` swaps httpx's transport (tests). ``retries`` bounds the
    extra attempts of an idempotent call; ``backoff`` builds the delay policy
    of one call; ``sleep`` is awaited between attempts. ``tls``: the TLS context of
    an ``https://`` venue (default: the system's CAs; kumex_l3.config.tls_context).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | SecretStr | None = None,
        api_secret: str | SecretStr | None = None,
        api_passphrase: str | SecretStr | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: int = 3,
        backoff: Callable[[], Backoff] = _default_backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock_ms: Callable[[], int] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._credentials: Credentials | None = None
        if api_key is not None or api_secret is not None or api_passphrase is not None:
            if api_key is None or api_secret is None or api_passphrase is None:
                raise ValueError("API key, secret and passphrase go together")
            self._credentials = Credentials(api_key, api_secret, api_passphrase)
        self.base_url = base_url.rstrip("/")
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        #: Milliseconds added to the local clock to get server time (see :meth:`sync_time`).
        self.clock_offset_ms = 0
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            verify=tls or True,
            follow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": "kumex-l3"},
        )

    def __repr__(self) -> str:
        key = self._credentials.key if self._credentials else None
        return f"KumexRestClient(base_url={self.base_url!r}, api_key={key!r})"

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> KumexRestClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ plumbing

    def _now_ms(self) -> int:
        return self._clock_ms() + self.clock_offset_ms

    async def _send_once(self, method: str, path: str, body: str, signed: bool) -> Any:
        headers: dict[str, str] = {}
        if body:
            headers["Content-Type"] = "application/json"
        if signed:
            if self._credentials is None:
                raise AuthError("400001", "no API credentials configured", 0,
                                method=method, path=path)
            headers.update(
                signed_headers(self._credentials, method, path, body, self._now_ms()))
        try:
            response = await self._http.request(
                method, path, content=body.encode("utf-8") if body else None, headers=headers)
        except httpx.HTTPError as exc:
            raise _translate(exc, method, path) from exc
        return self._unwrap(response, method, path)

    @staticmethod
    def _unwrap(response: httpx.Response, method: str, path: str) -> Any:
        status = response.status_code
        try:
            payload = json.loads(response.content, parse_float=Decimal)
        except ValueError as exc:
            if status >= 500:
                raise ServerError("", f"non-JSON answer: {response.reason_phrase}", status,
                                  method=method, path=path) from exc
            raise UnexpectedResponse("", f"non-JSON answer: {response.reason_phrase}",
                                     status, method=method, path=path) from exc
        code = str(payload.get("code", "")) if isinstance(payload, dict) else ""
        if code == CODE_OK and status < 400:
            return payload.get("data")
        if not code and status < 400:
            raise UnexpectedResponse("", "answer without a code", status,
                                     method=method, path=path)
        msg = str(payload.get("msg", "")) if isinstance(payload, dict) else ""
        retry_after: float | None = None
        header = response.headers.get("Retry-After")
        if header is not None:
            try:
                retry_after = max(0.0, float(header))
            except ValueError:
                retry_after = None
        raise error_for(code, msg or response.reason_phrase, status, method=method, path=path,
                        retry_after=retry_after)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json_body: Mapping[str, Any] | None = None,
        signed: bool = False,
        idempotent: bool | None = None,
    ) -> Any:
        """One call with retries; ``path`` is unquoted-safe, ``params`` become the query."""
        if params:
            path = f"{path}?{urlencode([(k, str(v)) for k, v in params.items()])}"
        body = json.dumps(json_body, separators=(",", ":")) if json_body is not None else ""
        if idempotent is None:
            idempotent = method in ("GET", "DELETE")
        policy: Backoff | None = None
        attempt = 0
        while True:
            try:
                return await self._send_once(method, path, body, signed)
            except RestError as exc:
                if attempt >= self._retries or not should_retry(idempotent, exc):
                    raise
                if policy is None:
                    policy = self._backoff()
                delay = policy.next_delay()
                if isinstance(exc, RateLimited) and exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, policy.max_delay))
                attempt += 1
                _log.debug("retrying %s %s in %.3fs after %s", method, path, delay,
                           type(exc).__name__)
                await self._sleep(delay)

    # ------------------------------------------------------------------ public

    async def timestamp(self) -> int:
        """Server time, Unix ms (``GET /api/v1/timestamp``)."""
        return int(await self._call("GET", "/api/v1/timestamp"))

    async def sync_time(self) -> int:
        """Set :attr:`clock_offset_ms` from the server's clock (half the round trip); returns it."""
        before = self._clock_ms()
        server = await self.timestamp()
        after = self._clock_ms()
        self.clock_offset_ms = server - (before + after) // 2
        return self.clock_offset_ms

    async def contracts_active(self) -> list[dict[str, Any]]:
        """Every open contract (``GET /api/v1/contracts/active``)."""
        data = await self._call("GET", "/api/v1/contracts/active")
        return list(data or [])

    async def contract(self, symbol: str) -> dict[str, Any]:
        """One contract (``GET /api/v1/contracts/{symbol}``)."""
        return dict(await self._call("GET", f"/api/v1/contracts/{quote(symbol, safe='')}"))

    async def bullet_public(self) -> dict[str, Any]:
        """A WebSocket token and servers (``POST /api/v1/bullet-public``; safe to repeat)."""
        return dict(await self._call("POST", "/api/v1/bullet-public", idempotent=True))

    async def position(self, symbol: str) -> int:
        """The account's position in ``symbol``, in contracts, + long (``currentQty`` of
        ``GET /api/v1/position``)."""
        data = await self._call("GET", "/api/v1/position", params={"symbol": symbol},
                                signed=True)
        qty = data.get("currentQty") if isinstance(data, Mapping) else None
        try:
            if isinstance(qty, bool) or not isinstance(qty, int | float | str):
                raise ValueError("no currentQty")
            value = Decimal(str(qty))
            if not value.is_finite() or value != value.to_integral_value():
                raise ValueError(f"currentQty {str(qty)[:40]!r} is not a whole number")
            return int(value)
        except (ValueError, ArithmeticError) as exc:
            raise UnexpectedResponse("", f"position of {symbol}: {exc}", 200,
                                     method="GET", path="/api/v1/position") from None

    async def bullet_private(self) -> dict[str, Any]:
        """A private WebSocket token of this key's account, and servers (``POST
        /api/v1/bullet-private``, signed; safe to repeat)."""
        return dict(await self._call("POST", "/api/v1/bullet-private", signed=True,
                                     idempotent=True))

    async def level3_snapshot(self, symbol: str) -> dict[str, Any]:
        """The L3 snapshot's ``data`` (``GET /api/v2/level3/snapshot``; rate-limited)."""
        return dict(await self._call("GET", "/api/v2/level3/snapshot",
                                     params={"symbol": symbol}))

    # ------------------------------------------------------------------ private

    async def place_order(
        self,
        *,
        client_oid: str,
        symbol: str,
        side: str,
        size: int,
        leverage: int | str | Decimal,
        price: Decimal | str | None = None,
        order_type: str = "limit",
        time_in_force: str | None = None,
        post_only: bool | None = None,
        hidden: bool | None = None,
        reduce_only: bool | None = None,
        close_order: bool | None = None,
        remark: str | None = None,
    ) -> PlacedOrder:
        """``POST /api/v1/orders``. Sent once, never retried (see the module docstring).

        A 200 only means the engine accepted the order; its fate is on the L3
        stream. On :class:`RequestTimeout` (or any error whose ``refused`` is
        false) the order may exist: look it up by clientOid before re-sending.
        """
        body: dict[str, Any] = {
            "clientOid": client_oid,
            "side": side,
            "symbol": symbol,
            "type": order_type,
            "leverage": _text(leverage),
            "size": int(size),
        }
        if price is not None:
            body["price"] = _text(price)
        optional: dict[str, Any] = {
            "timeInForce": time_in_force,
            "postOnly": post_only,
            "hidden": hidden,
            "reduceOnly": reduce_only,
            "closeOrder": close_order,
            "remark": remark,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        data = await self._call("POST", "/api/v1/orders", json_body=body, signed=True,
                                idempotent=False)
        if not isinstance(data, dict) or "orderId" not in data:
            raise UnexpectedResponse("", "place order answer without orderId", 200,
                                     method="POST", path="/api/v1/orders")
        return PlacedOrder(order_id=str(data["orderId"]),
                           client_oid=str(data.get("clientOid") or client_oid))

    async def cancel_order(self, order_id: str) -> list[str]:
        """``DELETE /api/v1/orders/{orderId}``: the ids whose cancel was accepted (not done)."""
        data = await self._call("DELETE", f"/api/v1/orders/{quote(order_id, safe='')}",
                                signed=True)
        return [str(i) for i in (data or {}).get("cancelledOrderIds", [])]

    async def cancel_by_client_oid(self, client_oid: str, symbol: str) -> str:
        """``DELETE /api/v1/orders/client-order/{clientOid}?symbol=``: the clientOid."""
        data = await self._call(
            "DELETE", f"/api/v1/orders/client-order/{quote(client_oid, safe='')}",
            params={"symbol": symbol}, signed=True)
        return str((data or {}).get("clientOid") or client_oid)

    async def cancel_all(self, symbol: str) -> list[str]:
        """``DELETE /api/v1/orders?symbol=``: cancels every open limit order of the symbol."""
        data = await self._call("DELETE", "/api/v1/orders", params={"symbol": symbol},
                                signed=True)
        return [str(i) for i in (data or {}).get("cancelledOrderIds", [])]

    async def get_order(self, order_id: str) -> ExchangeOrder | None:
        """``GET /api/v1/orders/{orderId}``, or None when the exchange knows no such order."""
        try:
            data = await self._call("GET", f"/api/v1/orders/{quote(order_id, safe='')}",
                                    signed=True)
        except OrderNotFound:
            return None
        return None if not data else self._order(data, "GET", "/api/v1/orders/{orderId}")

    async def get_order_by_client_oid(self, client_oid: str,
                                      symbol: str | None = None) -> ExchangeOrder | None:
        """``GET /api/v1/orders/byClientOid``: the latest order with ``client_oid``, or None."""
        params: dict[str, str | int] = {"clientOid": client_oid}
        if symbol is not None:
            params["symbol"] = symbol
        try:
            data = await self._call("GET", "/api/v1/orders/byClientOid", params=params,
                                    signed=True)
        except OrderNotFound:
            return None
        return None if not data else self._order(data, "GET", "/api/v1/orders/byClientOid")

    async def active_orders(self, symbol: str, *,
                            page_size: int = _ACTIVE_PAGE_SIZE) -> list[ExchangeOrder]:
        """Every active order on ``symbol`` (``GET /api/v1/orders?status=active``, all pages).

        Orders may change between pages; an id seen twice is kept once.
        """
        seen: dict[str, ExchangeOrder] = {}
        page = 1
        while page <= _MAX_PAGES:
            data = await self._call(
                "GET", "/api/v1/orders",
                params={"status": "active", "symbol": symbol, "currentPage": page,
                        "pageSize": page_size},
                signed=True)
            items = (data or {}).get("items") or []
            for item in items:
                order = self._order(item, "GET", "/api/v1/orders")
                seen.setdefault(order.id, order)
            total_pages = _int((data or {}).get("totalPage"))
            if not items or page >= total_pages:
                break
            page += 1
        return list(seen.values())

    @staticmethod
    def _order(data: Any, method: str, path: str) -> ExchangeOrder:
        if not isinstance(data, Mapping):
            raise UnexpectedResponse("", "order is not an object", 200, method=method, path=path)
        try:
            return ExchangeOrder.from_api(data)
        except ValueError as exc:
            raise UnexpectedResponse("", str(exc), 200, method=method, path=path) from exc
