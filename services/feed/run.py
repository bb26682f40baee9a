"""The feed process: its parts wired together (:func:`run_feed`).

:class:`FeedRun` builds the parts of one feed process (the stream writer and
its Redis clients, the exchange's lines, the snapshot scheduler, the capture,
the writer and scheduler leases, the HTTP status server), runs them as tasks,
and stops them in order: the lines first, then the buffer flushed to Redis for
up to ``FEED_SHUTDOWN_TIMEOUT`` seconds, then the leases given back, so that a
standby takes over right after the last message written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from typing import Any, Final

import httpx
import redis.asyncio
import redis.exceptions

from kumex_l3 import keys, redis_adapter
from kumex_l3.config import redact_url
from kumex_l3.lease import LeaseManager, LeaseOwner
from kumex_l3.logs import kv
from kumex_l3.service import start_server
from kumex_l3.tasks import cancel_and_wait
from kumex_l3.wsclient import WsClient, WsOptions
from services.feed.capture import Capture
from services.feed.feed import SCHEDULER_ROLE, Feed, make_backoff
from services.feed.metrics import FeedMetrics
from services.feed.settings import FeedSettings
from services.feed.snapshots import Snapshotter
from services.feed.web import make_app
from services.feed.writer import ROLE, StreamWriter

__all__ = ["FeedRun", "default_feed_id", "run_feed"]

_log = logging.getLogger(__name__)

#: How often the capture file is flushed to disk.
_CAPTURE_FLUSH_S: Final = 1.0


def default_feed_id() -> str:
    """``feed-<host>-<pid>-<random>``: unique per process, so that a lease value (the
    fencing token) is never shared by two processes, not even a restart of one."""
    return f"feed-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class FeedRun:
    """One feed process: its parts, made by the constructor; :meth:`run` runs them."""

    def __init__(self, settings: FeedSettings) -> None:
        self.settings = settings
        self.metrics = FeedMetrics()
        self.new_backoff = make_backoff(settings)
        self.feed_id = settings.id or default_feed_id()
        self.writer_redis = self._redis("feed-writer")
        self.heartbeat_redis = self._redis("feed-heartbeat")
        self.lease_redis = self._redis("feed-leases")
        self.publisher = self._redis("feed-requests")
        #: Made by :meth:`run` once the stream heads are read.
        self.feed: Feed | None = None
        self.writer = StreamWriter(
            self.writer_redis, self.metrics, buffer_max=settings.buffer_max,
            batch_size=settings.batch_size, maxlen=settings.stream_maxlen,
            backoff=self.new_backoff(), on_fenced=self._fenced)
        tls = settings.tls()
        self.http = httpx.AsyncClient(timeout=settings.http_timeout, verify=tls)
        self.ws = WsClient(settings.base_url, http=self.http, options=WsOptions(
            tls=tls, token_timeout=settings.http_timeout, open_timeout=settings.http_timeout,
            welcome_timeout=settings.welcome_timeout,
            subscribe_timeout=settings.subscribe_timeout, compression=settings.ws_compression))
        self.snapshots = Snapshotter(
            self.http, settings.base_url, settings.symbols, self.writer, self.metrics,
            per_min=settings.snapshot_per_min, backoff=self.new_backoff,
            burst=settings.snapshot_burst)
        self.capture = (Capture(settings.capture, self.metrics)
                        if settings.capture is not None else None)
        self.owner = LeaseOwner(self.feed_id, None)
        self.leases = LeaseManager(self.lease_redis, ROLE, settings.symbols, self.owner,
                                   ttl=settings.lease_ttl_seconds, on_gained=self._gained,
                                   on_lost=self._lost)
        self.scheduler = LeaseManager(
            self.lease_redis, SCHEDULER_ROLE, ["all"], self.owner,
            ttl=settings.lease_ttl_seconds, on_gained=self._scheduler_gained,
            on_lost=self._scheduler_lost, key=lambda _: keys.feed_scheduler())
        self._publishing: set[asyncio.Task[None]] = set()

    def _redis(self, name: str) -> redis.asyncio.Redis:
        s = self.settings
        return redis_adapter.connect(s.redis_url, name, timeout=s.redis_timeout,
                                     cluster=s.redis_cluster)

    async def _make_feed(self) -> Feed:
        """The lines and their arbiters, from the stream heads Redis holds."""
        s = self.settings
        try:
            async with asyncio.timeout(s.redis_timeout):
                positions = await _heads(self.lease_redis, s.symbols)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            _log.warning("stream heads not read: arbitration starts from the first message",
                         extra=kv(error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            positions = {}
        feed = Feed(self.ws, s.symbols, self.writer, self.metrics, lines=s.lines,
                    wait=s.arbitration_wait_ms / 1000.0, backoff=self.new_backoff,
                    feed_id=self.feed_id, replay_max=s.replay_buffer, positions=positions,
                    capture=self.capture)
        feed.ask_snapshot = self._ask
        return feed

    # -- callbacks ---------------------------------------------------------------

    def _fenced(self, symbol: str) -> None:
        if self.feed is not None:
            self.feed.stand_by(symbol)

    def _ask(self, symbol: str, payload: str) -> None:
        # Through the channel, so that the scheduler hears it whichever feed holds it.
        task = asyncio.get_running_loop().create_task(
            _publish(self.publisher, keys.snapshot_requests(symbol), payload, self.metrics))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _gained(self, symbol: str) -> None:
        resume = False
        try:
            head = (await _heads(self.lease_redis, [symbol]))[symbol]
            last: Any = await self.lease_redis.xrevrange(keys.l3_stream(symbol), count=1)
            ctl = last[0][1].get(keys.FIELD_CTL.encode()) if last else None
            # Mid-session (the writer died, or was fenced off): the stream just goes on.
            resume = head is not None and ctl != b"disconnected"
        except (redis.exceptions.RedisError, OSError) as exc:
            _log.warning("stream head not read: taking over from memory",
                         extra=kv(symbol=symbol, error=f"{type(exc).__name__}: {exc}"))
            head = None
        if self.leases.holds(symbol) and self.feed is not None:
            await self.feed.take_over(symbol, self.owner.to_json(), head, resume=resume)

    async def _lost(self, symbol: str) -> None:
        if self.feed is not None:
            self.feed.stand_by(symbol)

    async def _scheduler_gained(self, _: str) -> None:
        await self.snapshots.activate(self.lease_redis)

    async def _scheduler_lost(self, _: str) -> None:
        self.snapshots.deactivate()

    # -- running -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; the exit status (0 clean, 1 a task failed)."""
        s = self.settings
        feed = self.feed = await self._make_feed()
        _log.info("feed starting", extra=kv(
            feed=self.feed_id, base_url=s.base_url, redis=redact_url(s.redis_url),
            symbols=",".join(s.symbols), lines=s.lines,
            arbitration_wait_ms=s.arbitration_wait_ms, snapshot_per_min=s.snapshot_per_min,
            buffer_max=s.buffer_max, maxlen=s.stream_maxlen,
            capture=str(s.capture) if self.capture is not None else "off"))
        server, server_task = await start_server(make_app(feed.status, self.metrics.registry),
                                                 s.http_host, s.http_port, name="feed-http")
        _log.info("http listening", extra=kv(host=s.http_host, port=server.port))
        writer_task = asyncio.create_task(self.writer.run(), name="feed-writer")
        workers = self._workers(feed)
        stop_task = asyncio.create_task(stop.wait(), name="feed-stop")
        status = 0
        try:
            done, _ = await asyncio.wait([stop_task, writer_task, server_task, *workers],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop_task:
                    status = 1
                    error = None if task.cancelled() else task.exception()
                    _log.error("task ended unexpectedly; stopping",
                               extra=kv(task=task.get_name()), exc_info=error)
            _log.info("stopping")
        finally:
            await cancel_and_wait(stop_task, *workers)
            if not await self._flush(feed, writer_task):
                status = 1
            await self._close(server, server_task)
        _log.info("feed stopped", extra=kv(status=status))
        return status

    def _workers(self, feed: Feed) -> list[asyncio.Task[None]]:
        s = self.settings
        workers = [
            asyncio.create_task(feed.run(), name="feed-lines"),
            asyncio.create_task(self.leases.run(), name="feed-leases"),
            asyncio.create_task(self.scheduler.run(), name="feed-scheduler-lease"),
            asyncio.create_task(feed.heartbeat(self.heartbeat_redis, s.heartbeat_ttl_seconds),
                                name="feed-heartbeat"),
            asyncio.create_task(self.snapshots.run(), name="feed-snapshots"),
            asyncio.create_task(self.snapshots.publish_due(lambda: self._redis("feed-due")),
                                name="feed-snapshot-due"),
            asyncio.create_task(self.snapshots.listen(lambda: self._redis("feed-listen")),
                                name="feed-snapshot-requests"),
        ]
        if self.capture is not None:
            workers.append(asyncio.create_task(_flush_capture(self.capture),
                                               name="feed-capture"))
        return workers

    async def _flush(self, feed: Feed, writer_task: asyncio.Task[None]) -> bool:
        """End the session and write what is buffered; ``False`` if the writer failed."""
        feed.end_session("the feed is stopping")
        self.writer.close()
        try:
            await asyncio.wait_for(asyncio.shield(writer_task), self.settings.shutdown_timeout)
        except TimeoutError:
            await cancel_and_wait(writer_task)
        except Exception as exc:
            _log.error("writer failed", exc_info=exc)
            return False
        else:
            _log.info("buffer flushed", extra=kv(remaining=len(self.writer.buffer)))
        return True

    async def _close(self, server: Any, server_task: asyncio.Task[None]) -> None:
        # Given back once the buffer is written: a standby takes over right after it.
        await self.leases.close()
        await self.scheduler.close()
        await asyncio.gather(*self._publishing, return_exceptions=True)
        if self.capture is not None:
            self.capture.close()
        server.should_exit = True
        await asyncio.gather(server_task, return_exceptions=True)
        await self.http.aclose()
        for client in (self.writer_redis, self.heartbeat_redis, self.lease_redis,
                       self.publisher):
            await client.aclose()


async def run_feed(settings: FeedSettings, stop: asyncio.Event) -> int:
    """Run the feed until ``stop`` is set; the exit status (0 clean, 1 a task failed)."""
    return await FeedRun(settings).run(stop)


async def _flush_capture(capture: Capture) -> None:
    while True:
        await asyncio.sleep(_CAPTURE_FLUSH_S)
        capture.flush()


async def _heads(client: redis.asyncio.Redis, symbols: Sequence[str]) -> dict[str, int | None]:
    """The last sequence written to each stream (``kumex:{SYM}:l3:last``), where known."""
    async with client.pipeline(transaction=False) as pipe:
        for symbol in symbols:
            pipe.get(keys.stream_head(symbol))
        values: list[Any] = await pipe.execute()
    return {s: _int(v) for s, v in zip(symbols, values, strict=True)}


def _int(value: Any) -> int | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else None


async def _publish(client: redis.asyncio.Redis, channel: str, payload: str,
                   metrics: FeedMetrics) -> None:
    try:
        await client.publish(channel, payload)
    except (redis.exceptions.RedisError, OSError) as exc:
        metrics.redis_errors.labels("publish").inc()
        _log.warning("snapshot request not published", extra=kv(
            channel=channel, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
