"""The sandbox's WebSocket server: KuCoin Futures' public socket protocol (kumex-api.md §3).

One :class:`Hub` serves every WebSocket client of the sandbox at
``/endpoint`` (``hub.router``): token check, ``welcome``, ``subscribe`` /
``unsubscribe`` to ``/contractMarket/level3v2:SYM[,SYM...]`` with ``ack``,
``ping``/``pong``, errors; and it fans the exchange's L3 messages out to the
subscribers.

Flow of a message::

    publish(symbol, [dict]) ─ serialise once ─┐
    publish_raw(symbol, [text]) ──────────────┤
    inject(symbol, [text or bytes]) ──────────┴─► for every subscriber: its own
        WsFaultFilter (drop/dup/reorder) ─► its bounded queue (delay, jitter)
        ─► its sender task ─► socket

:meth:`Hub.inject` is the chaos tests' way in (``POST /sandbox/inject``):
frames sent exactly as given, whatever they hold (``bytes`` go out as binary
frames), counted as ``injected``.

``publish``/``publish_raw`` are synchronous and never wait: call them from the
event loop's thread, after every engine action, in order. Each client has one
bounded queue (``queue_limit`` entries) drained by one sender task, which is
the only writer to its socket (replies such as ``ack`` and ``pong`` go through
the same queue, so they keep their order with the data).

Slow clients: when a client's queue is full, the client is disconnected (close
code 1008, reason ``slow client: ...``; counted as ``slow_clients_dropped``)
and its queue freed at once, rather than letting memory grow. The real venue
silently dropped messages for slow clients; we disconnect so the client sees a
clear fault and resyncs from a snapshot.

Other closes: no ``ping`` for ``ping_timeout_s`` → 1008 ``ping timeout``
(counted as ``ping_timeouts``); :meth:`Hub.disconnect_all` (a venue-wide
outage, optionally refusing new connections for a while) and the
``disconnect_every_s`` fault → 1001 (counted as ``disconnects``); a bad token →
an ``error`` message with code 401, then 1008; a connection during an outage
→ 1013 ``try again later`` before ``welcome`` (counted as ``outage_refusals``).

Faults are drawn **per connection**, independently, as the real venue
dropped messages for one slow connection and closed connections one at a
time: each client has its own dice for drop/duplicate/reorder (so two
connections of one client rarely lose the same message); ``delay_ms`` holds
each message that long after it was published, plus up to
``delay_jitter_ms`` drawn per connection and message (order is kept within a
connection); ``disconnect_every_s`` closes each connection after its own
lifetime, drawn uniformly in ``[disconnect_every_s, disconnect_every_max_s]``
(twice the former when the latter is 0), so two connections are rarely cut
together. A venue-wide outage is its own knob (``outage_every_s``, lasting
``outage_s``; or :meth:`Hub.disconnect_all`), and ``pong_disabled`` leaves
every ``ping`` unanswered (still counted as a sign of life, so the server does
not drop the client; counted as ``pongs_withheld``). The background task
started by :meth:`Hub.start` runs the schedules.

**The private channel.** A token from ``bullet-private`` belongs to the API
key's account (:meth:`Hub.issue_token` with ``user_id``). Its connections may
subscribe, with ``privateChannel: true``, to ``/contractMarket/tradeOrders``
(every contract: subject ``orderChange``) and ``/contractMarket/tradeOrders:SYM``
(one contract: subject ``symbolOrderChange``), and receive the changes of that
account's orders and no one else's (:meth:`Hub.publish_private`, fed by the
engines; the message shape is the venue's, docs/protocol.md §8); and to
``/contract/position:SYM``, its position in a contract after each of its fills
(subject ``position.change``, :meth:`Hub.publish_position`). A public token
asking for a private channel gets an ``error`` 401. The drop, duplicate and
reorder faults are the public feed's and leave private messages alone; delay,
disconnects and outages apply to every connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Final

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from kumex_l3.messages import PRIVATE_TOPIC, TOPIC_PREFIX
from kumex_l3.tasks import cancel_and_wait, race
from services.sandbox.faults import FaultState, WsFaultFilter

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_TRY_AGAIN",
    "MAX_TOPICS",
    "POSITION_TOPIC",
    "PRIVATE_TOPIC",
    "TOKEN_TTL_S",
    "TOPIC_PREFIX",
    "Hub",
]

_log = logging.getLogger(__name__)

#: The private topic's ``subject`` for every contract, and for one contract's.
_SUBJECT_ALL: Final = "orderChange"
_SUBJECT_ONE: Final = "symbolOrderChange"
#: A private subscription to every contract (in ``_Client.private``).
_ALL: Final = ""
#: The private channel of an account's position in one contract (``:SYM``).
POSITION_TOPIC: Final = "/contract/position"
#: ``_Client.private`` keys of position subscriptions: this prefix and the symbol.
_POS: Final = "pos:"
#: Topics one connection may hold (the real venue's limit).
MAX_TOPICS: Final = 100
#: How long an issued token stays valid.
TOKEN_TTL_S: Final = 24 * 3600.0
#: Close code for a client that broke the rules (slow, no ping, bad token).
CLOSE_POLICY: Final = 1008
#: Close code for a server-initiated disconnect (disconnect_all, the disconnect fault).
CLOSE_GOING_AWAY: Final = 1001
#: Close code for a connection refused during an outage.
CLOSE_TRY_AGAIN: Final = 1013
#: How long a close may wait for the client's socket to become writable.
_CLOSE_TIMEOUT_S: Final = 10.0
#: Tick of the background task that applies ``disconnect_every_s``.
_TICK_S: Final = 0.05

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _text(obj: dict[str, Any]) -> str:
    return _dumps(obj)


class _Client:
    """One connected socket: its subscriptions, outgoing queue, faults and close request."""

    __slots__ = ("close_code", "close_reason", "closing", "connect_id", "cut_at", "filter",
                 "latency", "ping_deadline", "private", "queue", "rng", "symbols", "user",
                 "wakeup")

    def __init__(self, connect_id: str, ping_deadline: float, faults: FaultState,
                 seed: int, user: str | None = None) -> None:
        self.connect_id = connect_id
        #: The account of a private token (None: a public one).
        self.user = user
        #: Private subscriptions: symbols, ``_ALL`` for every contract, and ``_POS`` + symbol
        #: for a position.
        self.private: set[str] = set()
        #: This connection's own dice: drop/duplicate/reorder, delay jitter, lifetime.
        self.filter = WsFaultFilter(faults, seed=seed)
        self.rng = random.Random(seed ^ 0x5EED)
        #: This connection's own extra latency, as a fraction of ``delay_jitter_ms``
        #: (two connections' network paths differ: the skew between the lines).
        self.latency = self.rng.random()
        #: ``time.monotonic()`` at which the disconnect fault closes it (None: not drawn).
        self.cut_at: float | None = None
        self.symbols: set[str] = set()
        #: (due ``time.monotonic()``, text); due 0 = at once; bytes go as a binary frame.
        self.queue: deque[tuple[float, str | bytes]] = deque()
        self.wakeup = asyncio.Event()
        self.closing = asyncio.Event()
        self.close_code = 1000
        self.close_reason = ""
        self.ping_deadline = ping_deadline


class Hub:
    """Fan-out of L3 messages to WebSocket clients, with the KuCoin socket protocol.

    ``symbols``: the symbols clients may subscribe to; ``None`` accepts any
    symbol (replay of a capture). ``queue_limit``: messages a client may have
    waiting before it is disconnected as slow. ``ping_timeout_s``: a client
    that sends no ``ping`` for this long is dropped.
    """

    def __init__(
        self,
        faults: FaultState,
        *,
        symbols: Iterable[str] | None = None,
        seed: int = 0,
        queue_limit: int = 10000,
        ping_timeout_s: float = 60.0,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1, not {queue_limit}")
        if ping_timeout_s <= 0:
            raise ValueError(f"ping_timeout_s must be > 0, not {ping_timeout_s}")
        self.faults = faults
        self.queue_limit = queue_limit
        self.ping_timeout_s = ping_timeout_s
        self._symbols: set[str] | None = None if symbols is None else set(symbols)
        self._seeds = random.Random(seed)
        #: ``time.monotonic()`` until which new connections are refused (an outage).
        self.outage_until = 0.0
        #: token -> (expiry, account of a private token or None)
        self._tokens: dict[str, tuple[float, str | None]] = {}
        self._clients: set[_Client] = set()
        self._subscribers: dict[str, set[_Client]] = {}
        #: account -> its clients holding a private subscription
        self._private: dict[str, set[_Client]] = {}
        self.published_private = 0
        self._handlers: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.router = APIRouter()
        self.router.add_api_websocket_route("/endpoint", self._endpoint)

    # ------------------------------------------------------------------ tokens, symbols

    def issue_token(self, user_id: str | None = None) -> str:
        """A new random token for ``/endpoint?token=...``, valid for 24 h (reusable);
        a private one of account ``user_id`` when given."""
        now = time.monotonic()
        expired = [t for t, (until, _) in self._tokens.items() if until <= now]
        for t in expired:
            del self._tokens[t]
        token = secrets.token_urlsafe(48)
        self._tokens[token] = (now + TOKEN_TTL_S, user_id)
        return token

    def token_valid(self, token: str | None) -> bool:
        """Whether ``token`` was issued by this hub and has not expired."""
        if not token:
            return False
        held = self._tokens.get(token)
        return held is not None and time.monotonic() < held[0]

    def _token_user(self, token: str | None) -> str | None:
        held = self._tokens.get(token) if token else None
        return None if held is None else held[1]

    def add_symbols(self, symbols: Iterable[str]) -> None:
        """Allow subscriptions to more symbols (no-op when any symbol is accepted)."""
        if self._symbols is not None:
            self._symbols.update(symbols)

    def symbol_known(self, symbol: str) -> bool:
        """Whether clients may subscribe to ``symbol``."""
        if self._symbols is None:
            return bool(symbol) and symbol.isascii() and symbol.isalnum()
        return symbol in self._symbols

    # ------------------------------------------------------------------ publishing

    def publish(self, symbol: str, messages: Sequence[dict[str, Any]]) -> None:
        """Send ``messages`` of ``symbol`` to its subscribers, each serialised once (compact)."""
        self.publish_raw(symbol, [_dumps(m) for m in messages])

    def publish_raw(self, symbol: str, texts: Sequence[str]) -> None:
        """Send already-serialised messages unchanged (replay: bytes as recorded).

        Synchronous, never waits. Faults apply (each subscriber's own); a
        subscriber whose queue is full is disconnected as slow.
        """
        self._fan_out(symbol, texts)

    def inject(self, symbol: str, frames: Sequence[str | bytes]) -> None:
        """Send arbitrary frames to ``symbol``'s subscribers, unchanged and in order.

        Like :meth:`publish_raw` (faults apply, never waits) but for test
        input that need not be JSON: ``str`` goes out as a text frame,
        ``bytes`` as a binary frame. Counted as ``injected``.
        """
        self.faults.counts["injected"] += len(frames)
        self._fan_out(symbol, frames)

    def publish_private(self, symbol: str, changes: Sequence[tuple[str, dict[str, Any]]]
                        ) -> None:
        """Send each ``(account, data)`` order change of ``symbol`` to that account's
        private subscribers: ``orderChange`` on the all-contracts topic,
        ``symbolOrderChange`` on the contract's. Never waits; no drop/dup/reorder."""
        topic_one = f"{PRIVATE_TOPIC}:{symbol}"
        for user, data in changes:
            clients = self._private.get(user)
            if not clients:
                continue
            texts: dict[str, str] = {}
            for client in list(clients):
                key = _ALL if _ALL in client.private else symbol
                if key not in client.private:
                    continue
                text = texts.get(key)
                if text is None:
                    text = texts[key] = _dumps({
                        "type": "message",
                        "topic": PRIVATE_TOPIC if key == _ALL else topic_one,
                        "subject": _SUBJECT_ALL if key == _ALL else _SUBJECT_ONE,
                        "channelType": "private", "data": data})
                self.published_private += 1
                self._enqueue(client, [text])

    def publish_position(self, symbol: str, user: str, data: dict[str, Any]) -> None:
        """Send ``user``'s position in ``symbol`` (the ``data`` of ``position.change``) to
        its subscribers of ``/contract/position:{symbol}``. Never waits."""
        key = _POS + symbol
        clients = [c for c in self._private.get(user, ()) if key in c.private]
        if not clients:
            return
        text = _dumps({"type": "message", "topic": f"{POSITION_TOPIC}:{symbol}",
                       "subject": "position.change", "channelType": "private",
                       "data": data})
        for client in clients:
            self.published_private += 1
            self._enqueue(client, [text])

    def flush(self, symbol: str) -> None:
        """Send the messages of ``symbol`` held back by the reorder fault, unswapped."""
        for client in list(self._subscribers.get(symbol, ())):
            self._enqueue(client, client.filter.flush(symbol))

    def _fan_out(self, symbol: str, texts: Sequence[str | bytes]) -> None:
        if not texts:
            return
        self.published += len(texts)
        subscribers = self._subscribers.get(symbol)
        if not subscribers:
            return
        for client in list(subscribers):
            self._enqueue(client, client.filter.filter(symbol, texts))

    def _enqueue(self, client: _Client, texts: Sequence[str | bytes]) -> None:
        """Queue ``texts`` for one client, with its delay; drop it as slow past the limit."""
        if not texts:
            return
        queue = client.queue
        if len(queue) + len(texts) > self.queue_limit:
            self._drop_slow(client)
            return
        faults = self.faults
        delay = faults.delay_ms + client.latency * faults.delay_jitter_ms
        due = time.monotonic() + delay / 1000.0 if delay > 0 else 0.0
        queue.extend([(due, text) for text in texts])
        client.wakeup.set()

    def _drop_slow(self, client: _Client) -> None:
        self.faults.counts["slow_clients_dropped"] += 1
        self._drop(client, CLOSE_POLICY,
                   f"slow client: more than {self.queue_limit} messages queued")

    # ------------------------------------------------------------------ disconnecting

    def disconnect_all(self, outage_s: float = 0.0) -> int:
        """Close every client (1001), and refuse new ones for ``outage_s`` seconds (a
        venue-wide outage); returns how many were closed. Counted as ``disconnects``."""
        if outage_s > 0:
            self.outage_until = max(self.outage_until, time.monotonic() + outage_s)
            self.faults.counts["outages"] += 1
        clients = list(self._clients)
        for client in clients:
            self._drop(client, CLOSE_GOING_AWAY, "server disconnect")
        self.faults.counts["disconnects"] += len(clients)
        return len(clients)

    def _drop(self, client: _Client, code: int, reason: str) -> None:
        """Forget ``client`` now (free its queue) and ask its handler to close the socket."""
        if client.closing.is_set():
            return
        client.close_code = code
        client.close_reason = reason
        client.queue.clear()
        self._forget(client)
        client.closing.set()

    def _forget(self, client: _Client) -> None:
        self._clients.discard(client)
        if client.user is not None:
            _unindex(self._private, client.user, client)
        client.private.clear()
        for symbol in client.symbols:
            _unindex(self._subscribers, symbol, client)
        client.symbols.clear()

    # ------------------------------------------------------------------ lifecycle, stats

    async def start(self) -> None:
        """Start the background task of the ``disconnect_every_s`` fault."""
        if self._task is None:
            self._task = asyncio.create_task(self._disconnector(), name="hub-disconnector")

    async def stop(self) -> None:
        """Stop the background task, disconnect every client and wait (bounded) for them."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        for client in list(self._clients):
            self._drop(client, CLOSE_GOING_AWAY, "server stopping")
        handlers = [h for h in self._handlers if h is not asyncio.current_task()]
        if handlers:
            await asyncio.wait(handlers, timeout=_CLOSE_TIMEOUT_S)

    async def _disconnector(self) -> None:
        """Cut each connection at the end of its own drawn lifetime; run the outages."""
        last_outage = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_S)
            faults = self.faults
            now = time.monotonic()
            every = faults.disconnect_every_s
            cut: list[_Client] = []
            for client in self._clients:
                if every <= 0:
                    client.cut_at = None
                    continue
                if client.cut_at is None:
                    longest = faults.disconnect_every_max_s or 2 * every
                    client.cut_at = now + client.rng.uniform(every, max(every, longest))
                elif now >= client.cut_at:
                    cut.append(client)
            for client in cut:
                self._drop(client, CLOSE_GOING_AWAY, "server disconnect")
                self.faults.counts["disconnects"] += 1
            if cut:
                _log.info("disconnect fault: closed %d client(s)", len(cut))
            outage_every = faults.outage_every_s
            if outage_every <= 0:
                last_outage = now
            elif now - last_outage >= outage_every:
                last_outage = now
                closed = self.disconnect_all(faults.outage_s)
                _log.info("outage fault: closed %d client(s), refusing new ones for %.1f s",
                          closed, faults.outage_s)

    def subscriber_count(self, symbol: str | None = None) -> int:
        """Clients subscribed to ``symbol`` (any symbol when None)."""
        if symbol is not None:
            return len(self._subscribers.get(symbol, ()))
        return sum(1 for c in self._clients if c.symbols)

    def max_queue_depth(self) -> int:
        """The longest client queue right now (0 without clients)."""
        return max((len(c.queue) for c in self._clients), default=0)

    def stats(self) -> dict[str, Any]:
        """JSON-able counters: clients, subscriptions per topic, queue depths."""
        return {
            "clients": len(self._clients),
            "subscriptions": {
                TOPIC_PREFIX + symbol: len(subs)
                for symbol, subs in sorted(self._subscribers.items())
            },
            "queue_depth_max": self.max_queue_depth(),
            "queue_limit": self.queue_limit,
            "published": self.published,
            "published_private": self.published_private,
            "connections": [
                {"connectId": c.connect_id, "topics": len(c.symbols), "queued": len(c.queue)}
                for c in self._clients
            ],
        }

    # ------------------------------------------------------------------ the socket

    async def _endpoint(self, websocket: WebSocket) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve(websocket)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve(self, websocket: WebSocket) -> None:
        connect_id = websocket.query_params.get("connectId", "")
        token = websocket.query_params.get("token")
        await websocket.accept()
        try:
            if time.monotonic() < self.outage_until:
                self.faults.counts["outage_refusals"] += 1
                await websocket.close(CLOSE_TRY_AGAIN, "try again later: outage")
                return
            if not self.token_valid(token):
                await websocket.send_text(_text(
                    {"id": connect_id, "type": "error", "code": 401, "data": "token is invalid"}
                ))
                await websocket.close(CLOSE_POLICY, "token is invalid")
                return
            await websocket.send_text(_text({"id": connect_id, "type": "welcome"}))
        except (WebSocketDisconnect, OSError, RuntimeError):
            return  # the client left during the handshake
        client = _Client(connect_id, time.monotonic() + self.ping_timeout_s, self.faults,
                         self._seeds.getrandbits(63), user=self._token_user(token))
        self._clients.add(client)
        try:
            results = await race(self._send_loop(client, websocket),
                                 self._receive_loop(client, websocket), client.closing.wait())
        finally:
            self._forget(client)
        for result in results:
            if isinstance(result, Exception) and not isinstance(
                result, (WebSocketDisconnect, OSError)
            ):
                _log.error("client %s: %r", connect_id, result, exc_info=result)
        if client.closing.is_set():
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await websocket.close(client.close_code, client.close_reason)
            except (TimeoutError, WebSocketDisconnect, OSError, RuntimeError) as exc:
                # Never readable again or already gone: the server drops the transport.
                _log.debug("client %s: close not sent: %r", connect_id, exc)

    async def _send_loop(self, client: _Client, websocket: WebSocket) -> None:
        """The only writer of the socket: drains the client's queue, honouring ``due``."""
        queue = client.queue
        while True:
            if not queue:
                client.wakeup.clear()
                await client.wakeup.wait()
                continue
            due, text = queue[0]
            if due:
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # the queue may have been cleared meanwhile
            queue.popleft()
            if isinstance(text, str):
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(text)

    def _reply(self, client: _Client, obj: dict[str, Any]) -> None:
        """Queue a protocol reply; it keeps its place in order with the data."""
        if len(client.queue) >= self.queue_limit:
            self._drop_slow(client)
            return
        client.queue.append((0.0, _text(obj)))
        client.wakeup.set()

    async def _receive_loop(self, client: _Client, websocket: WebSocket) -> None:
        while True:
            remaining = client.ping_deadline - time.monotonic()
            if remaining <= 0:
                self.faults.counts["ping_timeouts"] += 1
                self._drop(client, CLOSE_POLICY, "ping timeout")
                return
            try:
                async with asyncio.timeout(remaining):
                    message = await websocket.receive()
            except TimeoutError:
                continue
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive":
                continue
            text = message.get("text")
            if text is None:
                self._reply(client, _error(None, 400, "binary frames are not supported"))
                continue
            self._handle(client, text, time.monotonic())

    def _handle(self, client: _Client, text: str, now: float) -> None:
        """One client message: subscribe, unsubscribe, ping, or an error reply."""
        try:
            msg = json.loads(text)
        except ValueError:
            self._reply(client, _error(None, 400, "message is not valid JSON"))
            return
        if not isinstance(msg, dict):
            self._reply(client, _error(None, 400, "message must be a JSON object"))
            return
        msg_id = msg.get("id")
        kind = msg.get("type")
        if kind == "ping":
            client.ping_deadline = now + self.ping_timeout_s
            if self.faults.pong_disabled:
                self.faults.counts["pongs_withheld"] += 1
            else:
                self._reply(client, {"id": msg_id, "type": "pong"})
        elif kind in ("subscribe", "unsubscribe"):
            self._subscription(client, msg_id, kind, msg)
        elif kind == "pong":
            pass  # a client answering a server ping (only an injected frame is one)
        else:
            self._reply(client, _error(msg_id, 400, f"unknown message type {kind!r}"))

    def _subscription(self, client: _Client, msg_id: Any, kind: str,
                      msg: dict[str, Any]) -> None:
        topic = msg.get("topic")
        if msg.get("privateChannel") is True and client.user is None:
            self._reply(client, _error(msg_id, 401, "private channels need bullet-private"))
            return
        if isinstance(topic, str) and (topic == PRIVATE_TOPIC
                                       or topic.startswith(PRIVATE_TOPIC + ":")
                                       or topic.startswith(POSITION_TOPIC + ":")):
            self._private_subscription(client, msg_id, kind, msg, topic)
            return
        symbols = self._parse_topic(topic)
        if symbols is None:
            self._reply(client, _error(msg_id, 404, f"topic {topic} is not found"))
            return
        if kind == "subscribe":
            new = [s for s in symbols if s not in client.symbols]
            if self._over_limit(client, msg_id, len(new)):
                return
            for symbol in new:
                client.symbols.add(symbol)
                self._subscribers.setdefault(symbol, set()).add(client)
        else:
            for symbol in symbols:
                client.symbols.discard(symbol)
                _unindex(self._subscribers, symbol, client)
        if msg.get("response") is True:
            self._reply(client, {"id": msg_id, "type": "ack"})

    def _over_limit(self, client: _Client, msg_id: Any, more: int) -> bool:
        """Whether ``more`` topics would take ``client`` past :data:`MAX_TOPICS` (public and
        private together); if so, it is told (``error`` 400)."""
        if len(client.symbols) + len(client.private) + more <= MAX_TOPICS:
            return False
        self._reply(client, _error(
            msg_id, 400, f"exceed max subscription count limitation of {MAX_TOPICS}"))
        return True

    def _private_subscription(self, client: _Client, msg_id: Any, kind: str,
                              msg: dict[str, Any], topic: str) -> None:
        """(Un)subscribe ``client`` to its account's order changes (every contract's, or
        the listed contracts')."""
        user = client.user
        if user is None or msg.get("privateChannel") is not True:
            self._reply(client, _error(
                msg_id, 401, f"{topic} is a private channel: subscribe with a bullet-private "
                "token and privateChannel true"))
            return
        if topic == PRIVATE_TOPIC:
            keys = [_ALL]
        else:
            base, _, listed = topic.partition(":")
            symbols = list(dict.fromkeys(s.strip() for s in listed.split(",")))
            if not symbols or not all(self.symbol_known(s) for s in symbols):
                self._reply(client, _error(msg_id, 404, f"topic {topic} is not found"))
                return
            keys = symbols if base == PRIVATE_TOPIC else [_POS + s for s in symbols]
        if kind == "subscribe":
            new = [k for k in keys if k not in client.private]
            if self._over_limit(client, msg_id, len(new)):
                return
            client.private.update(new)
            self._private.setdefault(user, set()).add(client)
        else:
            client.private.difference_update(keys)
            if not client.private:
                _unindex(self._private, user, client)
        if msg.get("response") is True:
            self._reply(client, {"id": msg_id, "type": "ack"})

    def _parse_topic(self, topic: Any) -> list[str] | None:
        """The symbols of a level3v2 topic, or None if any part is unknown."""
        if not isinstance(topic, str) or not topic.startswith(TOPIC_PREFIX):
            return None
        symbols = [s.strip() for s in topic[len(TOPIC_PREFIX):].split(",")]
        if not symbols or not all(self.symbol_known(s) for s in symbols):
            return None
        return list(dict.fromkeys(symbols))


def _unindex(index: dict[str, set[_Client]], key: str, client: _Client) -> None:
    """Take ``client`` out of ``index[key]``, and the key out once its set is empty."""
    held = index.get(key)
    if held is not None:
        held.discard(client)
        if not held:
            del index[key]


def _error(msg_id: Any, code: int, data: str) -> dict[str, Any]:
    return {"id": msg_id, "type": "error", "code": code, "data": data}
