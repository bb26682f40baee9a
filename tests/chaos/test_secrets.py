"""Secrets never leak: not in logs, Redis, metrics or error messages.

The whole system runs as real processes (sandbox, feed, book, order monitor,
grid strategy) with distinctive credentials: an API key set the sandbox
accepts (``SANDBOX_API_KEYS``) given to the monitor and the strategy, and a
password on Redis (``RedisServer(password=...)``, in every ``REDIS_URL``).
The grid places orders, gets filled (another user sells into it), places
its counter-orders and cancels everything on SIGTERM. Then every process
log, every Redis key and value (all types, streams included), every
``/metrics`` page and status page, and the error replies of badly signed REST
calls are searched for the secret, the passphrase (plain, and as the
version-2 header sends it: HMAC'ed with the secret, replayable), the Redis
password (plain and URL-quoted) and the expected signature of the refused
calls: none is found. The book service also shows no write endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final
from urllib.parse import quote

import httpx
import pytest
import redis

from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, metric, wait_for
from kumex_l3.testing.sandbox_proc import DemoKey, KcAuth, SandboxProcess

SYM = "XBTUSDM"
TICK = Decimal("0.1")

GRID_KEY: Final = DemoKey("chaos-grid-key", "S3cr3t-chaos-grid-5f1e0b7a9c2d",
                          "Pass-chaos-grid-8c41d2e6")
TAKER_KEY: Final = DemoKey("chaos-taker-key", "S3cr3t-chaos-taker-a07e6b1f",
                           "Pass-chaos-taker-19d3c5aa")
#: With characters a URL must quote: the services must unquote it, and leak neither form.
REDIS_PASSWORD: Final = "Redis-chaos-pw-3b9e71/@:%"


def _signed_passphrase(key: DemoKey) -> str:
    digest = hmac.new(key.secret.encode(), key.passphrase.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


#: Everything that must never show up anywhere.
NEEDLES: Final = {
    "grid secret": GRID_KEY.secret, "grid passphrase": GRID_KEY.passphrase,
    "grid signed passphrase": _signed_passphrase(GRID_KEY),
    "taker secret": TAKER_KEY.secret, "taker passphrase": TAKER_KEY.passphrase,
    "taker signed passphrase": _signed_passphrase(TAKER_KEY),
    "redis password": REDIS_PASSWORD, "redis password (quoted)": quote(REDIS_PASSWORD, safe=""),
}


def _leaks(where: str, data: bytes | str, extra: dict[str, str] | None = None) -> list[str]:
    blob = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    needles = {**NEEDLES, **(extra or {})}
    return [f"{name} in {where}" for name, needle in needles.items() if needle.encode() in blob]


@dataclass
class System:
    redis_server: RedisServer
    sandbox: SandboxProcess
    feed: ServiceProcess
    book: ServiceProcess
    monitor: ServiceProcess
    strategy: ServiceProcess

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.sandbox, self.feed, self.book, self.monitor, self.strategy]


def _creds(key: DemoKey) -> dict[str, str]:
    return {"KUMEX_API_KEY": key.key, "KUMEX_API_SECRET": key.secret,
            "KUMEX_API_PASSPHRASE": key.passphrase}


@pytest.fixture
def system() -> Iterator[System]:
    api_keys = [{"key": k.key, "secret": k.secret, "passphrase": k.passphrase, "user": user}
                for k, user in ((GRID_KEY, "chaos-grid"), (TAKER_KEY, "chaos-taker"))]
    with RedisServer(password=REDIS_PASSWORD) as server:
        url = server.url
        common = {"REDIS_URL": url, "KUMEX_SYMBOLS": SYM, "LOG_LEVEL": "DEBUG"}
        sandbox = SandboxProcess({
            "SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "5",
            "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0",
            "SANDBOX_API_KEYS": json.dumps(api_keys), "SANDBOX_LOG_LEVEL": "debug",
            "SANDBOX_ACCESS_LOG": "true"})
        with sandbox:
            common["KUMEX_BASE_URL"] = sandbox.base_url
            feed = ServiceProcess("services.feed", {
                **common, "FEED_HTTP_HOST": "127.0.0.1", "FEED_SNAPSHOT_PER_MIN": "0"},
                port_var="FEED_HTTP_PORT")
            book = ServiceProcess("services.book", {
                **common, "BOOK_HOST": "127.0.0.1", "BOOK_REPLICA_ID": "chaos-secrets"},
                port_var="BOOK_PORT")
            monitor = ServiceProcess("services.order_monitor", {
                **common, **_creds(GRID_KEY), "MONITOR_HTTP_HOST": "127.0.0.1",
                "MONITOR_REPLICA_ID": "chaos-secrets", "MONITOR_BLOCK_MS": "100",
                "MONITOR_REFRESH_S": "0.5"}, port_var="MONITOR_HTTP_PORT")
            strategy = ServiceProcess("services.strategy", {
                **common, **_creds(GRID_KEY), "STRATEGY_HTTP_HOST": "127.0.0.1",
                "STRATEGY_CLIENT_OID_PREFIX": "leak", "STRATEGY_LEVELS": "3",
                "STRATEGY_STEP_TICKS": "3", "STRATEGY_SIZE": "2", "STRATEGY_MAX_POSITION": "30",
                "STRATEGY_MAX_OPEN_ORDERS": "40", "STRATEGY_READ_BLOCK": "0.2"},
                port_var="STRATEGY_HTTP_PORT", prefix=("STRATEGY_", "KUMEX_"), stop_timeout=60)
            with feed, book, monitor:
                try:
                    yield System(server, sandbox, feed, book, monitor, strategy)
                finally:
                    strategy.close()


def _monitor_consuming(monitor: ServiceProcess) -> bool:
    try:
        body = httpx.get(f"{monitor.url}/readyz", timeout=2).json()
    except httpx.HTTPError:
        return False
    return bool(body.get("ready") and body.get("symbols", {}).get(SYM, {}).get("ready"))


def _bad_calls(base_url: str) -> list[tuple[str, httpx.Response, str]]:
    """Refused private REST calls, each with the signature the sandbox expected."""
    out: list[tuple[str, httpx.Response, str]] = []
    path = "/api/v1/orders?status=active"
    with httpx.Client(base_url=base_url, timeout=10) as http:
        good = KcAuth(GRID_KEY)
        ts = str(time.time_ns() // 1_000_000)
        expected = KcAuth.hmac_b64(GRID_KEY.secret, f"{ts}GET{path}".encode())
        base = good.headers("GET", path, b"")
        cases: dict[str, dict[str, str]] = {
            "bad signature": {**base, "KC-API-TIMESTAMP": ts, "KC-API-SIGN": "AAAA" + "=" * 40},
            "wrong passphrase": {**base, "KC-API-PASSPHRASE": _signed_passphrase(
                DemoKey(GRID_KEY.key, GRID_KEY.secret, "not-the-passphrase"))},
            "plain passphrase, v2": {**base, "KC-API-PASSPHRASE": GRID_KEY.passphrase},
            "old timestamp": {**base, "KC-API-TIMESTAMP": str(int(ts) - 3_600_000)},
            "unknown key": {**base, "KC-API-KEY": "no-such-key"},
            "no passphrase": {k: v for k, v in base.items() if k != "KC-API-PASSPHRASE"},
        }
        for name, headers in cases.items():
            r = http.get(path, headers=headers)
            assert r.status_code in (400, 401, 403), (name, r.status_code, r.text)
            out.append((name, r, expected))
        body = json.dumps({"clientOid": "leak-bad", "symbol": SYM, "side": "buy",
                           "price": "1", "size": 1, "leverage": "5"})
        headers = good.headers("POST", "/api/v1/orders", body.encode())
        headers["KC-API-SIGN"] = KcAuth.hmac_b64(GRID_KEY.secret, b"tampered")
        r = http.post("/api/v1/orders", content=body, headers={
            **headers, "Content-Type": "application/json"})
        assert r.status_code in (400, 401), r.text
        out.append(("tampered POST", r, KcAuth.hmac_b64(
            GRID_KEY.secret, f"{headers['KC-API-TIMESTAMP']}POST/api/v1/orders{body}".encode())))
    return out


def _redis_dump(client: redis.Redis) -> list[tuple[bytes, bytes]]:
    """Every key with a text rendering of its value, whatever its type."""
    out: list[tuple[bytes, bytes]] = []
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        value: Any
        if kind == b"string":
            value = client.get(key)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = client.xrange(key)
            value += [client.xinfo_groups(key)]
        else:
            value = kind
        out.append((key, repr(value).encode()))
    return out


def test_no_secret_in_logs_redis_metrics_or_errors(system: System) -> None:
    sandbox, strategy = system.sandbox, system.strategy
    wait_for(lambda: _monitor_consuming(system.monitor), "the order monitor consuming",
             proc=system.monitor)
    with httpx.Client(base_url=sandbox.base_url, timeout=10) as http, \
            httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(TAKER_KEY)) as taker:
        engine = http.get(f"/sandbox/book/{SYM}").json()
        mid = (Decimal(engine["bids"][0]["price"]) + Decimal(engine["asks"][0]["price"])) / 2
        centre = (mid / TICK).to_integral_value() * TICK
        strategy.env["STRATEGY_CENTRE_PRICE"] = f"{centre:f}"
        strategy.start(wait=False)
        wait_for(lambda: strategy.check_running() or _ready(strategy), "the grid placed",
                 proc=strategy)
        http.post("/sandbox/flow/resume", json={"rate": 100}).raise_for_status()
        # Another user sells into every bid: the grid's buys fill, it places counter-orders.
        taker.post("/api/v1/orders", json={
            "clientOid": "leak-taker-1", "symbol": SYM, "side": "sell", "type": "market",
            "size": 5_000_000, "leverage": "5"}).raise_for_status()
        wait_for(lambda: metric(strategy.url, "kumex_strategy_counter_orders_total") >= 1,
                 "a fill and its counter-order", proc=strategy)
        http.post("/sandbox/flow/pause").raise_for_status()

        # Error replies of refused calls: no secret, no expected signature.
        leaks: list[str] = []
        for name, response, expected in _bad_calls(sandbox.base_url):
            leaks += _leaks(f"the {name} reply", response.content,
                            {"expected signature": expected})
        # Every page the services serve.
        pages = {
            "sandbox state": f"{sandbox.base_url}/sandbox/state",
            "feed metrics": f"{system.feed.url}/metrics",
            "feed readyz": f"{system.feed.url}/readyz",
            "book metrics": f"{system.book.url}/metrics",
            "book books": f"{system.book.url}/books",
            "book readyz": f"{system.book.url}/readyz",
            "monitor metrics": f"{system.monitor.url}/metrics",
            "monitor readyz": f"{system.monitor.url}/readyz",
            "strategy metrics": f"{strategy.url}/metrics",
            "strategy state": f"{strategy.url}/state",
            "strategy readyz": f"{strategy.url}/readyz",
        }
        for name, url in pages.items():
            leaks += _leaks(name, httpx.get(url, timeout=10).content)
        spec = httpx.get(f"{system.book.url}/openapi.json", timeout=10).json()

    assert metric(strategy.url, "kumex_strategy_orders_placed_total") >= 7
    # Cancels: SIGTERM makes the grid cancel every order (confirmed on the stream).
    assert strategy.stop() == 0
    # Redis: every key and value.
    client = redis.Redis.from_url(system.redis_server.url)
    try:
        dump = _redis_dump(client)
    finally:
        client.close()
    assert any(k.startswith(f"kumex:{{{SYM}}}:order:".encode()) for k, _ in dump)
    for key, value in dump:
        leaks += _leaks(f"Redis key {key!r}", key + b" " + value)
    # Every process log (the others stopped, so their shutdown lines are in too).
    for proc in system.processes:
        proc.stop()
        leaks += _leaks(f"the {proc.name} log", proc.log_text())
    assert not leaks, leaks

    # The book service has no write endpoint, but the drain (off without BOOK_API_TOKEN).
    methods = {(path, m) for path, item in spec["paths"].items() for m in item}
    assert {m for _, m in methods - {("/admin/drain", "post")}} == {"get"}, methods


def _ready(proc: ServiceProcess) -> bool:
    try:
        return httpx.get(f"{proc.url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_refused_redis_password_is_not_logged() -> None:
    """A service given the wrong Redis password says so, without writing it."""
    wrong = "Wrong-chaos-pw-6e2d90"
    with RedisServer(password=REDIS_PASSWORD) as server:
        url = server.url.replace(quote(REDIS_PASSWORD, safe=""), wrong)
        book = ServiceProcess("services.book", {
            "REDIS_URL": url, "KUMEX_SYMBOLS": SYM, "BOOK_HOST": "127.0.0.1",
            "BOOK_REPLICA_ID": "chaos-wrong-pw"}, port_var="BOOK_PORT", check_stop=False)
        try:
            book.start(wait=False)
            wait_for(lambda: book.process is None or book.process.poll() is not None
                     or "WRONGPASS" in book.log_text() or "invalid" in book.log_text().lower()
                     or "auth" in book.log_text().lower(),
                     "the book to report the refused password", proc=book)
            book.stop()
            text = book.log_text()
        finally:
            book.close()
    assert text.strip(), "the book said nothing about the refused password"
    assert wrong not in text and quote(wrong) not in text, text[-2000:]
    assert not _leaks("the book log", text)
