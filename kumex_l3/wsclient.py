"""Client of the exchange's public WebSocket protocol (kumex-api.md §3).

Two layers, as in python-websockets (``protocol.py`` driven by ``connection.py``):

* **Pure protocol** (no sockets, no clock): :func:`parse_bullet` reads the
  token reply, :func:`connect_url` builds the socket URL, :func:`classify`
  tells a frame's kind cheaply (only the envelope is decoded: ``type``, ``id``,
  ``topic``), and :class:`Session` holds one connection's protocol state:
  it consumes received frames (:meth:`Session.receive`), says what to send
  (:meth:`Session.data_to_send`: subscribes, pings, pongs) and, given the
  time, when the next ping is due or that a pong is overdue
  (:meth:`Session.tick`).
* **A thin asyncio shell**: :class:`WsClient` fetches a token with
  ``POST {base_url}/api/v1/bullet-public`` (httpx), picks a server from
  ``instanceServers``, opens ``{endpoint}?token=...&connectId=...``
  (websockets), waits for ``welcome``, subscribes (every ``ack`` checked by
  id), and hands back a :class:`Connection` that keeps the ping going in the
  background and delivers data frames, as ``str`` exactly as received::

      client = WsClient("http://127.0.0.1:8090")
      async with client.connect([level3_topic("XBTUSDM")]) as conn:
          async for text in conn:      # raw JSON of each data frame, unchanged
              ...

Control frames (``welcome``, ``ack``, ``pong``, server ``ping``) are handled
inside; anything else that is not a known control frame (data, unknown types,
text that is not JSON) is delivered to the caller, who decides. The caller
must keep reading: a ``pong`` is noticed when the reader gets to it, so a
consumer that lags behind by more than ``pingTimeout`` is treated as a dead
connection (the feed's reader only appends to memory, so it never lags).

Errors: the :class:`~kumex_l3.errors.WsError` branch of :mod:`kumex_l3.errors`
(third-party errors are translated with ``raise ... from exc``).
Every one of them is worth a reconnect with a fresh token (:func:`is_retryable`).
Tokens never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple
from urllib.parse import urlencode

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException

from kumex_l3.errors import (
    AckTimeout,
    ConnectError,
    ConnectionLost,
    PingTimeout,
    SubscribeError,
    TokenError,
    WelcomeTimeout,
    WsError,
    WsServerError,
)
from kumex_l3.messages import PRIVATE_TOPIC, TOPIC_PREFIX
from kumex_l3.tasks import cancel_and_wait

__all__ = [
    "BULLET_PATH",
    "MAX_TOPICS_PER_CONNECTION",
    "AckTimeout",
    "Bullet",
    "ConnectError",
    "Connection",
    "ConnectionLost",
    "DataFrame",
    "Frame",
    "FrameKind",
    "IdSource",
    "InstanceServer",
    "PingTimeout",
    "Session",
    "SubscribeError",
    "TokenError",
    "WelcomeTimeout",
    "WsClient",
    "WsError",
    "WsOptions",
    "WsServerError",
    "classify",
    "connect_url",
    "is_retryable",
    "level3_topic",
    "level3_topics",
    "new_connect_id",
    "parse_bullet",
    "parse_bullet_data",
    "ping_frame",
    "pong_frame",
    "subscribe_frame",
    "topic_symbol",
]

_log = logging.getLogger(__name__)

#: Public token endpoint (no authentication).
BULLET_PATH: Final = "/api/v1/bullet-public"
_OK_CODE: Final = "200000"
_TEXT_LIMIT: Final = 200  # of server text quoted in an error


def is_retryable(exc: BaseException) -> bool:
    """Whether reconnecting (after a backoff delay) may cure ``exc``.

    Every :class:`WsError`, OS-level socket error and timeout is; anything else
    is a bug and should surface.
    """
    return isinstance(exc, WsError | OSError | TimeoutError)


# --------------------------------------------------------------------------- pure protocol


def level3_topic(symbol: str) -> str:
    """``/contractMarket/level3v2:{symbol}``."""
    return TOPIC_PREFIX + symbol


#: Topics one connection may hold at the venue (kumex-api.md §3.6); a comma list of
#: symbols counts one topic per symbol.
MAX_TOPICS_PER_CONNECTION: Final = 100


def level3_topics(symbols: Sequence[str],
                  per: int = MAX_TOPICS_PER_CONNECTION) -> list[list[str]]:
    """The level3v2 subscriptions for ``symbols``, one list per connection.

    Each connection gets at most ``per`` symbols, in one subscribe message
    (``/contractMarket/level3v2:A,B,C``): the venue also allows only 100 client
    messages in 10 s, so one subscribe per symbol would not do for 100 of them.
    """
    if per < 1:
        raise ValueError("per must be >= 1")
    return [[TOPIC_PREFIX + ",".join(symbols[i:i + per])]
            for i in range(0, len(symbols), per)]


def topic_symbol(topic: str | None) -> str | None:
    """The symbol of a single-symbol level3v2 topic, else ``None``."""
    if topic is None or not topic.startswith(TOPIC_PREFIX):
        return None
    symbol = topic[len(TOPIC_PREFIX):]
    return symbol if symbol and "," not in symbol else None


@dataclass(frozen=True, slots=True)
class InstanceServer:
    """One entry of ``instanceServers``; intervals converted to seconds."""

    endpoint: str
    ping_interval: float
    ping_timeout: float
    encrypt: bool = False
    protocol: str = "websocket"


@dataclass(frozen=True, slots=True)
class Bullet:
    """A token and the servers it is valid for. The token is kept out of ``repr``."""

    token: str = field(repr=False)
    servers: tuple[InstanceServer, ...]


class _Server(msgspec.Struct, rename="camel"):
    endpoint: str
    ping_interval: int | float
    ping_timeout: int | float
    encrypt: bool = False
    protocol: str = "websocket"


class _BulletData(msgspec.Struct, rename="camel"):
    token: str
    instance_servers: list[_Server]


class _BulletReply(msgspec.Struct):
    code: str | int
    data: msgspec.Raw = msgspec.Raw(b"null")
    msg: str | None = None


def parse_bullet(body: bytes | str) -> Bullet:
    """The token and servers of a ``bullet-public`` reply. Raises :class:`TokenError`."""
    try:
        reply = msgspec.json.decode(body, type=_BulletReply)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise TokenError(f"bullet reply is not a valid envelope: {exc}") from None
    if str(reply.code) != _OK_CODE:
        raise TokenError(f"bullet refused: code {reply.code}: {(reply.msg or '')[:_TEXT_LIMIT]}")
    try:
        data = msgspec.json.decode(reply.data, type=_BulletData)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise TokenError(f"bullet data is not valid: {exc}") from None
    return _bullet_of(data)


def parse_bullet_data(data: Mapping[str, Any]) -> Bullet:
    """The token and servers of a bullet reply's ``data`` already decoded (e.g. by the REST
    client's ``bullet_private``). Raises :class:`TokenError`."""
    try:
        return _bullet_of(msgspec.convert(data, type=_BulletData))
    except msgspec.ValidationError as exc:
        raise TokenError(f"bullet data is not valid: {exc}") from None


def _bullet_of(data: _BulletData) -> Bullet:
    if not data.token:
        raise TokenError("bullet reply has an empty token")
    servers = []
    for srv in data.instance_servers:
        if not srv.endpoint.startswith(("ws://", "wss://")):
            raise TokenError(f"bullet endpoint {srv.endpoint[:_TEXT_LIMIT]!r} is not ws:// or wss://")
        if srv.ping_interval <= 0 or srv.ping_timeout <= 0:
            raise TokenError("bullet pingInterval and pingTimeout must be > 0")
        servers.append(InstanceServer(srv.endpoint, srv.ping_interval / 1000.0,
                                      srv.ping_timeout / 1000.0, srv.encrypt, srv.protocol))
    if not servers:
        raise TokenError("bullet reply lists no instanceServers")
    return Bullet(data.token, tuple(servers))


def connect_url(endpoint: str, token: str, connect_id: str) -> str:
    """``{endpoint}?token=...&connectId=...`` (``&`` if the endpoint has a query already)."""
    sep = "&" if "?" in endpoint else "?"
    return endpoint + sep + urlencode({"token": token, "connectId": connect_id})


def new_connect_id() -> str:
    """A fresh, unique ``connectId``."""
    return secrets.token_hex(8)


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def subscribe_frame(msg_id: str, topic: str, *, unsubscribe: bool = False) -> str:
    """A ``subscribe`` (or ``unsubscribe``) asking for an ``ack``; ``privateChannel`` true
    for the private order channel (``/contractMarket/tradeOrders[:SYM]``)."""
    private = topic == PRIVATE_TOPIC or topic.startswith(PRIVATE_TOPIC + ":")
    return _dumps({"id": msg_id, "type": "unsubscribe" if unsubscribe else "subscribe",
                   "topic": topic, "privateChannel": private, "response": True})


def ping_frame(msg_id: str) -> str:
    """``{"id":"<id>","type":"ping"}``."""
    return _dumps({"id": msg_id, "type": "ping"})


def pong_frame(msg_id: str | None) -> str:
    """The reply to a server ``ping``."""
    return _dumps({"id": msg_id, "type": "pong"})


class FrameKind(enum.StrEnum):
    """What a received frame is."""

    DATA = "message"
    WELCOME = "welcome"
    ACK = "ack"
    PONG = "pong"
    PING = "ping"
    ERROR = "error"
    UNKNOWN = "unknown"  # JSON object with another (or no) type
    INVALID = "invalid"  # not a JSON object


_KINDS: Final = {k.value: k for k in FrameKind if k not in (FrameKind.UNKNOWN, FrameKind.INVALID)}


@dataclass(frozen=True, slots=True)
class Frame:
    """The envelope of one received frame (``code``/``text`` only for ``error``)."""

    kind: FrameKind
    id: str | None = None
    topic: str | None = None
    code: int | None = None
    text: str = ""


class _Head(msgspec.Struct, gc=False):
    type: Any = None
    id: Any = None
    topic: Any = None
    code: Any = None
    data: msgspec.Raw = msgspec.Raw(b"")


_HEAD: Final = msgspec.json.Decoder(_Head)


def classify(text: str | bytes) -> Frame:
    """The kind, id and topic of a frame: only the envelope is decoded (``data`` is skipped)."""
    try:
        head = _HEAD.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        # RecursionError: msgspec's answer to JSON nested deeper than the recursion limit.
        return Frame(FrameKind.INVALID)
    return _frame_of(head)


def _frame_of(head: _Head) -> Frame:
    kind = _KINDS.get(head.type, FrameKind.UNKNOWN) if isinstance(head.type, str) \
        else FrameKind.UNKNOWN
    msg_id = None if head.id is None else str(head.id)
    topic = head.topic if isinstance(head.topic, str) else None
    if kind is not FrameKind.ERROR:
        return Frame(kind, msg_id, topic)
    code = head.code
    if isinstance(code, str):
        # ASCII digits only ("²".isdigit() is true, int("²") raises), bounded length.
        code = int(code) if code.isascii() and code.isdigit() and len(code) <= 18 else None
    elif not isinstance(code, int) or isinstance(code, bool):
        code = None
    detail: Any = None
    if head.data:
        with contextlib.suppress(msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            detail = msgspec.json.decode(head.data)
    text_out = detail if isinstance(detail, str) else ("" if detail is None else str(detail))
    return Frame(kind, msg_id, topic, code, text_out[:_TEXT_LIMIT])


class DataFrame(NamedTuple):
    """A frame for the caller: its text exactly as received, and its topic if it has one."""

    text: str
    topic: str | None
    kind: FrameKind = FrameKind.DATA


class IdSource:
    """Message ids: the wall clock in ms as text, strictly increasing within a session.

    ``clock_ms`` is injectable for tests (default: ``time.time()`` in ms).
    """

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0

    def __call__(self) -> str:
        self._last = max(self._last + 1, self._clock_ms())
        return str(self._last)


class Session:
    """Protocol state of one connection (pure: time comes in as ``now``, in seconds).

    Feed it every received frame with :meth:`receive`; send what
    :meth:`data_to_send` returns; call :meth:`tick` when it said to.
    """

    def __init__(self, connect_id: str, ping_interval: float, ping_timeout: float,
                 ids: IdSource | None = None) -> None:
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be > 0")
        self.connect_id = connect_id
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._ids = ids or IdSource()
        self.welcomed = False
        #: Subscribe/unsubscribe id -> (topic, is_subscribe), awaiting their ack.
        self.pending: dict[str, tuple[str, bool]] = {}
        #: Topics acked as subscribed.
        self.topics: list[str] = []
        self._outbox: list[str] = []
        self._pings: dict[str, float] = {}  # id -> sent at, awaiting a pong
        self._next_ping: float | None = None

    # -- what to send -------------------------------------------------------

    def subscribe(self, topics: Iterable[str]) -> list[str]:
        """Queue one subscribe per topic; returns their ids."""
        return self._request(topics, subscribe=True)

    def unsubscribe(self, topics: Iterable[str]) -> list[str]:
        """Queue one unsubscribe per topic; returns their ids."""
        return self._request(topics, subscribe=False)

    def _request(self, topics: Iterable[str], *, subscribe: bool) -> list[str]:
        ids = []
        for topic in topics:
            msg_id = self._ids()
            self.pending[msg_id] = (topic, subscribe)
            self._outbox.append(subscribe_frame(msg_id, topic, unsubscribe=not subscribe))
            ids.append(msg_id)
        return ids

    @property
    def wants_to_send(self) -> bool:
        """Whether :meth:`data_to_send` has something."""
        return bool(self._outbox)

    def data_to_send(self) -> list[str]:
        """Frames to send now, in order (and forget them)."""
        out, self._outbox = self._outbox, []
        return out

    # -- time ---------------------------------------------------------------

    def tick(self, now: float) -> float:
        """Queue a ping if one is due; seconds until the next call is useful.

        Raises :class:`PingTimeout` when a ping has waited ``ping_timeout`` for
        its pong. Before ``welcome`` there is nothing to do.
        """
        if not self.welcomed or self._next_ping is None:
            return self.ping_interval
        if self._pings:
            oldest = min(self._pings.values())
            if now - oldest >= self.ping_timeout:
                raise PingTimeout(f"no pong within {self.ping_timeout:g}s")
        if now >= self._next_ping:
            msg_id = self._ids()
            self._pings[msg_id] = now
            self._outbox.append(ping_frame(msg_id))
            self._next_ping = now + self.ping_interval
        wake = self._next_ping
        if self._pings:
            wake = min(wake, min(self._pings.values()) + self.ping_timeout)
        return max(wake - now, 0.0)

    # -- what was received -------------------------------------------------

    def receive(self, text: str, now: float) -> DataFrame | None:
        """Consume one received frame; the frame for the caller, or ``None`` if handled.

        Raises :class:`SubscribeError` for an ``error`` answering a pending
        subscribe, :class:`WsServerError` for any other ``error``.
        """
        try:
            head = _HEAD.decode(text)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            head = None
        if head is not None and head.type == "message":  # data: the hot path
            topic = head.topic
            return DataFrame(text, topic if isinstance(topic, str) else None)
        frame = classify(text) if head is None else _frame_of(head)
        kind = frame.kind
        if kind is FrameKind.PONG:
            self._pong(frame.id)
            return None
        if kind is FrameKind.ACK:
            ack = self.pending.pop(frame.id or "", None)
            if ack is not None:
                topic, subscribing = ack
                if subscribing:
                    if topic not in self.topics:
                        self.topics.append(topic)
                elif topic in self.topics:
                    self.topics.remove(topic)
            return None
        if kind is FrameKind.WELCOME:
            if not self.welcomed:
                self.welcomed = True
                self._next_ping = now + self.ping_interval
            return None
        if kind is FrameKind.PING:
            self._outbox.append(pong_frame(frame.id))
            return None
        if kind is FrameKind.ERROR:
            pending = self.pending.pop(frame.id, None) if frame.id is not None else None
            if pending is not None:
                raise SubscribeError(pending[0], frame.code, frame.text)
            raise WsServerError(frame.code, frame.text)
        return DataFrame(text, frame.topic, kind)

    def _pong(self, msg_id: str | None) -> None:
        sent = self._pings.pop(msg_id or "", None)
        if sent is not None:
            # The connection answered: older pings are answered too, in effect.
            for other, at in list(self._pings.items()):
                if at <= sent:
                    del self._pings[other]


# --------------------------------------------------------------------------- asyncio shell


@dataclass(frozen=True, slots=True)
class WsOptions:
    """Timeouts (seconds) and limits of the shell. ``max_queue``: frames buffered unread."""

    token_timeout: float = 10.0
    open_timeout: float = 10.0
    welcome_timeout: float = 10.0
    subscribe_timeout: float = 10.0
    close_timeout: float = 2.0
    max_size: int = 1 << 20
    max_queue: int = 1024
    #: Offer permessage-deflate. It saves bandwidth over the internet but costs
    #: CPU on both ends (about a third of the feed's and the sandbox's time on a
    #: loopback or LAN link): off by default.
    compression: bool = False
    #: TLS of ``wss://`` endpoints (and of the token request when this client makes
    #: its own HTTP client); ``None``: the system's CAs (kumex_l3.config.tls_context).
    tls: ssl.SSLContext | None = None


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


class Connection:
    """One open, welcomed connection. Built by :meth:`WsClient.connect`; read it until it fails.

    :meth:`recv` returns the next data frame's text; it raises a :class:`WsError`
    when the connection ends (:class:`PingTimeout`, :class:`WsServerError`,
    :class:`ConnectionLost`). Iterating with ``async for`` yields the same
    texts and stops quietly only after :meth:`close`.
    """

    def __init__(self, ws: ClientConnection, session: Session, server: InstanceServer,
                 options: WsOptions, clock: Callable[[], float]) -> None:
        self._ws = ws
        self._session = session
        self.server = server
        self._options = options
        self._clock = clock
        self._early: deque[DataFrame] = deque()  # data that came while awaiting acks
        self._failure: BaseException | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connect_id(self) -> str:
        return self._session.connect_id

    @property
    def topics(self) -> list[str]:
        """Topics the server acknowledged."""
        return list(self._session.topics)

    # -- setup --------------------------------------------------------------

    async def _wait_welcome(self) -> None:
        try:
            async with asyncio.timeout(self._options.welcome_timeout):
                while not self._session.welcomed:
                    self._keep(await self._receive_one())
        except TimeoutError:
            raise WelcomeTimeout(
                f"no welcome within {self._options.welcome_timeout:g}s") from None

    def _start_keepalive(self) -> None:
        self._keepalive_task = asyncio.create_task(self._keepalive(),
                                                   name=f"ws-keepalive-{self.connect_id}")

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe to ``topics`` and wait for every ``ack`` (data arriving meanwhile is kept)."""
        await self._request(self._session.subscribe(topics))

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Unsubscribe from ``topics`` and wait for every ``ack``."""
        await self._request(self._session.unsubscribe(topics))

    async def _request(self, ids: list[str]) -> None:
        await self._flush()
        waiting = set(ids)
        try:
            async with asyncio.timeout(self._options.subscribe_timeout):
                while waiting & self._session.pending.keys():
                    self._keep(await self._receive_one())
        except TimeoutError:
            topics = [self._session.pending[i][0] for i in ids if i in self._session.pending]
            raise AckTimeout(topics) from None

    def _keep(self, frame: DataFrame | None) -> None:
        if frame is not None:
            self._early.append(frame)

    # -- reading -------------------------------------------------------------

    async def recv_frame(self) -> DataFrame:
        """The next frame for the caller, with its topic (see :class:`DataFrame`)."""
        if self._early:
            return self._early.popleft()
        while True:
            frame = await self._receive_one()
            if frame is not None:
                return frame

    async def recv(self) -> str:
        """The text of the next data frame, exactly as received."""
        return (await self.recv_frame()).text

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            try:
                yield await self.recv()
            except WsError:
                if self._closed:
                    return
                raise

    async def _receive_one(self) -> DataFrame | None:
        try:
            raw = await self._ws.recv()
        except ConnectionClosed as exc:
            raise self._lost(exc) from exc
        if isinstance(raw, bytes):  # a binary frame: the protocol speaks text only
            binary = raw
            try:
                raw = binary.decode()
            except UnicodeDecodeError:
                return DataFrame(binary.decode(errors="replace"), None, FrameKind.INVALID)
        frame = self._session.receive(raw, self._clock())
        if self._session.wants_to_send:  # a pong to a server ping
            await self._flush()
        return frame

    def _lost(self, exc: ConnectionClosed) -> WsError:
        if isinstance(self._failure, WsError):
            return self._failure
        if self._failure is not None:
            return WsError(f"keepalive failed: {self._failure!r}")
        close = exc.rcvd or exc.sent
        return ConnectionLost(close.code if close else None, close.reason if close else "")

    # -- writing and keepalive ----------------------------------------------

    async def _flush(self) -> None:
        for text in self._session.data_to_send():
            try:
                await self._ws.send(text)
            except ConnectionClosed as exc:
                raise self._lost(exc) from exc

    async def _keepalive(self) -> None:
        try:
            while True:
                wait = self._session.tick(self._clock())
                await self._flush()
                await asyncio.sleep(wait)
        except asyncio.CancelledError:
            raise
        except WsError as exc:
            if not isinstance(exc, ConnectionLost):
                self._failure = exc
                _log.debug("ws %s: %s", self.connect_id, exc)
            await self._ws.close(1000, str(exc)[:100])
        except Exception as exc:  # a bug: surface it through recv(), never silently
            self._failure = exc
            _log.error("ws %s: keepalive failed", self.connect_id, exc_info=exc)
            await self._ws.close(1011, "client error")

    async def close(self) -> None:
        """Close the socket and stop the keepalive (idempotent)."""
        self._closed = True
        task, self._keepalive_task = self._keepalive_task, None
        await cancel_and_wait(task)
        await self._ws.close()


class WsClient:
    """Opens welcomed, subscribed :class:`Connection` objects to the exchange at ``base_url``.

    ``http`` is the ``httpx.AsyncClient`` for the token request (one is made,
    and closed by :meth:`aclose`, when not given). ``rng`` picks among
    ``instanceServers``; ``clock`` (monotonic seconds) drives the keepalive.
    ``bullet``: where tokens come from instead of ``bullet-public`` (a private
    token: ``bullet-private`` is signed, so the caller's REST client asks); it
    raises :class:`TokenError` on failure.
    """

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        options: WsOptions | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        ids: Callable[[], IdSource] = IdSource,
        bullet: Callable[[], Awaitable[Bullet]] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._bullet = bullet
        self.options = options or WsOptions()
        self._http = http
        self._own_http = http is None
        self._rng = rng or random.Random()
        self._clock = clock
        self._ids = ids

    async def aclose(self) -> None:
        """Close the HTTP client if this object made it."""
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def fetch_bullet(self) -> Bullet:
        """``POST /api/v1/bullet-public`` (or the ``bullet`` source). Raises
        :class:`TokenError`."""
        if self._bullet is not None:
            return await self._bullet()
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.options.token_timeout,
                                           verify=self.options.tls or True)
        url = self.base_url + BULLET_PATH
        try:
            reply = await self._http.post(url, timeout=self.options.token_timeout)
        except httpx.HTTPError as exc:
            raise TokenError(f"bullet-public failed: {type(exc).__name__}: {exc}") from exc
        if reply.status_code != 200:
            detail = ""
            with contextlib.suppress(ValueError, AttributeError):
                body = reply.json()
                detail = f": code {body.get('code')}: {str(body.get('msg', ''))[:_TEXT_LIMIT]}"
            raise TokenError(f"bullet-public: HTTP {reply.status_code}{detail}",
                             reply.status_code)
        return parse_bullet(reply.content)

    @contextlib.asynccontextmanager
    async def connect(self, topics: Sequence[str] = (), *,
                      connect_id: str | None = None) -> AsyncIterator[Connection]:
        """Token, connect, ``welcome``, subscribe to ``topics`` (acks checked); close on exit."""
        bullet = await self.fetch_bullet()
        server = self._rng.choice(bullet.servers)
        cid = connect_id or new_connect_id()
        opts = self.options
        url = connect_url(server.endpoint, bullet.token, cid)
        # websockets refuses an ssl argument for a ws:// URL: given for wss:// only.
        tls: dict[str, Any] = ({"ssl": opts.tls}
                               if opts.tls is not None and url.startswith("wss://") else {})
        try:
            ws = await ws_connect(
                url,
                ping_interval=None,  # the protocol's own JSON ping, driven by Session
                open_timeout=opts.open_timeout,
                close_timeout=opts.close_timeout,
                max_size=opts.max_size,
                max_queue=opts.max_queue,
                compression="deflate" if opts.compression else None,
                **tls,
            )
        except InvalidURI as exc:
            raise ConnectError(f"bad endpoint {server.endpoint[:_TEXT_LIMIT]!r}") from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ConnectError(_scrub(
                f"cannot connect to {server.endpoint}: {type(exc).__name__}: {exc}",
                bullet.token)) from exc
        session = Session(cid, server.ping_interval, server.ping_timeout, self._ids())
        conn = Connection(ws, session, server, opts, self._clock)
        try:
            await conn._wait_welcome()
            conn._start_keepalive()
            if topics:
                await conn.subscribe(topics)
            yield conn
        finally:
            await conn.close()
