"""Fixtures shared by every test: one real Redis for the whole run.

The server is a throwaway ``redis-server`` on a free port (never 6379, where a
system Redis may live), started by :mod:`kumex_l3.testing.devredis`. Each test that
asks for ``redis_url`` (or a client built on it) starts from an empty Redis.
Area-specific fixtures belong in ``tests/<area>/conftest.py``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from kumex_l3.testing.devcluster import RedisClusterServers
from kumex_l3.testing.devredis import RedisServer

# The repository root on sys.path: `bench` is not an installed package (`kumex_l3`
# and `services` are, editable, by `make venv`; this also covers a bare pytest run).
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole test session; do not stop it in a test."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, after a FLUSHALL: every test starts from empty."""
    from kumex_l3.testing.procs import flush_redis  # after the root is on sys.path (above)

    return flush_redis(redis_server.url)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """One real Redis Cluster (three masters, one replica each) for the session, started
    by the first test that asks; a test that kills a node revives it before it ends."""
    with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    """Every node of the session's cluster (``REDIS_URL``, comma-separated), after a
    FLUSHALL of each master."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.cluster)])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """One Redis, then the Redis Cluster: a test module that overrides ``redis_url`` with
    this runs each of its tests on both (services see ``REDIS_CLUSTER=true`` when the URL
    lists several nodes: kumex_l3.testing.procs)."""
    return str(request.getfixturevalue("redis_url" if request.param == "redis"
                                       else "cluster_url"))


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client (bytes in, bytes out), closed after the test; a cluster
    client when ``redis_url`` is a cluster's."""
    from kumex_l3.testing.procs import is_cluster_url, sync_client

    client = (sync_client(redis_url, timeout=30) if is_cluster_url(redis_url)
              else redis.Redis.from_url(redis_url, decode_responses=False))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client (bytes in, bytes out), closed after the test; a cluster client
    when ``redis_url`` is a cluster's."""
    from kumex_l3.testing.procs import async_client, is_cluster_url

    client = (async_client(redis_url, timeout=30) if is_cluster_url(redis_url)
              else redis.asyncio.Redis.from_url(redis_url, decode_responses=False))
    try:
        yield client
    finally:
        await client.aclose()
