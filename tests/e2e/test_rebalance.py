"""Book replicas share the symbols evenly: three started one after another, one stopped,
one drained.

Real processes (sandbox with 30 contracts flowing, feed, three book replicas,
Redis). Every symbol is polled all along through the first replica (which
answers its own symbols and proxies the others'), and every answer is checked
against the sandbox's journal at its own sequence. Each replica's share and
the unserved windows around moves are printed; the shares and the truth of
every answer are asserted, not the times (this machine is shared).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import redis

from chaos.stack import Poller, verify_answers
from kumex_l3 import keys
from kumex_l3.lease import LeaseOwner
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.sandbox_proc import SandboxProcess
from services.sandbox.contracts import CONTRACTS

SYMBOLS = tuple(list(CONTRACTS)[:30])
START = 7_000_000
REPLICAS = ("rebalance-a", "rebalance-b", "rebalance-c")
SAFETY_S = 90.0  # a ceiling against a hang, never a measurement
TOKEN = "rebalance-test-token"


@pytest.fixture
def sandbox() -> Iterator[SandboxProcess]:
    env = {"SANDBOX_SYMBOLS": ",".join(SYMBOLS), "SANDBOX_FLOW_RATE": "0",
           "SANDBOX_SEED": "29", "SANDBOX_START_SEQUENCE": str(START),
           "SANDBOX_JOURNAL_SIZE": "200000", "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0",
           "SANDBOX_REST_LATENCY_MS": "0"}
    with SandboxProcess(env) as proc:
        yield proc


def _feed(redis_url: str, sandbox: SandboxProcess) -> ServiceProcess:
    return ServiceProcess("services.feed", {
        "REDIS_URL": redis_url, "KUMEX_SYMBOLS": ",".join(SYMBOLS),
        "KUMEX_BASE_URL": sandbox.base_url, "FEED_HTTP_HOST": "127.0.0.1",
        "FEED_SNAPSHOT_PER_MIN": "0", "FEED_BACKOFF_INITIAL": "0.2",
        "FEED_BACKOFF_MAX": "1"}, port_var="FEED_HTTP_PORT")


def _book(redis_url: str, replica: str) -> ServiceProcess:
    return ServiceProcess("services.book", {
        "REDIS_URL": redis_url, "KUMEX_SYMBOLS": ",".join(SYMBOLS), "BOOK_HOST": "127.0.0.1",
        "BOOK_REPLICA_ID": replica, "BOOK_SNAPSHOT_RETRY_SECONDS": "0.5",
        "BOOK_API_TOKEN": TOKEN,
        "BOOK_READ_BLOCK_SECONDS": "0.1"}, port_var="BOOK_PORT", name=replica)


def _shares(client: redis.Redis) -> Counter[str]:
    owners: Any = client.mget([keys.owner(s, "book") for s in SYMBOLS])
    return Counter(LeaseOwner.from_json(raw).id if raw is not None else "-" for raw in owners)


def _served_everywhere(book: ServiceProcess) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        rows = httpx.get(f"{book.url}/books", timeout=5).json()["books"]
        return len(rows) == len(SYMBOLS) and all(r["synced"] for r in rows)
    return False


def _even(client: redis.Redis, replicas: tuple[str, ...]) -> bool:
    shares = [_shares(client)[r] for r in replicas]
    return sum(shares) == len(SYMBOLS) and max(shares) - min(shares) <= 1


def _wait_even(client: redis.Redis, replicas: tuple[str, ...], since: float,
               *procs: ServiceProcess) -> float:
    for proc in procs:
        wait_for(lambda: _even(client, replicas), f"even shares among {replicas}",
                 timeout=SAFETY_S, proc=proc)
    took = time.monotonic() - since
    print(f"even shares among {len(replicas)} replicas {dict(_shares(client))} "
          f"{took:.1f} s after the change")
    return took


def _events(books: list[ServiceProcess], what: str) -> list[tuple[str, datetime]]:
    """(symbol, when) of every log line ``what symbol=SYM ...`` of the replicas."""
    found: list[tuple[str, datetime]] = []
    for book in books:
        for line in book.log_text().splitlines():
            head, hit, rest = line.partition(f" {what} symbol=")
            if hit:
                stamp = datetime.fromisoformat(head.split(" ", 1)[0].replace("Z", "+00:00"))
                found.append((rest.split(" ", 1)[0], stamp))
    return found


def _move_times(books: list[ServiceProcess]) -> list[float]:
    """For each handoff: ms from the old owner's handoff to the next "book served"."""
    served = _events(books, "book served")
    took: list[float] = []
    for symbol, at in _events(books, "symbol handed off"):
        after = [t for s, t in served if s == symbol and t >= at]
        assert after, f"{symbol} handed off at {at} and never served again"
        took.append((min(after) - at).total_seconds() * 1000)
    return took


def _unserved_windows(poller: Poller) -> list[float]:
    """Each run of answers other than 200: from its first answer to the next 200."""
    windows: list[float] = []
    began: float | None = None
    for (status, *_), at in zip(poller.answers, poller.times, strict=True):
        if status != 200 and began is None:
            began = at
        elif status == 200 and began is not None:
            windows.append(at - began)
            began = None
    if began is not None:
        windows.append(poller.times[-1] - began)
    return windows


def test_replicas_share_30_symbols_evenly_and_hand_them_off(
        redis_url: str, redis_sync: redis.Redis, sandbox: SandboxProcess) -> None:
    with httpx.Client(base_url=sandbox.base_url, timeout=10) as http:
        http.post("/sandbox/step", json={"n": 600}).raise_for_status()
        books: list[ServiceProcess] = []
        try:
            with _feed(redis_url, sandbox):
                books.append(_book(redis_url, REPLICAS[0]).start())
                first = books[0]
                wait_for(lambda: _served_everywhere(first), "30 books served by one replica",
                         timeout=SAFETY_S, proc=first)
                assert _shares(redis_sync) == {REPLICAS[0]: 30}
                http.post("/sandbox/flow/resume", json={"rate": 200}).raise_for_status()
                pollers = {s: Poller(lambda: first.url, interval=0.1, symbol=s, timed=True)
                           for s in SYMBOLS}
                for poller in pollers.values():
                    poller.start()
                try:
                    for n in (2, 3):
                        started = time.monotonic()
                        books.append(_book(redis_url, REPLICAS[n - 1]).start())
                        _wait_even(redis_sync, REPLICAS[:n], started, *books)
                        wait_for(lambda: _served_everywhere(first), "every book served",
                                 timeout=SAFETY_S, proc=first)
                        time.sleep(2.0)  # answers after the moves
                    # The third replica is stopped cleanly: it hands everything off.
                    started = time.monotonic()
                    assert books[2].stop() == 0
                    _wait_even(redis_sync, REPLICAS[:2], started, *books[:2])
                    wait_for(lambda: _served_everywhere(first), "every book served",
                             timeout=SAFETY_S, proc=first)
                    time.sleep(2.0)
                    # The second is drained by the admin call: the first takes all back,
                    # and the drained one goes on answering by proxy.
                    for token in (None, "guess"):
                        refused = httpx.post(f"{books[1].url}/admin/drain", timeout=30,
                                             headers={} if token is None else {
                                                 "Authorization": f"Bearer {token}"})
                        assert refused.status_code == 403, refused.text
                    assert _shares(redis_sync)[REPLICAS[1]] == 15
                    started = time.monotonic()
                    reply = httpx.post(f"{books[1].url}/admin/drain", timeout=30,
                                       headers={"Authorization": f"Bearer {TOKEN}"}).json()
                    assert reply["handedOff"] == 15, reply
                    _wait_even(redis_sync, REPLICAS[:1], started, first)
                    wait_for(lambda: _served_everywhere(books[1]), "every book served, "
                             "seen from the drained replica", timeout=SAFETY_S, proc=books[1])
                    time.sleep(2.0)
                finally:
                    for poller in pollers.values():
                        poller.stop()
                http.post("/sandbox/flow/pause").raise_for_status()
            handed = Counter(symbol for symbol, _ in _events(books, "symbol handed off"))
            moves = _move_times(books)
            print("each move, handed off -> served by the next owner (ms): "
                  f"median {statistics.median(moves):.0f}, max {max(moves):.0f}, "
                  f"of {len(moves)}")
            worst = 0.0
            answers = 0
            for symbol, poller in pollers.items():
                check = verify_answers(http, symbol, START, poller.answers)
                assert check.passed and check.checked > 50, str(check)
                windows = _unserved_windows(poller)
                # Unserved only around a move: never more windows than handoffs.
                assert len(windows) <= handed[symbol], (symbol, windows, handed[symbol],
                                                        poller.details[:3])
                worst = max([worst, *windows])
                answers += len(poller.answers)
            moved = sum(handed.values())
            print(f"{answers} answers of 30 symbols, every 200 equal to the journal at its "
                  f"sequence; {moved} handoffs; longest unserved window {worst:.2f} s")
        finally:
            for book in reversed(books):
                book.close()
