"""The feed: exchange WebSocket in, one Redis stream per symbol out.

:class:`Feed` keeps one connection to the exchange (token, connect, welcome,
subscribe ``/contractMarket/level3v2:SYM`` for every symbol, acks checked),
and for each data frame:

* picks the symbol from the frame's ``topic`` (only the envelope is decoded);
* appends the text, unchanged, to the writer's buffer (never waits for Redis);
* and to the capture file when there is one.

Frames without a configured symbol (no topic, another topic, not JSON) are
counted (``kumex_feed_messages_unrouted_total{reason}``) and logged (the first
few, then one in :data:`_LOG_EVERY`): there is no per-symbol place to put them.

On each connection, once subscribed, a ``ctl=connected`` entry (``connectId``)
goes to every symbol's stream ahead of that connection's data, and a snapshot
of every symbol is requested; when it ends, a ``ctl=disconnected`` entry
(``reason``, ``connectId``) follows its data. While subscribed, the key
``kumex:{SYM}:feed`` is set again and again with a short TTL (a heartbeat: it
lapses when the feed dies without a word). Any failure (no welcome, no pong, closed socket,
refused subscribe, token refused) ends the connection; the next one comes
after a jittered exponential backoff, with a fresh token. A connection that
stayed up for at least ``backoff_max`` counts as a success and resets the
backoff (so a server that accepts and then drops at once is not hammered).

:func:`run_feed` wires it all (writer, snapshots, pub/sub requests, HTTP) and
returns after a clean stop: it flushes the buffer to Redis for up to
``FEED_SHUTDOWN_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import httpx
import msgspec
import redis.asyncio
import redis.exceptions
from prometheus_client.metrics import Counter as _Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kumex_l3 import keys
from kumex_l3.backoff import Backoff
from kumex_l3.config import redact_url
from kumex_l3.logs import kv
from kumex_l3.service import start_server
from kumex_l3.tasks import cancel_and_wait
from kumex_l3.wsclient import (
    Connection,
    FrameKind,
    WsClient,
    WsOptions,
    is_retryable,
    level3_topic,
)
from services.feed.capture import Capture
from services.feed.metrics import FeedMetrics
from services.feed.settings import FeedSettings
from services.feed.snapshots import Snapshotter
from services.feed.web import make_app
from services.feed.writer import StreamWriter

__all__ = ["Feed", "make_backoff", "run_feed"]

_log = logging.getLogger(__name__)

#: Unrouted frames: the first ones are logged, then one in this many.
_LOG_EVERY: Final = 1000
_LOG_FIRST: Final = 10
#: Capture flush period, seconds.
_CAPTURE_FLUSH_S: Final = 1.0


def make_backoff(settings: FeedSettings) -> Callable[[], Backoff]:
    """A factory of fresh backoff policies with the configured limits."""
    def factory() -> Backoff:
        return Backoff(settings.backoff_initial, settings.backoff_factor, settings.backoff_max)
    return factory


class Feed:
    """The connection loop and the frame router (see the module docstring)."""

    def __init__(
        self,
        ws: WsClient,
        symbols: Sequence[str],
        writer: StreamWriter,
        snapshots: Snapshotter,
        metrics: FeedMetrics,
        *,
        backoff: Backoff,
        capture: Capture | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ws = ws
        self.symbols = tuple(symbols)
        self._topics = [level3_topic(s) for s in self.symbols]
        self._writer = writer
        self._snapshots = snapshots
        self._metrics = metrics
        self._backoff = backoff
        self._capture = capture
        self._clock = clock
        self.connect_id: str | None = None
        self.subscribed = False
        # Set on each subscription: the heartbeat is written at once, not a beat later.
        self._beat_now = asyncio.Event()
        self.connections = 0
        self._unrouted = 0
        # Per-topic (symbol, counter child), looked up once: one dict lookup a frame.
        self._routes: dict[str, tuple[str, _Counter]] = {
            level3_topic(s): (s, metrics.received.labels(s)) for s in self.symbols}

    @property
    def ready(self) -> bool:
        """Connected and subscribed to every symbol."""
        return self.subscribed

    def status(self) -> dict[str, Any]:
        """For ``/readyz``."""
        return {
            "ready": self.ready,
            "connected": self.subscribed,
            "connectId": self.connect_id,
            "symbols": list(self.symbols),
            "buffered": len(self._writer.buffer),
            "redis": self._writer.redis_ok.is_set(),
        }

    async def run(self) -> None:
        """Connect, read, reconnect, forever (cancel to stop). Raises only on a bug."""
        while True:
            up_since: float | None = None
            reason = "connection ended"
            try:
                async with self._ws.connect(self._topics) as conn:
                    up_since = self._clock()
                    self._on_subscribed(conn)
                    await self._read(conn)
            except asyncio.CancelledError:
                reason = "the feed is stopping"
                raise
            except Exception as exc:
                if not is_retryable(exc):
                    reason = f"{type(exc).__name__}: {exc}"
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._disconnected(reason)
            if up_since is not None and self._clock() - up_since >= self._backoff.max_delay:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            self._metrics.reconnects.inc()
            _log.warning("exchange connection ended; reconnecting", extra=kv(
                error=reason[:300], retry_in=f"{delay:.2f}s", attempt=self._backoff.attempts))
            await asyncio.sleep(delay)

    async def heartbeat(self, client: redis.asyncio.Redis, ttl: float) -> None:
        """Keep ``kumex:{SYM}:feed`` alive while subscribed (cancel to stop).

        Set at each subscription and every ``ttl / 5`` seconds, with that
        ``ttl``, on a client of its own so that a backlog of writes does not
        delay it. Not refreshed while disconnected: it lapses, and so it does
        when this process dies.
        """
        interval, ttl_ms = ttl / 5, max(1, int(ttl * 1000))
        failing = False
        while True:
            self._beat_now.clear()
            if self.subscribed:
                value = msgspec.json.encode({"connectId": self.connect_id,
                                             "at": time.time_ns() // 1_000_000})
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for symbol in self.symbols:
                            pipe.set(keys.feed_alive(symbol), value, px=ttl_ms)
                        await pipe.execute()
                    failing = False
                except (redis.exceptions.RedisError, OSError) as exc:
                    self._metrics.redis_errors.labels("heartbeat").inc()
                    if not failing:
                        _log.warning("heartbeat not written", extra=kv(
                            error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                    failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._beat_now.wait()

    def _on_subscribed(self, conn: Connection) -> None:
        self.connect_id = conn.connect_id
        self.subscribed = True
        self._beat_now.set()
        self.connections += 1
        self._metrics.connections.inc()
        self._metrics.connected.set(1)
        for symbol in self.symbols:
            self._writer.control(symbol, "connected", connectId=conn.connect_id)
        _log.info("connected and subscribed", extra=kv(
            connectId=conn.connect_id, endpoint=conn.server.endpoint,
            symbols=",".join(self.symbols), pingInterval=conn.server.ping_interval))
        for symbol in self.symbols:
            self._snapshots.request(symbol, 0, reason="connected")

    def _disconnected(self, reason: str) -> None:
        """After a subscribed connection: ``ctl=disconnected`` to every stream, after its data.

        Consumers then know the exchange may have moved on without them (the
        book stops serving until it is shown current again).
        """
        if self.subscribed:
            self._metrics.connected.set(0)
            for symbol in self.symbols:
                self._writer.control(symbol, "disconnected", reason=reason[:300],
                                     connectId=self.connect_id or "")
        self.subscribed = False

    async def _read(self, conn: Connection) -> None:
        writer, capture, routes = self._writer, self._capture, self._routes
        data = FrameKind.DATA
        while True:
            frame = await conn.recv_frame()
            topic = frame.topic
            route = routes.get(topic) if topic is not None and frame.kind is data else None
            if route is None:
                self._unroutable(frame.kind, frame.topic, frame.text)
                continue
            symbol, counter = route
            counter.inc()
            if capture is not None:
                capture.write(frame.text)
            writer.append(symbol, frame.text)

    def _unroutable(self, kind: FrameKind, topic: str | None, text: str) -> None:
        if kind is FrameKind.INVALID:
            reason = "invalid"
        elif kind is not FrameKind.DATA:
            reason = "unknown_type"
        elif topic is None:
            reason = "no_topic"
        else:
            reason = "unknown_topic"
        self._metrics.unrouted.labels(reason).inc()
        self._unrouted += 1
        if self._unrouted <= _LOG_FIRST or self._unrouted % _LOG_EVERY == 0:
            _log.warning("frame with no configured symbol: not stored", extra=kv(
                reason=reason, topic=topic, count=self._unrouted, frame=text[:200]))


async def _flush_capture(capture: Capture) -> None:
    while True:
        await asyncio.sleep(_CAPTURE_FLUSH_S)
        capture.flush()


def _redis_factory(settings: FeedSettings, name: str) -> Callable[[], redis.asyncio.Redis]:
    def connect() -> redis.asyncio.Redis:
        # No hidden retries: our own loops retry with backoff and count the errors.
        return redis.asyncio.Redis.from_url(
            settings.redis_url, decode_responses=False,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 0), client_name=name)
    return connect


async def run_feed(settings: FeedSettings, stop: asyncio.Event) -> int:
    """Run the feed until ``stop`` is set; the exit status (0 clean, 1 a task failed)."""
    metrics = FeedMetrics()
    new_backoff = make_backoff(settings)
    writer_redis = _redis_factory(settings, "kumex-feed-writer")()
    heartbeat_redis = _redis_factory(settings, "kumex-feed-heartbeat")()
    writer = StreamWriter(writer_redis, metrics, buffer_max=settings.buffer_max,
                          batch_size=settings.batch_size, maxlen=settings.stream_maxlen,
                          backoff=new_backoff())
    http = httpx.AsyncClient(timeout=settings.http_timeout)
    ws = WsClient(settings.base_url, http=http, options=WsOptions(
        token_timeout=settings.http_timeout, open_timeout=settings.http_timeout,
        welcome_timeout=settings.welcome_timeout,
        subscribe_timeout=settings.subscribe_timeout, compression=settings.ws_compression))
    snapshots = Snapshotter(http, settings.base_url, settings.symbols, writer, metrics,
                            per_min=settings.snapshot_per_min, backoff=new_backoff)
    capture = Capture(settings.capture, metrics) if settings.capture is not None else None
    feed = Feed(ws, settings.symbols, writer, snapshots, metrics, backoff=new_backoff(),
                capture=capture)
    _log.info("feed starting", extra=kv(
        base_url=settings.base_url, redis=redact_url(settings.redis_url),
        symbols=",".join(settings.symbols), snapshot_per_min=settings.snapshot_per_min,
        buffer_max=settings.buffer_max, maxlen=settings.stream_maxlen,
        capture=str(settings.capture) if capture is not None else "off"))

    server, server_task = await start_server(make_app(feed.status, metrics.registry),
                                             settings.http_host, settings.http_port,
                                             name="feed-http")
    _log.info("http listening", extra=kv(host=settings.http_host, port=server.port))
    writer_task = asyncio.create_task(writer.run(), name="feed-writer")
    workers = [
        asyncio.create_task(feed.run(), name="feed-ws"),
        asyncio.create_task(feed.heartbeat(heartbeat_redis, settings.heartbeat_ttl_seconds),
                            name="feed-heartbeat"),
        asyncio.create_task(snapshots.run(), name="feed-snapshots"),
        asyncio.create_task(snapshots.listen(_redis_factory(settings, "kumex-feed-requests")),
                            name="feed-snapshot-requests"),
    ]
    if capture is not None:
        workers.append(asyncio.create_task(_flush_capture(capture), name="feed-capture"))
    stop_task = asyncio.create_task(stop.wait(), name="feed-stop")
    status = 0
    try:
        done, _ = await asyncio.wait([stop_task, writer_task, server_task, *workers],
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_task:
                status = 1
                exc = None if task.cancelled() else task.exception()
                _log.error("task ended unexpectedly; stopping", extra=kv(task=task.get_name()),
                           exc_info=exc)
        _log.info("stopping")
    finally:
        await cancel_and_wait(stop_task, *workers)
        feed._disconnected("the feed is stopping")
        writer.close()
        try:
            await asyncio.wait_for(asyncio.shield(writer_task), settings.shutdown_timeout)
        except TimeoutError:
            await cancel_and_wait(writer_task)
        except Exception as exc:
            _log.error("writer failed", exc_info=exc)
            status = 1
        else:
            _log.info("buffer flushed", extra=kv(remaining=len(writer.buffer)))
        if capture is not None:
            capture.close()
        server.should_exit = True
        await asyncio.gather(server_task, return_exceptions=True)
        await http.aclose()
        await writer_redis.aclose()
        await heartbeat_redis.aclose()
    _log.info("feed stopped", extra=kv(status=status))
    return status
