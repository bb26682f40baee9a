"""Fixtures of the chaos tests: the market-data chain as real processes, and its checks.

:class:`ChaosStack` runs ``python -m services.sandbox`` (journal on, flow
paused, a short WebSocket ping), ``services.feed`` and ``services.book`` on
one Redis, and offers what every chaos test needs: inject frames through the
sandbox's socket or straight into the stream, read the DLQ, poll the book all
along (:class:`BookPoller`), settle it and compare it with the engine, and
check that every answer the book gave was true at its sequence (rebuilt from
the sandbox's journal). Waits have a ceiling against hangs, never a timing
assertion.
"""

from __future__ import annotations

import base64
import threading
from collections import Counter
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

import httpx
import pytest
import redis

from kumex_l3 import OrderBook, keys
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, flush_redis, metric, wait_for
from kumex_l3.testing.sandbox_proc import SandboxProcess
from tests.chaos.corpus import Frame
from tests.truth import assert_answers_were_true, assert_l3_equals_engine

SYM = "XBTUSDM"
#: A second listed symbol that no feed follows: the sandbox-only tests use it.
SIDE_SYM = "XBTUSDTM"
START = 7_000_000
#: Connections the feed keeps to the exchange (its default): every frame injected
#: reaches it on each of them.
LINES = 2

SANDBOX_ENV = {
    "SANDBOX_SYMBOLS": f"{SYM},{SIDE_SYM}", "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "33",
    "SANDBOX_START_SEQUENCE": str(START), "SANDBOX_JOURNAL_SIZE": "300000",
    "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0",
    # A ping a second, a pong awaited 3 s: the pong fault is noticed in seconds,
    # and a busy machine does not miss a pong by accident.
    "SANDBOX_WS_PING_INTERVAL_MS": "1000", "SANDBOX_WS_PING_TIMEOUT_MS": "3000",
}


def feed_process(redis_url: str, base_url: str, **extra: str) -> ServiceProcess:
    """``services.feed`` for ``SYM`` against ``base_url``, quick to reconnect."""
    env = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM, "KUMEX_BASE_URL": base_url,
           "FEED_HTTP_HOST": "127.0.0.1", "FEED_SNAPSHOT_PER_MIN": "0",
           "FEED_BACKOFF_INITIAL": "0.2", "FEED_BACKOFF_MAX": "1", "FEED_LINES": str(LINES),
           **extra}
    return ServiceProcess("services.feed", env, port_var="FEED_HTTP_PORT")


def book_process(redis_url: str, replica: str = "chaos-book", **extra: str) -> ServiceProcess:
    """``services.book`` for ``SYM``: frequent checkpoints, quick snapshot retries."""
    env = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM, "BOOK_HOST": "127.0.0.1",
           "BOOK_REPLICA_ID": replica, "BOOK_CHECKPOINT_SECONDS": "0.5",
           "BOOK_SNAPSHOT_RETRY_SECONDS": "0.5", "BOOK_READ_BLOCK_SECONDS": "0.1", **extra}
    return ServiceProcess("services.book", env, port_var="BOOK_PORT")


class BookPoller(threading.Thread):
    """Reads ``GET /book/SYM?depth=1000`` all along (paced) and keeps every answer."""

    def __init__(self, url: str, pause_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.pause_s = pause_s
        self.stop_event = threading.Event()
        self.answers: list[tuple[int, dict[str, Any]]] = []

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop_event.wait(self.pause_s):
                try:
                    r = http.get(f"{self.url}/book/{SYM}", params={"depth": 1000})
                except httpx.HTTPError:
                    continue  # the book is being restarted
                self.answers.append((r.status_code, r.json()))

    def __enter__(self) -> BookPoller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join()


class ChaosStack:
    """Sandbox, feed and book on one Redis (see the module docstring)."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.sandbox = SandboxProcess(SANDBOX_ENV)
        self.feed: ServiceProcess | None = None
        self.book: ServiceProcess | None = None
        self.http: httpx.Client | None = None
        self.redis = redis.Redis.from_url(redis_url, decode_responses=False)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ChaosStack:
        self.sandbox.start()
        self.http = httpx.Client(base_url=self.sandbox.base_url, timeout=30)
        self.feed = feed_process(self.redis_url, self.sandbox.base_url).start()
        self.book = book_process(self.redis_url).start()
        self.wait_synced()
        return self

    def close(self) -> None:
        for proc in (self.book, self.feed, self.sandbox):
            if proc is not None:
                try:
                    proc.close()
                except AssertionError as exc:  # pragma: no cover - shown, not hidden
                    print(exc)
        if self.http is not None:
            self.http.close()
        self.redis.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail()}"
                         for p in (self.sandbox, self.feed, self.book) if p is not None)

    @property
    def sb(self) -> httpx.Client:
        assert self.http is not None
        return self.http

    @property
    def book_url(self) -> str:
        assert self.book is not None
        return self.book.url

    @property
    def feed_url(self) -> str:
        assert self.feed is not None
        return self.feed.url

    def assert_all_healthy(self) -> None:
        """Every process still runs and answers ``/healthz``."""
        for proc in (self.sandbox, self.feed, self.book):
            assert proc is not None
            proc.check_running()
            assert proc.healthy(), f"{proc.name} does not answer /healthz:\n{proc.log_tail()}"

    # ------------------------------------------------------------------ the exchange

    def engine_sequence(self, symbol: str = SYM) -> int:
        return int(self.sb.get("/sandbox/state").json()["sequences"][symbol])

    def sandbox_counts(self) -> Counter[str]:
        return Counter(self.sb.get("/sandbox/state").json()["faults"]["counts"])

    def flow(self, rate: float | None) -> None:
        """Run the synthetic flow at ``rate`` messages a second, or pause it (None)."""
        if rate is None:
            self.sb.post("/sandbox/flow/pause").raise_for_status()
        else:
            self.sb.post("/sandbox/flow/resume", json={"rate": rate}).raise_for_status()

    def step(self, n: int) -> None:
        self.sb.post("/sandbox/step", json={"n": n}).raise_for_status()

    def faults(self, **knobs: Any) -> None:
        self.sb.post("/sandbox/faults", json=knobs).raise_for_status()

    def inject(self, frames: Iterable[Frame], symbol: str = SYM) -> dict[str, Any]:
        """Send frames over the sandbox's socket, in order (binary ones in their own calls).

        Returns the last reply; every call must have reached each of the feed's
        :data:`LINES` connections unless ``symbol`` is not the feed's.
        """
        batch: list[str] = []
        reply: dict[str, Any] = {}

        def send(body: dict[str, Any]) -> dict[str, Any]:
            r = self.sb.post("/sandbox/inject", json={"symbol": symbol, **body})
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            if symbol == SYM:
                assert out["subscribers"] == LINES, f"the feed is not subscribed: {out}"
            return out

        for frame in frames:
            if isinstance(frame.raw, bytes):
                if batch:
                    reply = send({"frames": batch})
                    batch = []
                reply = send({"frames": [base64.b64encode(frame.raw).decode()],
                              "binary": True})
            else:
                batch.append(frame.raw)
        if batch:
            reply = send({"frames": batch})
        return reply

    def journal(self, after: int = START) -> list[str]:
        texts: list[str] = self.sb.get(f"/sandbox/journal/{SYM}",
                                       params={"after": after}).json()["messages"]
        return texts

    # ------------------------------------------------------------------ Redis

    def xadd(self, entries: Iterable[Mapping[str, str | bytes]]) -> None:
        """Append raw entries to the L3 stream, as a broken or hostile writer would."""
        with self.redis.pipeline(transaction=False) as pipe:
            for fields in entries:
                pipe.xadd(keys.l3_stream(SYM), dict(fields))
            pipe.execute()

    def last_id(self, key: str) -> bytes:
        newest: Any = self.redis.xrevrange(key, "+", "-", count=1)
        return newest[0][0] if newest else b"0-0"

    def dlq_after(self, after: bytes) -> list[dict[bytes, bytes]]:
        """DLQ entries after id ``after``, oldest first."""
        entries: Any = self.redis.xrange(keys.dlq(SYM), b"(" + after, "+")
        return [fields for _, fields in entries]

    def stream_after(self, after: bytes) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: Any = self.redis.xrange(keys.l3_stream(SYM), b"(" + after, "+")
        return list(entries)

    # ------------------------------------------------------------------ the book

    def book_metric(self, name: str) -> float:
        return metric(self.book_url, name)

    def feed_metric(self, name: str, **labels: str) -> float:
        return metric(self.feed_url, name, **labels)

    def book_l3(self) -> httpx.Response:
        return httpx.get(f"{self.book_url}/book/{SYM}/l3", params={"depth": 1000}, timeout=10)

    def wait_synced(self) -> None:
        assert self.book is not None
        wait_for(lambda: self.book_l3().status_code == 200, "the book to be synced",
                 proc=self.book)

    def wait_feed_subscribed(self) -> None:
        """Until the sandbox sees every line of the feed subscribed to ``SYM``."""
        def subscribed() -> bool:
            subs = self.sb.get("/sandbox/state").json()["hub"]["subscriptions"]
            return subs.get(f"/contractMarket/level3v2:{SYM}", 0) >= LINES
        wait_for(subscribed, "the feed to be subscribed", proc=self.feed)

    def settle(self) -> dict[str, Any]:
        """Faults off, flow paused, a few more messages (a trailing loss becomes a
        visible gap), then the book at the engine's sequence; returns its L3 body."""
        self.faults(drop_rate=0, duplicate_rate=0, reorder_rate=0, pong_disabled=False)
        self.flow(None)
        self.wait_feed_subscribed()
        self.step(30)
        target = self.engine_sequence()

        def caught_up() -> bool:
            r = self.book_l3()
            return r.status_code == 200 and r.json()["sequence"] == target

        wait_for(caught_up, f"the book to reach sequence {target}", proc=self.book)
        body: dict[str, Any] = self.book_l3().json()
        return body

    def assert_equal_to_engine(self, ours: dict[str, Any]) -> None:
        assert_l3_equals_engine(ours, self.sb.get(f"/sandbox/book/{SYM}").json())

    def assert_answers_were_true(self, answers: list[tuple[int, dict[str, Any]]]) -> int:
        """Every 200 the book gave equals the true book at its sequence; the rest are 503.

        Returns how many 200s were checked.
        """
        return assert_answers_were_true(OrderBook(SYM, sequence=START), self.journal(), answers)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, for fixtures that show logs on failure."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.fixture(scope="module")
def chaos_stack(redis_server: RedisServer) -> Iterator[ChaosStack]:
    """One sandbox + feed + book for a whole test module (on the session's Redis).

    Tests take it through :func:`stack`, which shows the processes' logs when
    the test fails.
    """
    flush_redis(redis_server.url)
    stack = ChaosStack(redis_server.url)
    try:
        try:
            stack.start()
        except BaseException:
            print(stack.logs())
            raise
        yield stack
    finally:
        stack.close()


@pytest.fixture
def stack(chaos_stack: ChaosStack, request: pytest.FixtureRequest) -> Iterator[ChaosStack]:
    """The module's :class:`ChaosStack`; its logs are printed if the test fails."""
    yield chaos_stack
    report = request.node.stash.get(_REPORTS, {}).get("call")
    if report is None or report.failed:
        print(chaos_stack.logs())
