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


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client (bytes in, bytes out), closed after the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client (bytes in, bytes out), closed after the test."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()
