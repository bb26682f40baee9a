"""Always on: feed fail-over under the book, and a venue-wide outage under a snapshot budget.

Real processes (sandbox, feeds, book, Redis), every answer of the book kept
and checked against the sandbox's journal. The full-size runs at the real
venue's limits (1 snapshot a minute, 10 minutes) are ``make chaos`` and
``bench/bench_availability.py``; these are their CI-sized cases.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from chaos.stack import Poller, verify_answers
from kumex_l3 import keys
from kumex_l3.lease import LeaseOwner
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.sandbox_proc import SandboxProcess

SYMBOLS = ("XBTUSDM", "XBTUSDTM")
START = 3_000_000


@pytest.fixture
def sandbox() -> Iterator[SandboxProcess]:
    env = {"SANDBOX_SYMBOLS": ",".join(SYMBOLS), "SANDBOX_FLOW_RATE": "0",
           "SANDBOX_SEED": "17", "SANDBOX_START_SEQUENCE": str(START),
           "SANDBOX_JOURNAL_SIZE": "300000", "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0",
           "SANDBOX_REST_LATENCY_MS": "5"}
    with SandboxProcess(env) as proc:
        proc_http = httpx.Client(base_url=proc.base_url, timeout=10)
        proc_http.post("/sandbox/step", json={"n": 300}).raise_for_status()
        proc_http.close()
        yield proc


def _feed(redis_url: str, sandbox: SandboxProcess, name: str, **extra: str) -> ServiceProcess:
    return ServiceProcess("services.feed", {
        "REDIS_URL": redis_url, "KUMEX_SYMBOLS": ",".join(SYMBOLS),
        "KUMEX_BASE_URL": sandbox.base_url, "FEED_HTTP_HOST": "127.0.0.1",
        # One snapshot every 5 s, never two back to back: the queue is what is tested.
        "FEED_SNAPSHOT_PER_MIN": "12", "FEED_SNAPSHOT_BURST": "1",
        "FEED_BACKOFF_INITIAL": "0.2", "FEED_BACKOFF_MAX": "1",
        "FEED_ID": name, **extra}, port_var="FEED_HTTP_PORT", name=name)


def _book(redis_url: str) -> ServiceProcess:
    return ServiceProcess("services.book", {
        "REDIS_URL": redis_url, "KUMEX_SYMBOLS": ",".join(SYMBOLS), "BOOK_HOST": "127.0.0.1",
        "BOOK_REPLICA_ID": "availability-book", "BOOK_SNAPSHOT_RETRY_SECONDS": "1",
        "BOOK_READ_BLOCK_SECONDS": "0.1"}, port_var="BOOK_PORT", name="book")


def _served(book: ServiceProcess, symbol: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{book.url}/book/{symbol}", params={"depth": 1},
                         timeout=5).status_code == 200
    return False


@contextlib.contextmanager
def _polling(book: ServiceProcess) -> Iterator[dict[str, Poller]]:
    pollers = {s: Poller(lambda: book.url, interval=0.05, symbol=s, timed=True)
               for s in SYMBOLS}
    for poller in pollers.values():
        poller.start()
    try:
        yield pollers
    finally:
        for poller in pollers.values():
            poller.stop()


def _writer(client: redis.Redis, symbol: str) -> str | None:
    raw: Any = client.get(keys.owner(symbol, "feed"))
    return None if raw is None else LeaseOwner.from_json(raw).id


def test_the_book_keeps_serving_while_the_writing_feed_is_killed(
        redis_url: str, redis_sync: redis.Redis, sandbox: SandboxProcess) -> None:
    """kill -9 of the feed that writes both streams: the standby takes over within its
    lease, from the stream's head, before the heartbeat lapses; the book never stops
    answering 200, and every answer is the true book at its sequence."""
    with httpx.Client(base_url=sandbox.base_url, timeout=10) as http, \
            _feed(redis_url, sandbox, "feed-a", FEED_LEASE_TTL_SECONDS="1") as first, \
            _book(redis_url) as book:
        wait_for(lambda: all(_writer(redis_sync, s) == "feed-a" for s in SYMBOLS),
                 "feed-a writing both streams", proc=first)
        with _feed(redis_url, sandbox, "feed-b", FEED_LEASE_TTL_SECONDS="1") as second:
            wait_for(lambda: all(_served(book, s) for s in SYMBOLS), "both books served",
                     proc=book)
            wait_for(lambda: httpx.get(f"{second.url}/readyz").status_code == 200,
                     "the standby's lines", proc=second)
            http.post("/sandbox/flow/resume", json={"rate": 150}).raise_for_status()
            with _polling(book) as pollers:
                wait_for(lambda: all(len(p.answers) > 40 for p in pollers.values()),
                         "answers before the kill")
                first.kill()
                wait_for(lambda: all(_writer(redis_sync, s) == "feed-b" for s in SYMBOLS),
                         "feed-b taking over", proc=second)
                seen = {s: len(p.answers) for s, p in pollers.items()}
                wait_for(lambda: all(len(p.answers) > seen[s] + 60
                                     for s, p in pollers.items()), "answers after it")
            http.post("/sandbox/flow/pause").raise_for_status()
            for symbol, poller in pollers.items():
                statuses = [a[0] for a in poller.answers]
                assert statuses.count(200) == len(statuses), (
                    symbol, [d for _, d in poller.details][:3])
                check = verify_answers(http, symbol, START, poller.answers)
                assert check.passed and check.checked > 100, str(check)
            assert "took over with a gap" not in second.log_text()


def test_an_outage_costs_each_symbol_one_snapshot_in_the_announced_order(
        redis_url: str, sandbox: SandboxProcess) -> None:
    """A venue-wide outage (every connection cut, new ones refused for 2 s) while the flow
    runs: both symbols have a gap and need a snapshot; the budget (12 a minute, one every
    5 s, no burst) serves them one after the other, and every 503 meanwhile says when the
    next snapshot is due."""
    with httpx.Client(base_url=sandbox.base_url, timeout=10) as http, \
            _feed(redis_url, sandbox, "feed-a"), _book(redis_url) as book:
        wait_for(lambda: all(_served(book, s) for s in SYMBOLS), "both books served",
                 proc=book)
        http.post("/sandbox/flow/resume", json={"rate": 150}).raise_for_status()
        with _polling(book) as pollers:
            wait_for(lambda: all(len(p.answers) > 20 for p in pollers.values()),
                     "answers before the outage")
            cut = http.post("/sandbox/disconnect", json={"seconds": 2}).json()
            assert cut["disconnected"] == 2
            wait_for(lambda: all(any(a[0] == 503 for a in p.answers)
                                 for p in pollers.values()), "both books not served")
            wait_for(lambda: all(p.answers[-1][0] == 200 for p in pollers.values()),
                     "both books back", proc=book)
        http.post("/sandbox/flow/pause").raise_for_status()
        counts = http.get("/sandbox/state").json()["faults"]["counts"]
        assert counts.get("outage_refusals", 0) >= 1
        details = [d for p in pollers.values() for _, d in p.details]
        waiting = [d for d in details if "not synced" in d]
        assert waiting, f"no book waited for a snapshot: {sorted(set(details))[:5]}"
        assert all("is due" in d or "no snapshot of it is queued" in d for d in waiting)
        for symbol, poller in pollers.items():
            check = verify_answers(http, symbol, START, poller.answers)
            assert check.passed, str(check)
        said = [d for p in pollers.values() for _, d in p.details if "is due" in d]
        assert said, "no 503 said when the next snapshot is due"
        print(f"\n{json.dumps(said[-1])}")
