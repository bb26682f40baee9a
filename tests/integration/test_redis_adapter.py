"""kumex_l3.redis_adapter against a real Redis: the clients every service builds."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.asyncio
import redis.exceptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kumex_l3.redis_adapter import (
    LuaScript,
    connect,
    connect_sync,
    is_transient,
    parse_stream_id,
    stream_id_ms,
)
from kumex_l3.testing.tcpproxy import TcpProxy


def _through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"{netloc[0]}@{proxy.url_host}" if len(netloc) == 2 else proxy.url_host
    return urlunsplit(parts._replace(netloc=host))


async def test_clients_are_named_and_deadlined(redis_url: str, redis_sync: redis.Redis) -> None:
    """Named in CLIENT LIST; the socket deadline covers the longest BLOCK; no retries."""
    client = connect(redis_url, "probe", timeout=2.0, block=1.5)
    try:
        await client.ping()
        names = [c["name"] for c in redis_sync.client_list()]
        assert "kumex-probe" in names
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 3.5 and kwargs["socket_connect_timeout"] == 2.0
        # Blocked for 1.5 s on a deadline of 2 s: an answer, not a timeout.
        assert await client.xread({"adapter:none": "$"}, block=1500) in ([], {}, None)
    finally:
        await client.aclose()
    tool = connect_sync(redis_url, "tool", decode=True)
    try:
        assert tool.client_getname() == "kumex-tool"
        tool.set("adapter:k", "v")
        assert tool.get("adapter:k") == "v"  # decoded
    finally:
        tool.close()


async def test_a_silent_connection_ends_at_the_deadline_and_is_made_again(
        redis_url: str, redis_sync: redis.Redis) -> None:
    """A connection that stops answering ends in TimeoutError at the client's deadline
    (not at a library default), surfaced to the caller whose loop retries and counts;
    the next command makes a new connection."""
    where = redis_sync.connection_pool.connection_kwargs
    with TcpProxy(where["host"], where["port"]) as proxy:
        client = connect(_through(redis_url, proxy), "silenced", timeout=0.5)
        try:
            await client.set("adapter:k", "1")
            assert proxy.blackhole() == 1
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.get("adapter:k")
            # The next command makes a new connection, which passes.
            assert await client.get("adapter:k") == b"1"
        finally:
            await client.aclose()


async def test_scripts_are_loaded_again_when_redis_forgot_them(
        redis_client: redis.asyncio.Redis) -> None:
    script = LuaScript("return redis.call('INCR', KEYS[1]) + tonumber(ARGV[1])")
    await redis_client.script_flush()
    assert await script.run(redis_client, ["adapter:n"], [10]) == 11
    assert await script.run(redis_client, ["adapter:n"], [10]) == 12
    await redis_client.script_flush()
    results = await script.run_many(redis_client, [(["adapter:n"], [0]), (["adapter:m"], [5])])
    assert results == [3, 6]  # each call ran exactly once
    await redis_client.set("adapter:s", "text")
    results = await script.run_many(redis_client, [(["adapter:s"], [0]), (["adapter:n"], [0])])
    assert isinstance(results[0], redis.exceptions.ResponseError) and results[1] == 4
    with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
        await script.run_many(redis_client, [(["adapter:n"], [0]), (["adapter:s"], [0])],
                              raise_on_error=True)
    assert await redis_client.get("adapter:n") == b"5"  # the pipeline ran: n went on


def test_errors_that_pass_and_errors_that_stay() -> None:
    assert is_transient(redis.exceptions.ConnectionError("reset"))
    assert is_transient(redis.exceptions.TimeoutError("slow"))
    assert is_transient(OSError("unreachable"))
    assert is_transient(redis.exceptions.ResponseError("OOM command not allowed"))
    assert is_transient(redis.exceptions.ReadOnlyError("READONLY You can't write"))
    assert is_transient(redis.exceptions.ResponseError("LOADING Redis is loading"))
    assert not is_transient(redis.exceptions.ResponseError("WRONGTYPE Operation against"))
    assert not is_transient(redis.exceptions.ResponseError("ERR Error running script"))
    assert not is_transient(ValueError("a bug"))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 2**40), st.integers(0, 2**20)), min_size=2,
                max_size=8, unique=True))
def test_stream_ids_order_as_redis_orders_them(redis_sync: redis.Redis,
                                               ids: list[tuple[int, int]]) -> None:
    redis_sync.delete("adapter:ids")
    for ms, seq in sorted(ids):
        redis_sync.xadd("adapter:ids", {"f": "v"}, id=f"{ms}-{seq}")
    stored = [entry_id for entry_id, _ in redis_sync.xrange("adapter:ids")]
    assert sorted(stored, key=parse_stream_id) == stored
    assert [parse_stream_id(i) for i in stored] == sorted(ids)
    assert [stream_id_ms(i) for i in stored] == [ms for ms, _ in sorted(ids)]
    assert parse_stream_id("7") == (7, 0)


@pytest.mark.cluster
async def test_on_a_cluster_a_pipeline_of_scripts_goes_node_by_node(cluster_url: str) -> None:
    """With ``cluster=True`` the client follows the slots: one pipeline of scripts over keys
    of many symbols (many slots, on every master) runs each once, loading the script on
    the masters that forgot it; a command over two symbols is refused (why the book
    reads one slot per command on a cluster)."""
    client = connect(cluster_url, "probe", cluster=True)
    script = LuaScript("return redis.call('INCR', KEYS[1]) + tonumber(ARGV[1])")
    names = [f"kumex:{{S{i}}}:n" for i in range(12)]
    try:
        await client.script_flush()  # on every master; the client learns the slots
        masters = {client.get_node_from_key(k).name for k in names}  # type: ignore[attr-defined]
        assert len(masters) == 3
        assert await script.run_many(client, [([k], [0]) for k in names]) == [1] * 12
        assert await script.run(client, [names[0]], [10]) == 12
        await client.script_flush()
        assert await script.run_many(client, [([k], [0]) for k in names]) == [3] + [2] * 11
        with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
            await client.xread({names[1]: "0", names[2]: "0"})
    finally:
        await client.aclose()
    tool = connect_sync(cluster_url, "tool", decode=True, cluster=True)
    try:
        assert tool.get(names[5]) == "2"
    finally:
        tool.close()
