"""Exposure: who may read own orders, where services listen, and settings refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from kumex_l3.access import Guard, is_loopback, presented_token
from kumex_l3.config import check_redis_url
from services.book.settings import BookSettings
from services.feed.settings import FeedSettings
from services.order_monitor.settings import MonitorSettings
from services.strategy.settings import StrategySettings

_ROOT = Path(__file__).resolve().parents[2]


def test_the_guard_wants_the_token_or_a_loopback_address() -> None:
    token = Guard(SecretStr("s3cret"), "0.0.0.0")
    assert token.policy == "token"
    assert token.allows("s3cret") and not token.allows("s3cre") and not token.allows(None)
    assert "needs the token" in token.refusal("x", "BOOK_API_TOKEN")
    local = Guard(None, "127.0.0.1")
    assert local.policy == "open" and local.allows(None)
    wide = Guard(None, "0.0.0.0")
    assert wide.policy == "off" and not wide.allows("anything") and not wide.allows(None)
    assert "BOOK_API_TOKEN is not set" in wide.refusal("own orders", "BOOK_API_TOKEN")
    assert is_loopback("::1") and is_loopback("127.0.0.2") and not is_loopback("10.0.0.1")


def test_the_token_is_read_from_the_header_or_the_query() -> None:
    assert presented_token({"authorization": "Bearer abc"}, {}) == "abc"
    assert presented_token({"authorization": "bearer  abc "}, {"token": "x"}) == "abc"
    assert presented_token({}, {"token": "q"}) == "q"
    assert presented_token({"authorization": "Basic abc"}, {}) is None


@pytest.mark.parametrize("settings_type", [FeedSettings, MonitorSettings, StrategySettings])
def test_every_service_listens_on_loopback_by_default(
        settings_type: type[FeedSettings | MonitorSettings | StrategySettings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("FEED_", "MONITOR_", "STRATEGY_", "KUMEX_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STRATEGY_DRY_RUN", "true")
    assert settings_type().http_host == "127.0.0.1"


def test_the_book_listens_on_loopback_and_checks_its_own_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BOOK_"):
            monkeypatch.delenv(name)
    assert BookSettings().host == "127.0.0.1"
    monkeypatch.setenv("BOOK_PUBLIC_URL", "http://book-1:8080/admin")
    with pytest.raises(ValueError, match="BOOK_PEER_URL_PATTERN"):
        BookSettings()


def test_a_read_block_as_long_as_the_age_limit_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet book is confirmed current when a blocked read ends: blocking as long as the
    age limit would make every quiet book answer 503 between two messages."""
    for name in list(os.environ):
        if name.startswith("BOOK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BOOK_MAX_AGE_SECONDS", "2")
    monkeypatch.setenv("BOOK_READ_BLOCK_SECONDS", "1.9")
    assert BookSettings().read_block_seconds == 1.9
    monkeypatch.setenv("BOOK_READ_BLOCK_SECONDS", "2")
    with pytest.raises(ValueError, match=r"BOOK_READ_BLOCK_SECONDS \(2\) must be less than "
                                         r"BOOK_MAX_AGE_SECONDS \(2\)"):
        BookSettings()


@pytest.mark.parametrize(("url", "why"), [
    ("redis://127.0.0.1:99999/0", "port"),
    ("redis://127.0.0.1:0/0", "port"),
    ("redis://127.0.0.1:63x9/0", "port"),
    ("redis://:pw@127.0.0.1:6379/zero", "database"),
    ("redis://:6379/0", "host"),
    ("http://127.0.0.1:6379", "must start with"),
])
def test_a_bad_redis_url_is_refused_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        check_redis_url(url)
    assert "pw" not in str(info.value)
    assert check_redis_url("redis://:pw@redis:6379/2") == "redis://:pw@redis:6379/2"
    assert check_redis_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_a_bad_redis_url_stops_a_service_with_a_message_naming_it() -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEED_", "KUMEX_", "MONITOR_", "REDIS_"))}
    env["REDIS_URL"] = "redis://:hunter2@127.0.0.1:99999/0"
    done = subprocess.run([sys.executable, "-m", "services.order_monitor"], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr and "port" in done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr


def test_a_cluster_url_names_several_nodes_and_needs_redis_cluster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from kumex_l3.config import CommonSettings, redact_url

    seeds = "redis://:pw@10.0.0.1:7000/0,redis://:pw@10.0.0.2:7000"
    monkeypatch.setenv("REDIS_URL", seeds)
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    [error] = info.value.errors()  # what a service prints (kumex_l3.config.load_settings)
    assert "REDIS_CLUSTER=true" in error["msg"] and "pw" not in error["msg"]
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    assert CommonSettings().redis_url == seeds
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:7000/2")
    with pytest.raises(ValueError, match="database 0 alone"):
        CommonSettings()
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:7000/0,redis://10.0.0.2:99999")
    with pytest.raises(ValueError, match="port"):
        CommonSettings()
    assert redact_url(seeds) == "redis://:***@10.0.0.1:7000/0,redis://:***@10.0.0.2:7000"
