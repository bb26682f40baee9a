"""One WebSocket client of ``/ws/book/{symbol}``: pushed the book on change, or relayed.

On the replica that owns the symbol, the client gets the ``GET /book`` body
whenever it changes, at most once per ``BOOK_WS_THROTTLE_SECONDS`` (always the
latest: nothing queues up), and ``{"symbol", "synced": false, "detail"}`` while
the book is not served; a client that cannot take a message within
``BOOK_WS_SEND_TIMEOUT_SECONDS`` is dropped. Elsewhere the socket relays the
owner's, pinging it (``BOOK_WS_RELAY_PING_SECONDS``) and following ownership.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Final

import redis.asyncio
import redis.exceptions
from fastapi import WebSocket
from starlette.websockets import WebSocketState
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from kumex_l3.logs import kv
from kumex_l3.tasks import race
from services.book.consumer import SymbolConsumer
from services.book.metrics import BookMetrics
from services.book.peers import PROXY_HEADER, Peers
from services.book.replicas import BookService
from services.book.settings import BookSettings

__all__ = ["WsSession"]

log = logging.getLogger(__name__)

#: How long a relay waits before connecting to the owner again.
_RELAY_RETRY_S: Final = 1.0
#: How often a relay looks at who owns its symbol now.
_RELAY_WATCH_S: Final = 1.0


class _SlowClient(Exception):
    """A WebSocket client did not take a message in time."""


class WsSession:
    """One WebSocket client: pushes local changes, or relays the owner's socket."""

    def __init__(self, websocket: WebSocket, symbol: str, depth: int, service: BookService,
                 peers: Peers, settings: BookSettings, metrics: BookMetrics, *,
                 proxied: bool, own: bool = False, token: str | None = None) -> None:
        self.ws = websocket
        #: Whether this client may see the user's own orders (and the token it showed,
        #: passed on to the owner when relaying).
        self.own = own
        self.token = token
        self.symbol = symbol
        self.depth = depth
        self.service = service
        self.peers = peers
        self.settings = settings
        self.metrics = metrics
        self.proxied = proxied
        self._last: bytes | str | None = None

    async def run(self) -> None:
        pushed, _ = await race(self._push(), self._listen())
        if isinstance(pushed, _SlowClient):
            self.metrics.ws_dropped.labels(self.symbol).inc()
            log.info("slow WebSocket client dropped", extra=kv(symbol=self.symbol))
            await self._close(1008, "too slow")
        elif pushed is None and self.ws.client_state is WebSocketState.CONNECTED:
            await self._close(1000, "")
        elif isinstance(pushed, Exception):
            # Mostly a client gone in the middle of a send.
            log.debug("WebSocket session ended: %r", pushed, extra=kv(symbol=self.symbol))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.ws.close(code=code, reason=reason)

    async def _listen(self) -> None:
        # Clients have nothing to say; reading notices their leaving at once.
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return

    async def _send(self, text: bytes | str) -> None:
        if text == self._last:
            return
        data = text.decode() if isinstance(text, bytes) else text
        try:
            async with asyncio.timeout(self.settings.ws_send_timeout_seconds):
                await self.ws.send_text(data)
        except TimeoutError:
            raise _SlowClient from None
        self._last = text

    async def _push(self) -> None:
        while True:
            consumer = self.service.local(self.symbol)
            if consumer is not None:
                await self._push_local(consumer)
            elif self.proxied:
                # Forwarded here by a replica that thinks we own it: let it look again.
                await self._send(_status(self.symbol, "not served by this replica"))
                return
            else:
                await self._relay()

    async def _push_local(self, consumer: SymbolConsumer) -> None:
        throttle = self.settings.ws_throttle_seconds
        sent_at = float("-inf")
        while consumer.active and self.service.local(self.symbol) is consumer:
            changed = consumer.changed
            body = (consumer.ws_body(self.depth, own=self.own) if consumer.serving
                    else consumer.status_body())
            if body != self._last:
                wait = sent_at + throttle - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # send what is current after the pause
                await self._send(body)
                sent_at = time.monotonic()
            await changed.wait()

    async def _relay(self) -> None:
        try:
            owner = await self.service.owner_of(self.symbol)
        except (redis.exceptions.RedisError, OSError):
            owner = None
        if (owner is None or owner.url is None or owner.id == self.service.owner.id
                or not self.peers.allowed(owner.url)):
            await self._send(_status(self.symbol, f"no replica serves {self.symbol} right now"))
            await asyncio.sleep(_RELAY_RETRY_S)
            return
        url = ("ws" + owner.url[4:] if owner.url.startswith("http") else owner.url)
        url = f"{url}/ws/book/{self.symbol}?depth={self.depth}"
        headers = {PROXY_HEADER: self.service.owner.id}
        if self.own and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        ping = self.settings.ws_relay_ping_seconds
        try:
            async with ws_connect(url, additional_headers=headers,
                                  open_timeout=self.settings.proxy_timeout_seconds,
                                  ping_interval=ping, ping_timeout=ping,
                                  max_size=self.settings.proxy_max_bytes) as upstream:

                async def pump() -> None:
                    async for message in upstream:
                        await self._send(message)

                pumped, _ = await race(pump(), self._watch(owner.id))
                if isinstance(pumped, _SlowClient):
                    raise pumped
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.info("WebSocket relay to the owner ended: %s", exc or type(exc).__name__,
                     extra=kv(symbol=self.symbol, owner=owner.id))
        await asyncio.sleep(_RELAY_RETRY_S / 4)

    async def _watch(self, owner_id: str) -> None:
        """Return when the symbol is not ``owner_id``'s any more (here, elsewhere, nobody's)."""
        while True:
            await asyncio.sleep(_RELAY_WATCH_S)
            if self.service.local(self.symbol) is not None:
                return
            try:
                now = await self.service.owner_of(self.symbol)
            except (redis.exceptions.RedisError, OSError):
                continue
            if now is None or now.id != owner_id:
                return


def _status(symbol: str, detail: str) -> str:
    return json.dumps({"symbol": symbol, "synced": False, "detail": detail},
                      separators=(",", ":"))
