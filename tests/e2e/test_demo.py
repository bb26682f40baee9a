"""``make demo`` runs what docker-compose.yml declares: a book, an order and a fill appear."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO

import httpx
import redis

from kumex_l3 import keys
from kumex_l3.testing.procs import ROOT, read_shared, wait_for

SYM = "XBTUSDM"
#: The example clientOid of the README's walkthrough.
GRID_OID = re.compile(r"grid-[A-Za-z0-9_-]{16}")
SERVICE_PORTS = (8080, 8081, 8082, 8083, 8090)


def _free_offset() -> int:
    for offset in range(2000, 9000, 137):
        taken = False
        for port in SERVICE_PORTS:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + offset)) == 0:
                    taken = True
        if not taken:
            return offset
    raise AssertionError("no free port range for the demo")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_brings_up_the_set_and_stops_cleanly(redis_url: str) -> None:
    offset = _free_offset()
    env = {**os.environ, "REDIS_URL": redis_url, "DEMO_PORT_OFFSET": str(offset),
           "SANDBOX_FLOW_RATE": "300", "STRATEGY_STEP_TICKS": "1", "KUMEX_SYMBOLS": SYM,
           "SANDBOX_SYMBOLS": SYM, "FEED_SNAPSHOT_PER_MIN": "0", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile() as log:
        demo = subprocess.Popen([sys.executable, "-m", "services.demo"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            _exercise(demo, log, redis_url, offset)
        finally:
            demo.send_signal(signal.SIGINT)
            code = demo.wait(90)
        text = _text(log)
    assert code == 0, text
    assert "all stopped" in text
    assert "no own order active at the exchange" in text  # the grid cancelled everything
    time.sleep(0.2)
    assert not [p + offset for p in SERVICE_PORTS if _listening(p + offset)], text[-3000:]


def _exercise(demo: subprocess.Popen[bytes], log: IO[bytes], redis_url: str,
              offset: int) -> None:
    """While the demo runs: a book, an own order, a fill, and the README's redis-cli lines."""
    book = f"http://127.0.0.1:{8080 + offset}"

    def running() -> bool:
        assert demo.poll() is None, _text(log)
        return b"kumex-l3 is running" in _raw(log)

    wait_for(running, "the demo to start every service")
    started = _raw(log).decode(errors="replace")  # all of it: the services log a lot
    for name in ("sandbox", "feed", "book", "order_monitor", "strategy"):
        assert f"==> starting {name}: -m services.{name}" in started

    def book_served() -> bool:
        resp = httpx.get(f"{book}/book/{SYM}", params={"depth": 12}, timeout=5)
        return resp.status_code == 200 and bool(resp.json()["bids"])

    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        def own(status: set[str]) -> list[dict[str, str]]:
            found = []
            for key in r.scan_iter(keys.order(SYM, "*")):
                h = r.hgetall(key)
                if h.get("status") in status:
                    found.append(h)
            return found

        try:
            wait_for(book_served, "a synced book")
            wait_for(lambda: own({"open", "partially_filled", "filled"}), "an own order open")
            wait_for(lambda: [h for h in own({"partially_filled", "filled", "canceled"})
                              if int(h.get("filledSize", "0")) > 0], "a fill of an own order")
            # Every redis-cli command of the README's walkthrough answers something. The
            # set is live (the grid's orders fill and are replaced), so an empty answer
            # is asked again until one comes: the active set can be empty for a moment.
            for line in _readme_redis_commands():
                # The README's clientOid is an example (they are unguessable): use a
                # live one of the grid's.
                if GRID_OID.search(line):
                    live = wait_for(lambda: r.srandmember(keys.orders_active(SYM)),
                                    "an own order in the active set")
                    line = GRID_OID.sub(str(live), line)
                args = shlex.split(line)[1:]
                wait_for(lambda args=args: r.execute_command(*args),
                         f"an answer to the README command: {line}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- demo log ---\n{_text(log)}") from None


def _raw(log: IO[bytes]) -> bytes:
    return read_shared(log)


def _text(log: IO[bytes]) -> str:
    return _raw(log).decode(errors="replace")[-8000:]


def _readme_redis_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    found = [line[2:] for line in lines if line.startswith("$ redis-cli ")]
    assert len(found) >= 4, "the README's redis-cli walkthrough is missing"
    return found
