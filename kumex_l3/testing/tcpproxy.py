"""A TCP proxy in a thread, for faults no real server makes on demand.

``with TcpProxy("127.0.0.1", redis_port) as proxy:`` listens on a free port
(:attr:`TcpProxy.port`) and forwards every connection to the target.
:meth:`TcpProxy.blackhole` makes the connections open at that moment silent
both ways while they stay open (what a half-open connection looks like after
a failover, a NAT table flush or a partition: no reset, no reply, ever); the
connections made after it pass as before. The peers learn nothing: only a
deadline of their own gets them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Self

from kumex_l3.testing.devredis import free_port

__all__ = ["TcpProxy"]

_CHUNK = 65536


class _Pair:
    """One proxied connection; ``silent`` drops whatever either side sends."""

    def __init__(self) -> None:
        self.silent = False
        self.writers: list[asyncio.StreamWriter] = []


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``host:target_port`` (module doc)."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host, self.target_port = host, target_port
        self.port = free_port()
        self._pairs: list[_Pair] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._stop: asyncio.Event

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def blackhole(self) -> int:
        """Silence every connection open now (they stay open); how many."""
        return asyncio.run_coroutine_threadsafe(self._silence(), self._loop).result(10)

    async def _silence(self) -> int:
        for pair in self._pairs:
            pair.silent = True
        return len(self._pairs)

    def close(self) -> None:
        """Close every connection and stop listening."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for pair in list(self._pairs):
                for w in pair.writers:
                    w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        pair = _Pair()
        pair.writers = [client_w, server_w]
        self._pairs.append(pair)
        try:
            await asyncio.gather(_pipe(client_r, server_w, pair), _pipe(server_r, client_w, pair))
        except asyncio.CancelledError:
            pass  # closing: asyncio's server would log a cancelled connection task
        finally:
            self._pairs.remove(pair)
            for w in pair.writers:
                w.transport.abort()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: _Pair) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await src.read(_CHUNK):
            if pair.silent:
                continue  # swallowed: neither side hears of it, nor of anything after
            dst.write(data)
            await dst.drain()
    if pair.silent:
        await asyncio.Event().wait()  # a silent connection is never closed by us
    dst.close()  # the other direction ends when its peer closes in turn
