"""The other book replicas, as a replica proxying to them sees them.

A request for a symbol owned elsewhere is forwarded to the owner's URL (read from
its lease) with :data:`PROXY_HEADER` set, so that two replicas never bounce it
between them; answers carry :data:`REPLICA_HEADER`. :class:`Peers` checks owner
URLs against ``BOOK_PEER_URL_PATTERN`` and keeps one bounded connection pool per
owner.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from typing import Final

import httpx

from services.book.settings import BookSettings

__all__ = ["PROXY_HEADER", "REPLICA_HEADER", "Peers"]

#: Set on a request forwarded by another replica (its id): never forwarded again.
PROXY_HEADER: Final = "x-kumex-proxied-by"
#: The replica that answered (every book answer carries it).
REPLICA_HEADER: Final = "x-kumex-replica"
#: Owner pools kept at most (the least recently used is closed beyond).
_PEERS_MAX: Final = 64


class Peers:
    """The other replicas, as far as proxying goes: which owner URLs are acceptable, and
    one connection pool per owner (:attr:`BookSettings.proxy_connections`)."""

    def __init__(self, settings: BookSettings) -> None:
        self._settings = settings
        self._pattern = re.compile(settings.peer_url_pattern)
        self._clients: OrderedDict[str, httpx.AsyncClient] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def allowed(self, url: str) -> bool:
        """Whether ``url`` has the shape every replica's URL must have."""
        return self._pattern.fullmatch(url) is not None

    def client(self, url: str) -> httpx.AsyncClient:
        """The pool for the owner at ``url`` (made on first use)."""
        client = self._clients.get(url)
        if client is not None:
            self._clients.move_to_end(url)
            return client
        n = self._settings.proxy_connections
        client = httpx.AsyncClient(
            timeout=self._settings.proxy_timeout_seconds,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        self._clients[url] = client
        while len(self._clients) > _PEERS_MAX:
            _, old = self._clients.popitem(last=False)
            task = asyncio.get_running_loop().create_task(old.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
