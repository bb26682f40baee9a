"""The one place that builds Redis clients, and what every service needs around them.

Every service and tool builds its clients here, so that they all behave the
same way, whatever redis-py's defaults are (they moved between versions: the
5.x clients had no socket timeout at all, the 8.x ones time out every read at
5 s, which a longer ``BLOCK`` would hit):

- **Deadlines.** ``socket_timeout`` is the command deadline plus the longest
  ``BLOCK`` the client sends (a blocked ``XREAD`` is not a stuck one), and
  ``socket_connect_timeout`` the command deadline. A connection that went
  silent (a partition, a failover behind an address) ends in an error, never
  in a wait of TCP's hours.
- **No hidden retries.** Each service's own loops retry with backoff, count
  the errors and say so in ``/readyz``; a retry inside the client would add
  its waits to theirs unseen (``Retry(NoBackoff(), 0)``).
- **A name.** ``CLIENT LIST`` shows ``kumex-<service>``: at 3 a.m. an operator
  sees who holds which connection.
- **Health checks** of a connection idle for 30 s before it is used again.

Around the clients: which errors pass (:func:`is_transient`: connection errors
and the replies Redis gives only for a while, such as ``OOM``, ``READONLY``
or ``LOADING``), Lua scripts sent by digest and loaded again when a restarted
Redis forgot them (:class:`LuaScript`), and stream entry ids
(:func:`parse_stream_id`, :func:`stream_id_ms`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.cluster
import redis.exceptions
import redis.retry
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.typing import EncodableT

__all__ = [
    "CONNECTION_ERRORS",
    "DEFAULT_TIMEOUT_S",
    "HEALTH_CHECK_S",
    "TRANSIENT_REPLIES",
    "LuaScript",
    "client_options",
    "cluster_seeds",
    "connect",
    "connect_sync",
    "is_transient",
    "parse_stream_id",
    "stream_id_ms",
]

#: The command deadline when a service sets none (seconds).
DEFAULT_TIMEOUT_S: Final = 5.0
#: A connection idle this long is checked (``PING``) before it is used again.
HEALTH_CHECK_S: Final = 30
#: Connections a Redis Cluster client may open to one node (one per blocked read and
#: per command in flight: a book replica blocks one read per symbol on a cluster).
_CLUSTER_CONNECTIONS: Final = 1000
#: Errors of the connection itself: the command may or may not have run; try again.
CONNECTION_ERRORS: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            OSError, asyncio.TimeoutError)
#: Replies Redis gives for a while (memory full, a replica, loading, a cluster moving
#: slots or electing a master, a busy script) and then stops giving.
TRANSIENT_REPLIES: Final = ("OOM", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                            "LOADING", "BUSY", "NOREPLICAS")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may go away by itself (retry with backoff) rather than being a
    refusal that will be given again (``WRONGTYPE``, a script error: count it, move on)."""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        TRANSIENT_REPLIES)


def client_options(name: str, *, timeout: float = DEFAULT_TIMEOUT_S, block: float = 0.0,
                   decode: bool = False, asyncio_client: bool = True) -> dict[str, Any]:
    """The options every client gets (module doc): ``name`` shows in ``CLIENT LIST``
    as ``kumex-<name>``; ``block``: the longest ``BLOCK`` its commands send, seconds."""
    if timeout <= 0 or block < 0:
        raise ValueError("the timeout must be above 0 and the block time not below")
    retry = (redis.asyncio.retry.Retry(NoBackoff(), 0) if asyncio_client
             else redis.retry.Retry(NoBackoff(), 0))
    return {"socket_timeout": timeout + block, "socket_connect_timeout": timeout,
            "retry": retry, "health_check_interval": HEALTH_CHECK_S,
            "client_name": f"kumex-{name}", "decode_responses": decode}


def connect(url: str, name: str, *, timeout: float = DEFAULT_TIMEOUT_S, block: float = 0.0,
            decode: bool = False, cluster: bool = False) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` (no connection is made before the first command).

    With ``cluster``, a Redis Cluster client (:func:`cluster_seeds`: ``url`` may name
    several nodes). It speaks the same commands: every key of a command, pipeline
    entry or script is of one symbol, so of one slot; a pipeline goes node by node.
    It is typed as the plain client, whose commands it shares.
    """
    options = client_options(name, timeout=timeout, block=block, decode=decode)
    if not cluster:
        return redis.asyncio.Redis.from_url(url, **options)
    seeds, username, password = cluster_seeds(url)
    options.pop("retry")
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        username=username, password=password, **options,
        # No hidden retries (module doc), but a command the cluster moved is followed.
        retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        # A replica taking over slots is learned from the first error, not the fifth.
        reinitialize_steps=1, max_connections=_CLUSTER_CONNECTIONS)
    return cast(redis.asyncio.Redis, client)


def connect_sync(url: str, name: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 block: float = 0.0, decode: bool = False,
                 cluster: bool = False) -> redis.Redis:
    """A blocking client for ``url``, for tools (chaos, benchmarks, scripts)."""
    options = client_options(name, timeout=timeout, block=block, decode=decode,
                             asyncio_client=False)
    if not cluster:
        return redis.Redis.from_url(url, **options)
    seeds, username, password = cluster_seeds(url)
    options.pop("retry")
    client = redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
                       for host, port in seeds],
        username=username, password=password, **options, retry=redis.retry.Retry(NoBackoff(), 0))
    return cast(redis.Redis, client)


def cluster_seeds(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """The ``(host, port)`` of each comma-separated node of ``url``, and the credentials
    (``username``, ``password``) of the first, which the whole cluster shares."""
    seeds = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        seeds.append((parts.hostname or "127.0.0.1", parts.port or 6379))
    first = urlsplit(url.split(",")[0].strip())
    return (seeds, unquote(first.username) if first.username else None,
            unquote(first.password) if first.password else None)


class LuaScript:
    """A Lua script sent by its SHA1 (``EVALSHA``), loaded again when Redis forgot it.

    redis-py's ``register_script`` does the same for one call, but in a pipeline it
    asks ``SCRIPT EXISTS`` before every execution; :meth:`run_many` asks only when a
    reply says ``NOSCRIPT`` (a restarted or flushed Redis), then sends the pipeline
    again. Every script here touches the keys of one symbol (one Cluster slot).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, client: redis.asyncio.Redis, keys: Sequence[str],
                  args: Sequence[EncodableT]) -> Any:
        """``EVALSHA`` once (loading the script first if Redis says ``NOSCRIPT``)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[EncodableT]) -> None:
        """Add an ``EVALSHA`` to ``pipe``."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def run_many(self, client: redis.asyncio.Redis,
                       calls: Sequence[tuple[Sequence[str], Sequence[EncodableT]]], *,
                       raise_on_error: bool = False) -> list[Any]:
        """Run the script once per ``(keys, args)`` in one pipeline; the replies, errors
        included unless ``raise_on_error`` (then the first one is raised). A pipeline
        whose replies say ``NOSCRIPT`` ran no script at all: the script is loaded and
        the pipeline sent again."""
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                self.queue(pipe, keys, args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, redis.exceptions.NoScriptError)
                                    for r in results):
                await client.script_load(self.source)
                continue
            if raise_on_error:
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
            return results
        raise AssertionError("unreachable")  # pragma: no cover


def parse_stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as ``(milliseconds, sequence)``, which orders like Redis does
    (``"5-0"`` -> ``(5, 0)``; a bare ``"5"`` -> ``(5, 0)``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def stream_id_ms(entry_id: bytes | str) -> int:
    """The Unix time in milliseconds at which Redis appended the entry ``entry_id``."""
    return parse_stream_id(entry_id)[0]
