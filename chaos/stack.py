"""The whole set as real processes, and the invariants every chaos scenario checks.

:class:`Stack` starts, on 127.0.0.1 only:

* a Redis of its own (:class:`~kumex_l3.testing.devredis.RedisServer`, append-only by
  default, data in a directory that survives ``stop()``/``start()``), never
  the one on port 6379 nor the test session's;
* the sandbox exchange (journal on, seeded synthetic flow, short WebSocket
  ping interval so that a silent server is noticed in seconds);
* ``services.feed``, ``services.book``, ``services.order_monitor`` and
  ``services.strategy`` (a grid with clientOid prefix :data:`PREFIX`, demo
  key 1), each a :class:`kumex_l3.testing.procs.ServiceProcess` that can be killed with
  SIGKILL and started again on the same port.

Around them: a :class:`Poller` thread that keeps every ``GET /book`` answer
(compactly: status, sequence, digest) so that :meth:`Stack.verify_answers`
can check each 200 against the book rebuilt from the sandbox journal at the
same sequence; a :class:`Sweeper` thread through which another user (demo key
2) fills the grid's orders nearest the touch; and the checks run once things
are calm again (:meth:`Stack.settle`):

* ``book = exchange``: the served L3 book equals the sandbox engine's book at
  the same sequence;
* ``orders = exchange``: every own order's hash (``status``, ``filledSize``,
  ``orderId``) equals the sandbox's record, read with ``GET
  /api/v1/orders/byClientOid`` (:class:`kumex_l3.rest.KumexRestClient`);
* ``clientOids unique``: the demo user's orders at the sandbox never share a
  clientOid (the grid sent nothing twice);
* ``nothing untracked``: every order of the demo user has a hash, and every
  hash not ``rejected`` has an order at the sandbox.

Checks never raise: each returns a :class:`Check` holding how many things
were checked and what was wrong, so a driver can count violations. Waits
have a ceiling against hangs; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import httpx
import redis

from kumex_l3 import OrderBook, keys, parse_message
from kumex_l3.grid import is_client_oid_of
from kumex_l3.redis_adapter import connect_sync
from kumex_l3.rest import KumexRestClient
from kumex_l3.testing.devcluster import RedisClusterServers
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, Started, metric
from kumex_l3.testing.sandbox_proc import (
    DEMO_KEY_1,
    DEMO_KEY_2,
    DemoKey,
    KcAuth,
    SandboxProcess,
    sweep_through,
)

__all__ = [
    "PREFIX",
    "SERVICES",
    "SYM",
    "Attacker",
    "Check",
    "Poller",
    "Stack",
    "StackConfig",
    "Sweeper",
    "rss_kb",
    "verify_answers",
]

SYM: Final = "XBTUSDM"
#: clientOid prefix of the grid (``cg-1``, ``cg-2``...).
PREFIX: Final = "cg"
#: The project's services, in the order they start.
SERVICES: Final = ("feed", "book", "order_monitor", "strategy")
TICK: Final = Decimal("0.1")
#: Depth asked of the book service: every level of the synthetic book.
DEPTH: Final = 1000

#: Fault knobs of the sandbox with nothing injected (rates, delays, switches).
CALM_FAULTS: Final[dict[str, Any]] = {
    "drop_rate": 0.0, "duplicate_rate": 0.0, "reorder_rate": 0.0, "delay_ms": 0.0,
    "disconnect_every_s": 0.0, "refuse_snapshots": False, "snapshot_rate_per_min": 0.0,
}


# ---------------------------------------------------------------------- results


@dataclass
class Check:
    """One invariant: how many things were checked, and every violation found."""

    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def ok(self, n: int = 1) -> None:
        self.checked += n

    def fail(self, what: str) -> None:
        self.checked += 1
        self.violations.append(what)

    def expect(self, cond: bool, what: str) -> bool:
        """Count one check; record ``what`` as a violation unless ``cond``."""
        if cond:
            self.ok()
        else:
            self.fail(what)
        return cond

    @property
    def passed(self) -> bool:
        return not self.violations

    def __str__(self) -> str:
        shown = "; ".join(self.violations[:5])
        more = f" (+{len(self.violations) - 5} more)" if len(self.violations) > 5 else ""
        return f"{self.name}: {self.checked} checked, {len(self.violations)} violations" + (
            f": {shown}{more}" if self.violations else "")


def rss_kb(pid: int | None) -> int | None:
    """VmRSS of a process in KiB (``/proc/PID/status``), None when it is gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _digest(bids: Any, asks: Any) -> str:
    text = json.dumps([bids, asks], separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _deadline_loop(timeout: float, interval: float = 0.1) -> Iterator[int]:
    """Yields attempt numbers until ``timeout`` seconds have passed (a ceiling, not a test)."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        yield attempt
        attempt += 1
        if time.monotonic() > deadline:
            return
        time.sleep(interval)


# ---------------------------------------------------------------------- threads


class Poller(threading.Thread):
    """Reads ``GET /book/SYM?depth=1000`` all along; keeps (status, sequence, digest, empty).

    Bounded: at most ``max_answers`` answers, at most one every ``interval`` s.
    With ``timed``, :attr:`times` holds when each answer came (``time.monotonic()``)
    and :attr:`details` the ``detail`` of each answer that was not a 200.
    """

    def __init__(self, url: Callable[[], str], *, interval: float = 0.05,
                 max_answers: int = 200_000, symbol: str = SYM, timed: bool = False) -> None:
        super().__init__(daemon=True, name=f"chaos-book-poller-{symbol}")
        self.url = url
        self.symbol = symbol
        self.interval = interval
        self.max_answers = max_answers
        self.timed = timed
        self.halt = threading.Event()
        #: (HTTP status, sequence, digest of bids+asks, both sides empty)
        self.answers: list[tuple[int, int, str, bool]] = []
        self.times: list[float] = []
        self.details: list[tuple[float, str]] = []
        self.unreachable = 0

    def run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self.halt.is_set() and len(self.answers) < self.max_answers:
                try:
                    r = http.get(f"{self.url()}/book/{self.symbol}", params={"depth": DEPTH})
                except httpx.HTTPError:
                    self.unreachable += 1  # killed, restarting
                    self.halt.wait(self.interval)
                    continue
                if self.timed:
                    self.times.append(time.monotonic())
                if r.status_code == 200:
                    body = r.json()
                    self.answers.append((200, int(body["sequence"]),
                                         _digest(body["bids"], body["asks"]),
                                         not body["bids"] and not body["asks"]))
                else:
                    self.answers.append((r.status_code, -1, "", False))
                    if self.timed:
                        with contextlib.suppress(ValueError):
                            self.details.append((self.times[-1],
                                                 str(r.json().get("detail", ""))))
                self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


class Sweeper(threading.Thread):
    """Another user (demo key 2) sends an IOC through the grid's order nearest the touch.

    One sweep every ``interval`` s on a random side, sized to take everything
    ahead of that order in the queue and part (or all) of it. Errors (the
    sandbox answering 500 or 429 on purpose) are counted and ignored.
    """

    def __init__(self, base_url: str, *, interval: float = 0.4, seed: int = 3) -> None:
        super().__init__(daemon=True, name="chaos-sweeper")
        self.base_url = base_url
        self.interval = interval
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.sweeps = 0
        self.errors = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=5, auth=KcAuth(DEMO_KEY_1)) as own, \
                httpx.Client(base_url=self.base_url, timeout=5,
                             auth=KcAuth(DEMO_KEY_2)) as taker, \
                httpx.Client(base_url=self.base_url, timeout=5) as control:
            while not self.halt.wait(self.interval):
                try:
                    if self._sweep(own, taker, control):
                        self.sweeps += 1
                except (httpx.HTTPError, KeyError, ValueError):
                    self.errors += 1

    def _sweep(self, own: httpx.Client, taker: httpx.Client, control: httpx.Client) -> bool:
        side = self.rng.choice(["buy", "sell"])
        r = own.get("/api/v1/orders", params={"status": "active", "symbol": SYM,
                                              "side": side, "pageSize": 1000})
        r.raise_for_status()
        mine = [o for o in r.json()["data"]["items"]
                if str(o.get("clientOid", "")).startswith(PREFIX + "-")]
        if not mine:
            return False
        pick = max if side == "buy" else min
        order = pick(mine, key=lambda o: Decimal(o["price"]))
        remaining = int(order["size"]) - int(order["filledSize"])
        sweep_through(control, taker, SYM, side=side, price=Decimal(order["price"]),
                      order_id=order["id"], take=self.rng.randint(1, max(1, remaining)),
                      client_oid=f"sweep-{self.rng.getrandbits(48):012x}").raise_for_status()
        return True

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


def _grid_shaped(client_oid: str) -> bool:
    """Whether ``client_oid`` looks like one of the grid's, in its shape or the old one."""
    tail = client_oid[len(PREFIX) + 1:]
    return is_client_oid_of(PREFIX, client_oid) or (
        client_oid.startswith(PREFIX + "-") and tail.isdigit())


class Attacker(threading.Thread):
    """Another account (demo key 2) that tries to take the grid's orders over.

    It reads the public L3 feed like anyone may, and for every ``received``
    that shows one of the grid's clientOids it sends at once, under the same
    clientOid, an IOC order of its own (a buy far below the market: canceled at
    once, never filled). It also sends, under clientOids it guesses (the
    ``{prefix}-{n}`` shape grids used to have), orders ahead of the grid. If
    the grid's order monitor linked any of those to the grid's own orders, the
    grid's hashes would follow the attacker's canceled orders.
    """

    def __init__(self, base_url: str, *, price: str = "1000.0") -> None:
        super().__init__(daemon=True, name="chaos-attacker")
        self.base_url = base_url
        self.price = price
        self.halt = threading.Event()
        self.copies = 0
        self.guesses = 0
        self.errors = 0
        self._guess = 1
        self._copied: set[str] = set()

    def run(self) -> None:
        from websockets.sync.client import connect as ws_connect

        with httpx.Client(base_url=self.base_url, timeout=5, auth=KcAuth(DEMO_KEY_2)) as api:
            while not self.halt.is_set():
                try:
                    token = api.post("/api/v1/bullet-public").json()["data"]
                    server = token["instanceServers"][0]
                    url = f"{server['endpoint']}?token={token['token']}&connectId=attacker"
                    with ws_connect(url, open_timeout=10) as ws:
                        ws.recv(timeout=10)  # welcome
                        ws.send(json.dumps({"id": "1", "type": "subscribe", "response": True,
                                            "topic": f"/contractMarket/level3v2:{SYM}"}))
                        self._listen(ws, api)
                except Exception:
                    self.errors += 1
                    self.halt.wait(0.5)

    def _listen(self, ws: Any, api: httpx.Client) -> None:
        last_ping = time.monotonic()
        while not self.halt.is_set():
            if time.monotonic() - last_ping > 5:
                ws.send(json.dumps({"id": str(time.time_ns()), "type": "ping"}))
                last_ping = time.monotonic()
            try:
                frame = json.loads(ws.recv(timeout=0.5))
            except TimeoutError:
                continue
            data = frame.get("data") if isinstance(frame, dict) else None
            if frame.get("subject") != "received" or not isinstance(data, dict):
                continue
            coid = str(data.get("clientOid") or "")
            tail = coid[len(PREFIX) + 1:]
            if coid.startswith(PREFIX + "-") and tail.isdigit():
                # The old shape ({prefix}-{n}): the next ones are n+1, n+2...
                self._guess = max(self._guess, int(tail))
            if _grid_shaped(coid) and coid not in self._copied:
                self._copied.add(coid)  # its own copy shows the same clientOid: once
                self._order(api, coid)
                self.copies += 1
                for _ in range(2):  # and guesses ahead, in the old guessable shape
                    self._guess += 1
                    guess = f"{PREFIX}-{self._guess}"
                    self._copied.add(guess)  # its own: never copied when seen on the feed
                    self._order(api, guess)
                    self.guesses += 1

    def _order(self, api: httpx.Client, coid: str) -> None:
        try:
            api.post("/api/v1/orders", json={
                "clientOid": coid, "symbol": SYM, "side": "buy", "price": self.price,
                "size": 1, "leverage": "5", "timeInForce": "IOC"})
        except httpx.HTTPError:
            self.errors += 1

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


# ---------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class StackConfig:
    """Sizes and knobs of one stack (CI-sized defaults)."""

    #: Synthetic flow, actions a second (each action is one to a few messages).
    flow_rate: float = 150.0
    seed: int = 31
    start_sequence: int = 7_000_000
    #: Engine messages the sandbox keeps for :meth:`Stack.verify_answers`.
    journal_size: int = 1_500_000
    appendonly: bool = True
    #: WebSocket ping interval and pong timeout the sandbox advertises (ms).
    ping_interval_ms: int = 1000
    #: 3 s: a busy machine does not miss a pong by accident.
    ping_timeout_ms: int = 3000
    #: Symbol lease TTL of the book and the order monitor (s).
    lease_ttl_s: float = 3.0
    grid_levels: int = 3
    grid_step_ticks: int = 3
    grid_size: int = 3
    #: Flow steps run before anything connects (a book to centre the grid on).
    prime_steps: int = 400
    #: Seconds between two sweeps by demo-2 (0: no sweeper).
    sweep_interval: float = 0.4
    #: Ceiling of one wait for a service or an invariant (never a measurement).
    safety_s: float = 90.0
    #: Book polls a second at most (0: no poller).
    poll_interval: float = 0.05
    #: A Redis Cluster (three masters, one replica each) instead of one Redis.
    cluster: bool = False


class Stack(Started):
    """Sandbox, Redis and the four services as real processes (see the module docstring)."""

    def __init__(self, config: StackConfig | None = None, *,
                 workdir: Path | None = None) -> None:
        self.config = config or StackConfig()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="kumex-chaos-"))
        self.redis = RedisServer(appendonly=self.config.appendonly,
                                 dir=self.workdir / "redis")
        #: The Redis Cluster the services use instead, with ``config.cluster``.
        self.cluster = RedisClusterServers() if self.config.cluster else None
        self.sandbox: SandboxProcess | None = None
        self.procs: dict[str, ServiceProcess] = {}
        self.http: httpx.Client | None = None
        self.api: httpx.Client | None = None
        self.poller: Poller | None = None
        self.sweeper: Sweeper | None = None
        self.centre: Decimal | None = None
        #: Runs of each service (1 after start, +1 per restart).
        self.runs: dict[str, int] = {}
        #: Wall-clock ms of the last restart of Redis without persistence: own orders
        #: finished before it have lost their hashes for good (nothing to track).
        self.history_lost_ms: int | None = None
        #: Finished own orders the sandbox had forgotten at the last :meth:`check_orders`.
        self.last_forgotten = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Stack:
        cfg = self.config
        if self.cluster is not None:
            self.cluster.start()
        else:
            (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
            self.redis.start()
        self.sandbox = SandboxProcess({
            "SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": str(cfg.seed),
            "SANDBOX_START_SEQUENCE": str(cfg.start_sequence),
            "SANDBOX_JOURNAL_SIZE": str(cfg.journal_size),
            "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0",
            "SANDBOX_WS_PING_INTERVAL_MS": str(cfg.ping_interval_ms),
            "SANDBOX_WS_PING_TIMEOUT_MS": str(cfg.ping_timeout_ms)}).start()
        self.http = httpx.Client(base_url=self.sandbox.base_url, timeout=30)
        self.api = httpx.Client(base_url=self.sandbox.base_url, timeout=30,
                                auth=KcAuth(DEMO_KEY_1))
        if cfg.prime_steps:
            self.post("/sandbox/step", {"n": cfg.prime_steps})
        book = self.http.get(f"/sandbox/book/{SYM}").json()
        mid = (Decimal(book["bids"][0]["price"]) + Decimal(book["asks"][0]["price"])) / 2
        self.centre = (mid / TICK).to_integral_value() * TICK
        self._make_procs()
        for name in SERVICES:
            self.procs[name].start()
            self.runs[name] = 1
            self.wait_ready(name)
        if cfg.poll_interval > 0:
            self.poller = Poller(lambda: self.procs["book"].url, interval=cfg.poll_interval)
            self.poller.start()
        self.flow(cfg.flow_rate)
        return self

    def close(self) -> None:
        for thread in (self.sweeper, self.poller):
            if thread is not None:
                thread.stop()
        for name in reversed(SERVICES):
            proc = self.procs.get(name)
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.close()
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                self.sandbox.close()
        for client in (self.http, self.api):
            if client is not None:
                client.close()
        with contextlib.suppress(Exception):
            self.redis.stop()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _make_procs(self) -> None:
        cfg = self.config
        assert self.sandbox is not None and self.centre is not None
        common = {"REDIS_URL": self.redis_url, "KUMEX_SYMBOLS": SYM,
                  "KUMEX_BASE_URL": self.sandbox.base_url, "LOG_LEVEL": "INFO"}
        creds = _creds(DEMO_KEY_1)
        self.procs["feed"] = ServiceProcess("services.feed", {
            **common, "FEED_HTTP_HOST": "127.0.0.1", "FEED_SNAPSHOT_PER_MIN": "0",
            "FEED_BACKOFF_INITIAL": "0.2", "FEED_BACKOFF_MAX": "1",
            "FEED_REDIS_TIMEOUT": "2", "FEED_HTTP_TIMEOUT": "5",
            "FEED_HEARTBEAT_TTL_SECONDS": "2"},
            port_var="FEED_HTTP_PORT", name="feed")
        self.procs["book"] = ServiceProcess("services.book", {
            **common, "BOOK_HOST": "127.0.0.1", "BOOK_REPLICA_ID": "chaos-book",
            "BOOK_CHECKPOINT_SECONDS": "0.5", "BOOK_SNAPSHOT_RETRY_SECONDS": "0.5",
            "BOOK_READ_BLOCK_SECONDS": "0.1", "BOOK_LEASE_TTL_SECONDS": str(cfg.lease_ttl_s)},
            port_var="BOOK_PORT", name="book")
        self.procs["order_monitor"] = ServiceProcess("services.order_monitor", {
            **common, **creds, "MONITOR_HTTP_HOST": "127.0.0.1",
            "MONITOR_REPLICA_ID": "chaos-monitor", "MONITOR_BLOCK_MS": "100",
            "MONITOR_REFRESH_S": "0.5", "MONITOR_LEASE_TTL_S": str(cfg.lease_ttl_s),
            "MONITOR_UNSEEN_GRACE_MS": "1500", "MONITOR_REDIS_TIMEOUT": "2",
            "MONITOR_HTTP_TIMEOUT": "5"},
            port_var="MONITOR_HTTP_PORT", name="order_monitor")
        self.procs["strategy"] = ServiceProcess("services.strategy", {
            **common, **creds, "STRATEGY_HTTP_HOST": "127.0.0.1",
            "STRATEGY_CENTRE_PRICE": f"{self.centre:f}", "STRATEGY_CLIENT_OID_PREFIX": PREFIX,
            "STRATEGY_LEVELS": str(cfg.grid_levels),
            "STRATEGY_STEP_TICKS": str(cfg.grid_step_ticks),
            "STRATEGY_SIZE": str(cfg.grid_size), "STRATEGY_MAX_POSITION": "10000",
            "STRATEGY_MAX_OPEN_ORDERS": "60", "STRATEGY_READ_BLOCK": "0.2",
            "STRATEGY_RESOLVE_AFTER": "1", "STRATEGY_REQUEST_TIMEOUT": "5",
            "BOOK_URL": f"http://127.0.0.1:{self.procs['book'].port}"},
            port_var="STRATEGY_HTTP_PORT", name="strategy")

    # ------------------------------------------------------------------ services

    def url(self, name: str) -> str:
        return self.procs[name].url

    def pid(self, name: str) -> int | None:
        if name == "sandbox":
            proc = self.sandbox.process if self.sandbox is not None else None
        elif name == "redis":
            return self.redis.pid
        else:
            proc = self.procs[name].process
        return None if proc is None else proc.pid

    def rss(self) -> dict[str, int | None]:
        """VmRSS (KiB) of every service, the sandbox and Redis."""
        return {name: rss_kb(self.pid(name)) for name in (*SERVICES, "sandbox", "redis")}

    def ready(self, name: str) -> bool:
        """The service says it is ready (its ``/readyz``; the monitor: consuming)."""
        try:
            r = httpx.get(f"{self.url(name)}/readyz", timeout=2)
        except httpx.HTTPError:
            return False
        if name == "order_monitor":
            body = r.json()
            return bool(body.get("ready") and body.get("symbols", {}).get(SYM, {}).get("ready"))
        return r.status_code == 200

    def wait_ready(self, name: str, timeout: float | None = None) -> bool:
        """Wait until :meth:`ready` (False after the ceiling; fails if the process died)."""
        proc = self.procs[name]
        for _ in _deadline_loop(self.config.safety_s if timeout is None else timeout):
            proc.check_running()
            if self.ready(name):
                return True
        return False

    def kill(self, name: str) -> None:
        """SIGKILL: no checkpoint, no lease release, no cancel, no flush."""
        self.procs[name].kill()

    def restart(self, name: str) -> None:
        """Start again (same port and settings) and wait for ``/healthz``."""
        self.procs[name].start()
        self.runs[name] = self.runs.get(name, 0) + 1

    def metric(self, name: str, metric_name: str, **labels: str) -> float:
        """A metric of a service (0 when it cannot be read)."""
        try:
            return metric(self.url(name), metric_name, **labels)
        except httpx.HTTPError:
            return 0.0

    def log(self, name: str) -> str:
        return self.procs[name].log_text()

    def logs_contain(self, name: str, text: str, *, since: int = 0) -> bool:
        """Whether the service's output (from character ``since`` on) holds ``text``."""
        return text in self.log(name)[since:]

    def book_status(self) -> tuple[int, dict[str, Any]]:
        """``GET /book/SYM`` now: (status, body); (0, {}) when unreachable."""
        try:
            r = httpx.get(f"{self.url('book')}/book/{SYM}", params={"depth": 1}, timeout=5)
        except httpx.HTTPError:
            return 0, {}
        return r.status_code, r.json()

    # ------------------------------------------------------------------ sandbox

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.http is not None
        r = self.http.post(path, json=body if body is not None else {})
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def faults(self, **knobs: Any) -> dict[str, Any]:
        return self.post("/sandbox/faults", knobs)

    def rest_error(self, status: int | None, seconds: float = 0.0) -> None:
        self.post("/sandbox/rest-error", {"status": status, "seconds": seconds}
                  if status is not None else {"status": None})

    def flow(self, rate: float) -> None:
        self.post("/sandbox/flow/resume", {"rate": rate})

    def pause(self) -> None:
        self.post("/sandbox/flow/pause")

    def state(self) -> dict[str, Any]:
        assert self.http is not None
        result: dict[str, Any] = self.http.get("/sandbox/state").json()
        return result

    def counts(self) -> dict[str, int]:
        """Faults the sandbox injected so far, by kind."""
        return {k: int(v) for k, v in self.state()["counts"].items()}

    def engine_sequence(self) -> int:
        return int(self.state()["sequences"][SYM])

    def start_sweeper(self) -> None:
        if self.config.sweep_interval > 0 and self.sweeper is None:
            assert self.sandbox is not None
            self.sweeper = Sweeper(self.sandbox.base_url, interval=self.config.sweep_interval,
                                   seed=self.config.seed)
            self.sweeper.start()

    def stop_sweeper(self) -> int:
        """Stop sweeping; the number of sweeps sent."""
        sweeper, self.sweeper = self.sweeper, None
        if sweeper is None:
            return 0
        sweeper.stop()
        return sweeper.sweeps

    # ------------------------------------------------------------------ Redis

    @property
    def redis_url(self) -> str:
        """The services' ``REDIS_URL``: the Redis, or every node of the cluster."""
        return self.cluster.url if self.cluster is not None else self.redis.url

    def redis_client(self) -> redis.Redis:
        return connect_sync(self.redis_url, "chaos", cluster=self.cluster is not None)

    def last_event_id(self) -> str:
        """The id of the last own-order event so far ("0-0": none)."""
        client = self.redis_client()
        try:
            tail: Any = client.xrevrange(keys.order_events(SYM), count=1)
        finally:
            client.close()
        return _text(tail[0][0]) if tail else "0-0"

    def order_events_after(self, after: str) -> list[dict[str, str]]:
        """The own-order events after id ``after``, fields decoded."""
        client = self.redis_client()
        try:
            entries: Any = client.xrange(keys.order_events(SYM), f"({after}", "+")
        finally:
            client.close()
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]

    def redis_restart(self, *, persist: bool) -> None:
        """Restart Redis; without ``persist`` it comes back empty (append-only off).

        After an empty restart, append-only is switched on again at run time
        (``CONFIG SET appendonly yes`` rewrites the file from the live, empty
        data), so that later restarts keep data again.
        """
        if persist:
            self.redis.restart()
            return
        def lost_now() -> None:
            # Taken once the old server has exited: an order that finished until then
            # may have had its final hash written and lost with it.
            self.history_lost_ms = time.time_ns() // 1_000_000

        self.redis.appendonly = False
        self.redis.restart(stopped=lost_now)
        client = self.redis_client()
        try:
            client.config_set("appendonly", "yes")
            for _ in _deadline_loop(self.config.safety_s):
                info = client.info("persistence")
                if info.get("aof_enabled") and not info.get("aof_rewrite_in_progress") and \
                        not info.get("aof_rewrite_scheduled"):
                    break
        finally:
            client.close()
        self.redis.appendonly = True

    # ------------------------------------------------------------------ invariants

    def calm(self) -> None:
        """Every fault off, no REST error window, the sweeper stopped, the flow paused."""
        self.stop_sweeper()
        self.rest_error(None)
        self.faults(**CALM_FAULTS, pong_disabled=False)
        self.pause()

    def settle(self, *, steps: int = 30) -> list[Check]:
        """Calm everything, let the set catch up, and check every invariant."""
        self.calm()
        # A few more messages: a trailing drop becomes a visible gap.
        self.post("/sandbox/step", {"n": steps})
        checks = [self.check_book()]
        checks += self.check_orders()
        return checks

    def check_book(self, timeout: float | None = None) -> Check:
        """``book = exchange``: the served L3 book equals the engine's at the same sequence."""
        check = Check("book = exchange at the same sequence")
        assert self.http is not None
        last = "never answered"
        for _ in _deadline_loop(self.config.safety_s if timeout is None else timeout, 0.1):
            engine = self.http.get(f"/sandbox/book/{SYM}").json()
            try:
                r = httpx.get(f"{self.url('book')}/book/{SYM}/l3", params={"depth": DEPTH},
                              timeout=5)
            except httpx.HTTPError as exc:
                last = f"book unreachable: {exc!r}"
                continue
            if r.status_code != 200:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            ours = r.json()
            if ours["sequence"] != engine["sequence"]:
                last = f"book at {ours['sequence']}, engine at {engine['sequence']}"
                continue
            for side in ("bids", "asks"):
                got = [(lv["price"], [(o["orderId"], int(o["size"])) for o in lv["orders"]])
                       for lv in ours[side]]
                want = [(lv["price"], [(o["orderId"], int(o["size"])) for o in lv["orders"]])
                        for lv in engine[side]]
                check.expect(got == want, f"{side} differ from the engine's at sequence "
                                          f"{ours['sequence']}")
            return check
        check.fail(f"the book never reached the engine's sequence: {last}")
        return check

    def _exchange_orders(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The demo user's orders at the sandbox by clientOid, and the clientOids seen twice."""
        assert self.api is not None
        out: dict[str, dict[str, Any]] = {}
        twice: list[str] = []
        for status in ("active", "done"):
            page = 1
            while True:
                r = self.api.get("/api/v1/orders", params={
                    "status": status, "symbol": SYM, "pageSize": 1000, "currentPage": page})
                r.raise_for_status()
                data = r.json()["data"]
                for item in data["items"]:
                    coid = item["clientOid"]
                    if coid in out:
                        twice.append(coid)
                    out[coid] = item
                if page >= int(data["totalPage"]):
                    break
                page += 1
        return out, twice

    def _hashes(self) -> dict[str, dict[str, str]] | None:
        """Every own-order hash of the grid prefix (None when Redis cannot be read)."""
        client = self.redis_client()
        try:
            head = len(keys.order(SYM, ""))
            out: dict[str, dict[str, str]] = {}
            for key in client.scan_iter(match=keys.order(SYM, f"{PREFIX}-*"), count=1000):
                raw: dict[Any, Any] = client.hgetall(key)
                if raw:
                    out[_text(key)[head:]] = {_text(k): _text(v) for k, v in raw.items()}
            return out
        except redis.RedisError:
            return None
        finally:
            client.close()

    def _strategy_idle(self) -> bool:
        """The strategy has acted on the last order event (and is running, ready)."""
        client = self.redis_client()
        try:
            tail: Any = client.xrevrange(keys.order_events(SYM), count=1)
        except redis.RedisError:
            return False
        finally:
            client.close()
        try:
            state = httpx.get(f"{self.url('strategy')}/state", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(state.get("ready")) and (
            not tail or state.get("lastEventId") == _text(tail[0][0]))

    def _trackable(self, exchange: dict[str, dict[str, Any]],
                   hashes: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
        """The orders that must have a hash: all, but those finished before Redis lost its
        data (their hashes are gone for good) unless a hash came back for them."""
        lost = self.history_lost_ms
        if lost is None:
            return exchange
        return {c: r for c, r in exchange.items()
                if c in hashes or r["isActive"] or int(r["updatedAt"]) >= lost}

    def _order_diffs(self, exchange: dict[str, dict[str, Any]],
                     hashes: dict[str, dict[str, str]]) -> list[str]:
        diffs = []
        for coid, rec in exchange.items():
            h = hashes.get(coid)
            if h is None:
                diffs.append(f"{coid}: no hash (untracked)")
                continue
            want = (_expected_status(rec), int(rec["filledSize"]), rec["id"])
            got = (h.get("status"), int(Decimal(h.get("filledSize") or "-1")), h.get("orderId"))
            if got != want:
                diffs.append(f"{coid}: hash {got} != exchange {want}")
        for coid in self._unknown(exchange, hashes):
            diffs.append(f"{coid}: hash says {hashes[coid].get('status')!r}, the exchange "
                         "has no such order")
        return diffs

    @staticmethod
    def _unknown(exchange: dict[str, dict[str, Any]],
                 hashes: dict[str, dict[str, str]]) -> list[str]:
        """Hashes of orders the exchange does not have (rejected ones aside).

        The sandbox remembers only its last 50,000 done orders (every user's),
        forgetting the oldest first: a finished hash it no longer lists is a
        violation only if it was written well after the oldest done order the
        sandbox still lists (else see :meth:`forgotten`).
        """
        remembered = [int(r["updatedAt"]) for r in exchange.values() if not r["isActive"]]
        since = min(remembered) + _FORGET_MARGIN_MS if remembered else None
        out = []
        for coid, h in hashes.items():
            status = h.get("status")
            if coid in exchange or status == "rejected":
                continue
            if status in ("filled", "canceled") and (
                    since is None or int(h.get("updatedAt") or 0) <= since):
                continue  # may have been forgotten by the sandbox
            out.append(coid)
        return out

    @classmethod
    def forgotten(cls, exchange: dict[str, dict[str, Any]],
                  hashes: dict[str, dict[str, str]]) -> list[str]:
        """Finished (filled, canceled) hashes the sandbox may have forgotten."""
        unknown = set(cls._unknown(exchange, hashes))
        return [c for c, h in hashes.items() if c not in exchange and c not in unknown
                and h.get("status") in ("filled", "canceled")]

    def check_orders(self, timeout: float | None = None) -> list[Check]:
        """``orders = exchange``, ``clientOids unique``, ``nothing untracked``."""
        equal = Check("own orders = exchange (status, filledSize)")
        unique = Check("grid clientOids unique at the exchange")
        tracked = Check("every exchange order tracked, every hash known")
        diffs: list[str] = ["not compared yet"]
        exchange: dict[str, dict[str, Any]] = {}
        hashes: dict[str, dict[str, str]] = {}
        twice: list[str] = []
        for _ in _deadline_loop(self.config.safety_s if timeout is None else timeout, 0.2):
            if not self._strategy_idle():
                diffs = ["the strategy has not acted on the last order event"]
                continue
            exchange, twice = self._exchange_orders()
            found = self._hashes()
            if found is None:
                diffs = ["Redis unreadable"]
                continue
            hashes = found
            exchange = self._trackable(exchange, hashes)
            diffs = self._order_diffs(exchange, hashes)
            if not diffs:
                break
        unique.expect(not twice, f"clientOids sent twice: {sorted(set(twice))[:10]}")
        unique.ok(len(exchange))
        untracked = [c for c in exchange if c not in hashes]
        unknown = self._unknown(exchange, hashes)
        self.last_forgotten = len(self.forgotten(exchange, hashes))
        tracked.expect(not untracked, f"exchange orders without a hash: {untracked[:10]}")
        tracked.expect(not unknown, f"hashes the exchange does not know: {unknown[:10]}")
        tracked.ok(len(exchange))
        # Confirmed one by one, as a client would: GET /api/v1/orders/byClientOid.
        records = asyncio.run(self._records_by_client_oid(sorted(exchange)))
        for coid in sorted(exchange):
            rec, h = records.get(coid), hashes.get(coid)
            if rec is None or h is None:
                equal.fail(f"{coid}: byClientOid {'found' if rec else 'found nothing'}, "
                           f"hash {'found' if h else 'missing'}")
                continue
            want = (_expected_status(rec), int(rec["filledSize"]), rec["id"])
            got = (h.get("status"), int(Decimal(h.get("filledSize") or "-1")),
                   h.get("orderId"))
            equal.expect(got == want, f"{coid}: hash {got} != exchange {want}")
        if not exchange:
            equal.fail("the demo user has no order at the exchange: the grid never traded")
        if diffs and not equal.violations and not tracked.violations:
            equal.fail(f"not settled: {diffs[0]}")
        return [equal, unique, tracked]

    async def _records_by_client_oid(self, coids: list[str]) -> dict[str, dict[str, Any]]:
        assert self.sandbox is not None
        out: dict[str, dict[str, Any]] = {}
        key = DEMO_KEY_1
        async with KumexRestClient(self.sandbox.base_url, key.key, key.secret, key.passphrase,
                                   timeout=10) as rest:
            gate = asyncio.Semaphore(8)

            async def one(coid: str) -> None:
                async with gate:
                    record = await rest.get_order_by_client_oid(coid, SYM)
                if record is not None:
                    out[coid] = dict(record.raw)

            await asyncio.gather(*(one(c) for c in coids))
        return out

    def answers_seen(self) -> int:
        """How many answers the poller kept so far (an index for :meth:`verify_answers`)."""
        return 0 if self.poller is None else len(self.poller.answers)

    def verify_answers(self, since: int = 0) -> Check:
        """Every 200 the poller got (from answer ``since`` on) equals the journal's book
        at its sequence (:func:`verify_answers`)."""
        if self.poller is None:
            return Check("every GET /book 200 = journal at its sequence")
        assert self.http is not None
        return verify_answers(self.http, SYM, self.config.start_sequence,
                              self.poller.answers[since:])

    def answer_counts(self, since: int = 0) -> dict[str, int]:
        """How the book answered (from answer ``since`` on): 200, 503, empty 200."""
        poller = self.poller
        if poller is None:
            return {}
        answers = poller.answers[since:]
        ok = sum(1 for a in answers if a[0] == 200)
        unavailable = sum(1 for a in answers if a[0] == 503)
        empty = sum(1 for a in answers if a[0] == 200 and a[3])
        return {"200": ok, "503": unavailable, "other": len(answers) - ok - unavailable,
                "empty 200": empty}


def verify_answers(http: httpx.Client, symbol: str, start_sequence: int,
                   answers: list[tuple[int, int, str, bool]]) -> Check:
    """Every 200 of ``answers`` (a :class:`Poller`'s) equals the book rebuilt from the
    sandbox's journal of ``symbol`` (read through ``http``) at its sequence.

    Also counted as violations: a 200 with an empty book while the true book was
    not empty (a silent empty book), answers at sequences the engine never had,
    and statuses other than 200 and 503.
    """
    check = Check(f"every GET /book/{symbol} 200 = journal at its sequence")
    by_seq: dict[int, list[tuple[str, bool]]] = {}
    for status, seq, digest, empty in answers:
        if status == 200:
            by_seq.setdefault(seq, []).append((digest, empty))
        elif status != 503:
            check.fail(f"an answer with HTTP {status}")
    truth = OrderBook(symbol, sequence=start_sequence)
    after = start_sequence
    first = True
    while by_seq:
        page = http.get(f"/sandbox/journal/{symbol}",
                        params={"after": after, "limit": 100_000}).json()
        if first and page["first"] is not None and page["first"] > after + 1:
            check.fail(f"the journal starts at {page['first']}: raise journal_size")
            return check
        first = False
        texts = page["messages"]
        if not texts:
            break
        for text in texts:
            truth.apply(parse_message(text))
            got = by_seq.pop(truth.sequence, None)
            if got is None:
                continue
            bids, asks = truth.depth_rows(DEPTH)
            want = _digest(bids, asks)
            true_empty = not bids and not asks
            for digest, empty in got:
                if empty and not true_empty:
                    check.fail(f"an empty book served at sequence {truth.sequence}")
                else:
                    check.expect(digest == want,
                                 f"a wrong book served at sequence {truth.sequence}")
        after = truth.sequence
    if by_seq:
        check.fail(f"{len(by_seq)} answers at sequences the engine never had: "
                   f"{sorted(by_seq)[:5]}")
    return check


#: A finished hash written this long after the oldest done order the sandbox still
#: lists cannot be one it forgot (it forgets done orders oldest first).
_FORGET_MARGIN_MS: Final = 60_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _creds(key: DemoKey) -> dict[str, str]:
    return {"KUMEX_API_KEY": key.key, "KUMEX_API_SECRET": key.secret,
            "KUMEX_API_PASSPHRASE": key.passphrase}


def _expected_status(rec: dict[str, Any]) -> str:
    """The own-order status the exchange's record implies."""
    filled, size = int(rec["filledSize"]), int(rec["size"])
    if rec["isActive"]:
        return "partially_filled" if filled else "open"
    return "canceled" if rec.get("cancelExist") or filled < size else "filled"
