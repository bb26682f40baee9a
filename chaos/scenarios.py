"""The chaos scenarios: one fault each, what must be seen while it lasts, what must survive.

Every scenario takes a running :class:`~chaos.stack.Stack` and a :class:`Size`
(:data:`QUICK` for CI, :data:`FULL` for ``make chaos``), runs traffic (the
synthetic flow and demo-2's sweeps through the grid), injects its fault, and
returns an :class:`Outcome`: the faults injected (the sandbox's own counts
included), and the invariants checked with their violations. It raises only
on a bug of the harness, never on a violation, so that a driver can count.

Crash and restart (:func:`kill_and_restart`, :func:`redis_restart`): kill -9
of a service (or a Redis restart, with or without append-only persistence)
in the middle of the traffic, started again; then every invariant of
:meth:`Stack.settle <chaos.stack.Stack.settle>`, and every ``GET /book``
answer given meanwhile checked against the journal.

Network faults (:func:`feed_disconnects`, :func:`pong_silence`,
:func:`snapshot_refusals`, :func:`snapshot_rate_limit`, :func:`rest_errors`,
:func:`redis_outage`): the fault is held for a while, during which the
degradation must be *visible* (a 503, a metric, a log line), then lifted;
the set must recover *by itself* (same processes, no restart) and pass the
same invariants. :func:`memory_bound` compares each service's RSS with a
baseline.

:func:`soak` is the load test: ~5,000 messages a second through the whole
set, the book compared with the journal at checkpoints, RSS sampled, lag
figures read from the book's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

import httpx

from chaos.stack import DEPTH, SERVICES, SYM, Attacker, Check, Stack, StackConfig
from kumex_l3 import OrderBook, keys, parse_message

__all__ = [
    "FULL",
    "QUICK",
    "Outcome",
    "Size",
    "attacker",
    "crash_suite",
    "feed_disconnects",
    "kill_and_restart",
    "memory_bound",
    "network_suite",
    "pong_silence",
    "redis_outage",
    "redis_restart",
    "rest_errors",
    "snapshot_rate_limit",
    "snapshot_refusals",
    "soak",
]


@dataclass(frozen=True)
class Size:
    """How long traffic runs and faults last."""

    name: str
    #: Traffic before and after a fault, seconds.
    run_s: float
    #: How long a killed service stays down.
    dead_s: float
    #: How long a WebSocket or snapshot fault is held.
    fault_s: float
    #: The REST error window.
    rest_error_s: float
    #: How long Redis is unreachable.
    redis_down_s: float


QUICK: Final = Size("quick", run_s=3.0, dead_s=2.0, fault_s=6.0, rest_error_s=12.0,
                    redis_down_s=10.0)
FULL: Final = Size("full", run_s=15.0, dead_s=8.0, fault_s=20.0, rest_error_s=60.0,
                   redis_down_s=30.0)

#: RSS after a run of faults may be at most this factor of the baseline plus
#: :data:`RSS_SLACK_KB` (generous: the bound is against unbounded growth).
RSS_FACTOR: Final = 1.5
RSS_SLACK_KB: Final = 64 * 1024


@dataclass
class Outcome:
    """What one scenario injected and checked."""

    scenario: str
    faults: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        return sum(len(c.violations) for c in self.checks)

    @property
    def checked(self) -> int:
        return sum(c.checked for c in self.checks)

    def report(self) -> str:
        """Several lines: the scenario, its faults, each check, its figures."""
        lines = [f"{self.scenario} ({self.seconds:.0f} s): faults {self.faults}"]
        lines += [f"  {c}" for c in self.checks]
        if self.figures:
            lines.append(f"  figures: {self.figures}")
        return "\n".join(lines)


class _Run:
    """Bookkeeping of one scenario: sandbox counts and poller answers since its start."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack = stack
        self.outcome = Outcome(name)
        self._started = time.monotonic()
        self._counts = stack.counts()
        self._answers = stack.answers_seen()

    def inject(self, fault: str, n: int = 1) -> None:
        self.outcome.faults[fault] = self.outcome.faults.get(fault, 0) + n

    def check(self, name: str) -> Check:
        check = Check(name)
        self.outcome.checks.append(check)
        return check

    def finish(self, *, settle: bool = True) -> Outcome:
        stack = self.stack
        if settle:
            self.outcome.checks += stack.settle()
        for kind, n in stack.counts().items():
            delta = n - self._counts.get(kind, 0)
            if delta > 0:
                self.outcome.faults[f"sandbox:{kind}"] = delta
        self.outcome.checks.append(stack.verify_answers(self._answers))
        self.outcome.figures["book answers"] = stack.answer_counts(self._answers)
        self.outcome.seconds = time.monotonic() - self._started
        return self.outcome


def _traffic(stack: Stack) -> None:
    stack.flow(stack.config.flow_rate)
    stack.start_sweeper()


def _watch(seconds: float, every: float = 0.2) -> Iterator[float]:
    """Yields the elapsed time every ``every`` s, for ``seconds``."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        yield elapsed
        time.sleep(every)


def _pids(stack: Stack) -> dict[str, int | None]:
    return {name: stack.pid(name) for name in SERVICES}


def _recovered_alone(run: _Run, stack: Stack, pids: dict[str, int | None]) -> None:
    """Every service ready again, in the same process as before the fault."""
    check = run.check("recovered by itself (same processes, all ready)")
    for name in SERVICES:
        check.expect(stack.pid(name) == pids[name], f"{name} was restarted")
        check.expect(stack.wait_ready(name), f"{name} not ready again")


def _feed_status(stack: Stack) -> dict[str, Any]:
    try:
        body: dict[str, Any] = httpx.get(f"{stack.url('feed')}/readyz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body


def _log_mark(stack: Stack) -> dict[str, int]:
    return {name: len(stack.log(name)) for name in SERVICES}


def _drop_burst(stack: Stack, seconds: float = 0.5, rate: float = 1.0) -> None:
    """Drop the L3 messages for a moment on every connection: the book must see a gap.

    Drops are drawn per connection: a partial rate is covered by the feed's
    other line (no gap reaches the stream); every message dropped on every
    line is a real loss.
    """
    stack.faults(drop_rate=rate)
    time.sleep(seconds)
    stack.faults(drop_rate=0.0)


# ---------------------------------------------------------------------- crash and restart


_READY_TEXT: Final = {
    "feed": "connected and subscribed",
    "book": "book served",
    "order_monitor": "consuming",
    "strategy": "state rebuilt",
}


#: How long, at most, a killed feed's silence may take to reach the book: the chaos
#: stack's heartbeat TTL (2 s) plus the book's check interval (1 s), with margin.
_SILENCE_WAIT_S: Final = 10.0


def kill_and_restart(stack: Stack, size: Size, name: str) -> Outcome:
    """kill -9 of ``name`` mid-traffic; traffic goes on while it is down; started again."""
    run = _Run(stack, f"kill -9 {name}")
    _traffic(stack)
    time.sleep(size.run_s)
    mark = len(stack.log(name))
    silent = stack.metric("book", "kumex_book_feed_silent_total", symbol=SYM)
    stack.kill(name)
    run.inject(f"kill -9 {name}")
    time.sleep(size.dead_s)
    if name == "feed":
        # It said nothing as it died: its heartbeat lapses and the book stops serving
        # what may be stale (waiting on, feed still down, if that takes longer).
        seen = any(stack.metric("book", "kumex_book_feed_silent_total", symbol=SYM) > silent
                   for _ in _watch(_SILENCE_WAIT_S))
        run.check("book stopped serving once the dead feed's heartbeat lapsed").expect(
            seen, "kumex_book_feed_silent_total did not rise")
    stack.restart(name)
    check = run.check(f"{name} back after kill -9")
    check.expect(stack.wait_ready(name), f"{name} not ready after its restart")
    check.expect(_READY_TEXT[name] in stack.log(name)[mark:],
                 f"{name} did not log {_READY_TEXT[name]!r} after its restart")
    time.sleep(size.run_s)
    outcome = run.finish()
    if name == "book":
        restored = stack.metric("book", "kumex_book_checkpoint_restores_total")
        snapshots = stack.metric("book", "kumex_book_snapshots_used_total")
        outcome.figures["book restart"] = {"checkpoint restores": restored,
                                           "snapshots used": snapshots}
        run.check("book restarted from its checkpoint").expect(
            restored >= 1, "the restarted book did not start from its checkpoint")
    if name == "strategy":
        outcome.figures["strategy placed after restart"] = stack.metric(
            "strategy", "kumex_strategy_orders_placed_total")
    return outcome


def redis_restart(stack: Stack, size: Size, *, persist: bool) -> Outcome:
    """Redis restarted mid-traffic: with append-only persistence, or coming back empty.

    Empty: the restart must be detected and everything rebuilt; in particular
    the book never answers an empty (or any wrong) 200 meanwhile, and the
    own orders are tracked again.
    """
    label = "append-only" if persist else "no persistence: empty"
    run = _Run(stack, f"Redis restart ({label})")
    _traffic(stack)
    time.sleep(size.run_s)
    pids = _pids(stack)
    marks = _log_mark(stack)
    stack.redis_restart(persist=persist)
    run.inject("Redis restart" + ("" if persist else " (data lost)"))
    time.sleep(size.run_s)
    _recovered_alone(run, stack, pids)
    if not persist:
        seen = run.check("empty Redis detected (book resynced, state rebuilt)")
        book_log = stack.log("book")[marks["book"]:]
        # The lease key went with the data: the book finds it gone at its next renewal
        # ("lease lost"), or, when the rounds around the restart fail, its deadline
        # passes first ("lease not renewed in time"); either way the consumer starts again.
        seen.expect(any(line in book_log for line in (
                        "lease lost", "lease not renewed in time", "book not synced")),
                    "the book did not notice that Redis lost its data")
        strategy_log = stack.log("strategy")[marks["strategy"]:]
        seen.expect("grid state missing from Redis" in strategy_log,
                    "the strategy did not notice that Redis lost its state")
    return run.finish()


def crash_suite(size: Size, config: StackConfig | None = None,
                on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """kill -9 of each service in turn, then Redis restarts (append-only, then empty)."""
    outcomes: list[Outcome] = []

    def keep(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    with Stack(config or StackConfig()) as stack:
        for name in SERVICES:
            keep(kill_and_restart(stack, size, name))
        keep(redis_restart(stack, size, persist=True))
        keep(redis_restart(stack, size, persist=False))
    return outcomes


# ---------------------------------------------------------------------- Redis Cluster


def master_failover(stack: Stack, size: Size, rounds: int) -> Outcome:
    """kill -9 of the Redis Cluster master serving the symbol's slot, ``rounds`` times, the
    flow and demo-2's sweeps going on: its replica takes the slots over, the services find
    it alone; the killed node then comes back as a replica (the next round kills the new
    master)."""
    assert stack.cluster is not None, "a stack with StackConfig(cluster=True)"
    run = _Run(stack, "Redis Cluster: kill -9 of the symbol's master")
    _traffic(stack)
    pids = _pids(stack)
    promoted: list[float] = []
    for _ in range(rounds):
        time.sleep(size.run_s)
        victim = stack.cluster.master_of(keys.l3_stream(SYM))
        killed = time.monotonic()
        stack.cluster.kill(victim)
        promoted.append(round(time.monotonic() - killed, 1))
        run.inject("kill -9 of the symbol's master")
        time.sleep(size.run_s)
        stack.cluster.revive(victim)
    _recovered_alone(run, stack, pids)
    run.outcome.figures["replica serving after (s)"] = promoted
    return run.finish()


def cluster_suite(size: Size, rounds: int, config: StackConfig | None = None,
                  on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """The whole set on a local Redis Cluster (three masters, three replicas), its
    symbol's master killed ``rounds`` times (:func:`master_failover`)."""
    with Stack(replace(config or StackConfig(), cluster=True)) as stack:
        outcome = master_failover(stack, size, rounds)
    if on_outcome is not None:
        on_outcome(outcome)
    return [outcome]


# ---------------------------------------------------------------------- network faults


def feed_disconnects(stack: Stack, size: Size) -> Outcome:
    """``POST /sandbox/disconnect`` twice, then ``disconnect_every_s`` for a while."""
    run = _Run(stack, "feed disconnects")
    _traffic(stack)
    time.sleep(size.run_s)
    pids = _pids(stack)
    mark = len(stack.log("feed"))
    before = stack.metric("feed", "kumex_feed_reconnects_total")
    for _ in range(2):
        run.inject("disconnect", stack.post("/sandbox/disconnect")["disconnected"])
        time.sleep(1.5)
    stack.faults(disconnect_every_s=2.0)
    run.inject("disconnect_every_s=2")
    time.sleep(size.fault_s)
    stack.faults(disconnect_every_s=0.0)
    visible = run.check("degraded visibly (feed metric and log)")
    reconnects = stack.metric("feed", "kumex_feed_reconnects_total") - before
    visible.expect(reconnects >= 3, f"kumex_feed_reconnects_total rose by {reconnects:g}")
    visible.expect("reconnecting" in stack.log("feed")[mark:], "no reconnect log line")
    run.outcome.figures["feed reconnects"] = reconnects
    time.sleep(size.run_s)
    _recovered_alone(run, stack, pids)
    return run.finish()


def pong_silence(stack: Stack, size: Size) -> Outcome:
    """The sandbox stops answering pings (``pong_disabled``) for a while."""
    run = _Run(stack, "no pong")
    _traffic(stack)
    time.sleep(size.run_s)
    pids = _pids(stack)
    mark = len(stack.log("feed"))
    book_mark = len(stack.log("book"))
    before = stack.metric("feed", "kumex_feed_reconnects_total")
    downs = stack.metric("book", "kumex_book_feed_disconnects_total", symbol=SYM)
    stack.faults(pong_disabled=True)
    run.inject("pong_disabled")
    time.sleep(max(size.fault_s, 3 * stack.config.ping_timeout_ms / 1000))
    stack.faults(pong_disabled=False)
    visible = run.check("degraded visibly (ping timeout seen, logged, reconnected; the book "
                        "not served while every line was down)")
    reconnects = stack.metric("feed", "kumex_feed_reconnects_total") - before
    visible.expect(reconnects >= 1, "the feed never gave up on the silent connection")
    feed_log = stack.log("feed")[mark:]
    visible.expect("PingTimeout" in feed_log, "no ping timeout log line")
    # Each line times out on its own clock: while another line still delivers, the
    # session goes on and the book rightly keeps serving (every 200 is checked against
    # the journal). Only when every line was down at once must the book have stopped.
    ended = feed_log.count("every line lost: session ended")
    run.outcome.figures["sessions ended"] = ended
    if ended:
        visible.expect(stack.metric("book", "kumex_book_feed_disconnects_total",
                                    symbol=SYM) > downs, "the book never saw the feed go down")
        visible.expect("the feed lost the exchange" in stack.log("book")[book_mark:],
                       "no book log line about the feed losing the exchange")
    run.outcome.figures["feed reconnects"] = reconnects
    time.sleep(size.run_s)
    _recovered_alone(run, stack, pids)
    steady = run.check("connection stays up once pongs are back")
    settled_at = stack.metric("feed", "kumex_feed_reconnects_total")
    time.sleep(2 * stack.config.ping_timeout_ms / 1000 + 1)
    steady.expect(stack.metric("feed", "kumex_feed_reconnects_total") == settled_at,
                  "the feed still reconnects with pongs back")
    return run.finish()


def _book_unavailable_during(stack: Stack, seconds: float) -> tuple[int, int]:
    """Polls ``GET /book`` for ``seconds``: (503 answers, 200 answers)."""
    unavailable = served = 0
    for _ in _watch(seconds, 0.1):
        status, _ = stack.book_status()
        unavailable += status == 503
        served += status == 200
    return unavailable, served


def snapshot_refusals(stack: Stack, size: Size) -> Outcome:
    """Snapshots refused (``refuse_snapshots``) while the book has lost sync."""
    run = _Run(stack, "snapshots refused")
    _traffic(stack)
    time.sleep(size.run_s)
    pids = _pids(stack)
    mark = len(stack.log("feed"))
    before = stack.metric("feed", "kumex_feed_snapshots_refused_total")
    stack.faults(refuse_snapshots=True)
    run.inject("refuse_snapshots")
    _drop_burst(stack)
    run.inject("drop burst (a gap)")
    unavailable, _ = _book_unavailable_during(stack, size.fault_s)
    stack.faults(refuse_snapshots=False)
    visible = run.check("degraded visibly (book 503, feed metric and log)")
    visible.expect(unavailable > 0, "the book never answered 503 while it had no snapshot")
    refused = stack.metric("feed", "kumex_feed_snapshots_refused_total") - before
    visible.expect(refused >= 1, "kumex_feed_snapshots_refused_total did not rise")
    visible.expect("snapshot fetch failed" in stack.log("feed")[mark:], "no log line")
    run.outcome.figures["snapshots refused (feed)"] = refused
    time.sleep(size.run_s)
    _recovered_alone(run, stack, pids)
    return run.finish()


def snapshot_rate_limit(stack: Stack, size: Size) -> Outcome:
    """The venue's snapshot budget (``snapshot_rate_per_min``): 429s with Retry-After."""
    run = _Run(stack, "snapshot 429s")
    _traffic(stack)
    time.sleep(size.run_s)
    pids = _pids(stack)
    mark = len(stack.log("feed"))
    before = stack.metric("feed", "kumex_feed_snapshots_refused_total", reason="rate_limited")
    rate = 6.0
    stack.faults(snapshot_rate_per_min=rate)
    run.inject(f"snapshot_rate_per_min={rate:g}")
    # Every reconnect of the feed asks for a snapshot: spend the budget that way.
    for _ in range(int(rate) + 6):
        if stack.counts().get("snapshots_rate_limited", 0) > 0:
            break
        run.inject("disconnect", stack.post("/sandbox/disconnect")["disconnected"])
        stack.wait_ready("feed")
        time.sleep(0.3)
    _drop_burst(stack)
    run.inject("drop burst (a gap)")
    unavailable, _ = _book_unavailable_during(stack, 3.0)
    visible = run.check("degraded visibly (429 seen by the feed, metric and log)")
    limited = stack.metric("feed", "kumex_feed_snapshots_refused_total",
                           reason="rate_limited") - before
    visible.expect(limited >= 1, "the feed never got a 429")
    visible.expect("rate_limited" in stack.log("feed")[mark:], "no rate_limited log line")
    run.outcome.figures["429s seen by the feed"] = limited
    run.outcome.figures["book 503 answers after the gap"] = unavailable
    # Recovery within the budget: the feed waits Retry-After (at most 60 / rate s).
    back = run.check("book served again within the budget")
    back.expect(stack.wait_ready("book"), "the book never came back")
    stack.faults(snapshot_rate_per_min=0.0)
    time.sleep(size.run_s)
    _recovered_alone(run, stack, pids)
    return run.finish()


def rest_errors(stack: Stack, size: Size) -> Outcome:
    """Every REST call answers 500 for a while (token, snapshots, orders, lookups)."""
    run = _Run(stack, f"REST 500 for {size.rest_error_s:g} s")
    _traffic(stack)
    time.sleep(size.run_s)
    pids = _pids(stack)
    marks = _log_mark(stack)
    metrics_before = {
        "feed reconnects": stack.metric("feed", "kumex_feed_reconnects_total"),
        "monitor reconcile errors": stack.metric(
            "order_monitor", "kumex_order_monitor_reconcile_errors_total"),
        "strategy unknown outcomes": stack.metric("strategy",
                                                  "kumex_strategy_order_timeouts_total"),
        "strategy refused": stack.metric("strategy", "kumex_strategy_orders_refused_total"),
    }
    stack.rest_error(500, size.rest_error_s)
    run.inject(f"rest-error 500 x {size.rest_error_s:g} s")
    feed_down = book_503 = 0
    disconnected = False
    for elapsed in _watch(size.rest_error_s - 0.5, 0.2):
        if not disconnected and elapsed >= size.rest_error_s / 3:
            # A reconnect now needs a token (and a snapshot): both refused until the end.
            run.inject("disconnect", stack.post("/sandbox/disconnect")["disconnected"])
            disconnected = True
        feed_down += disconnected and not stack.ready("feed")
        book_503 += stack.book_status()[0] == 503
    visible = run.check("degraded visibly (feed not ready, logs)")
    visible.expect(feed_down > 0, "the feed never said it was not ready")
    visible.expect("bullet-public: HTTP 500" in stack.log("feed")[marks["feed"]:],
                   "the feed did not log the token refusals (HTTP 500)")
    after = {
        "feed reconnects": stack.metric("feed", "kumex_feed_reconnects_total"),
        "monitor reconcile errors": stack.metric(
            "order_monitor", "kumex_order_monitor_reconcile_errors_total"),
        "strategy unknown outcomes": stack.metric("strategy",
                                                  "kumex_strategy_order_timeouts_total"),
        "strategy refused": stack.metric("strategy", "kumex_strategy_orders_refused_total"),
    }
    run.outcome.figures["during the window"] = {
        k: after[k] - v for k, v in metrics_before.items()} | {"book 503 polls": book_503}
    time.sleep(size.run_s)
    _recovered_alone(run, stack, pids)
    return run.finish()


def redis_outage(stack: Stack, size: Size) -> Outcome:
    """The Redis process stopped for a while, then started again on the same port."""
    run = _Run(stack, f"Redis down {size.redis_down_s:g} s")
    _traffic(stack)
    time.sleep(size.run_s)
    pids = _pids(stack)
    marks = _log_mark(stack)
    errors_before = stack.metric("feed", "kumex_feed_redis_errors_total")
    stack.redis.stop()
    run.inject(f"Redis stopped {size.redis_down_s:g} s")
    seen = {"book 503": 0, "feed redis=false": 0, "feed buffering": 0,
            "monitor not ready": 0, "strategy not ready": 0}
    for _ in _watch(size.redis_down_s, 0.25):
        seen["book 503"] += stack.book_status()[0] == 503
        status = _feed_status(stack)
        seen["feed redis=false"] += status.get("redis") is False
        seen["feed buffering"] += int(status.get("buffered") or 0) > 0
        seen["monitor not ready"] += not stack.ready("order_monitor")
    stack.redis.start()
    visible = run.check("degraded visibly (book 503, feed and monitor readiness, logs)")
    visible.expect(seen["book 503"] > 0, "the book kept answering 200 with Redis gone")
    visible.expect(seen["feed redis=false"] > 0, "the feed's /readyz never said redis=false")
    visible.expect(seen["monitor not ready"] > 0, "the monitor kept saying it was ready")
    errors = stack.metric("feed", "kumex_feed_redis_errors_total") - errors_before
    visible.expect(errors >= 1, "kumex_feed_redis_errors_total did not rise")
    for name, text in (("feed", "Redis write failed"), ("book", "redis error"),
                       ("order_monitor", "consumer failed"), ("strategy", "redis error")):
        visible.expect(text in stack.log(name)[marks[name]:], f"{name}: no log line {text!r}")
    run.outcome.figures["seen during the outage (polls)"] = seen
    run.outcome.figures["feed redis errors"] = errors
    time.sleep(size.run_s)
    _recovered_alone(run, stack, pids)
    return run.finish()


def attacker(stack: Stack, size: Size, *, rest_window: bool) -> Outcome:
    """Another account copies every clientOid of the grid from the public feed and races
    it (and guesses ahead), with and without a REST 500 window (orders pending for a
    while): no order of ours may be linked to a foreign orderId, every hash must equal
    the exchange's record, and the conflicts must be visible (events, metric)."""
    name = "another account races every clientOid" + (" (REST 500 window)"
                                                        if rest_window else "")
    run = _Run(stack, name)
    assert stack.sandbox is not None
    conflicts_before = stack.metric("order_monitor",
                                    "kumex_order_monitor_clientoid_conflicts_total")
    events_from = stack.last_event_id()
    _traffic(stack)
    thief = Attacker(stack.sandbox.base_url)
    thief.start()
    try:
        time.sleep(size.run_s * 3)
        if rest_window:
            stack.rest_error(500, 5.0)
            run.inject("rest-error 500 x 5 s")
            time.sleep(6.0)
            time.sleep(size.run_s * 2)
    finally:
        thief.stop()
    run.inject("clientOids copied from the feed", thief.copies)
    run.inject("clientOids guessed", thief.guesses)
    outcome = run.finish()
    visible = Check("conflicts recorded (order events, metric)")
    conflicts = stack.metric("order_monitor",
                             "kumex_order_monitor_clientoid_conflicts_total") - conflicts_before
    events = stack.order_events_after(events_from)
    recorded = [e for e in events if e.get("change") == "conflict"]
    if thief.copies:
        visible.expect(conflicts >= 1, "no clientOid conflict counted")
        visible.expect(bool(recorded), "no conflict event in the order-events stream")
    foreign = [e for e in recorded if not e.get("conflictOrderId")]
    visible.expect(not foreign, f"conflict events without the other orderId: {foreign[:3]}")
    outcome.checks.append(visible)
    outcome.figures["conflicts"] = {"metric": conflicts, "events": len(recorded),
                                    "attacker errors": thief.errors}
    return outcome


def memory_bound(stack: Stack, baseline: dict[str, int | None]) -> Outcome:
    """RSS of each service now against ``baseline`` (the same processes, earlier)."""
    run = _Run(stack, "memory (RSS) after the faults")
    now = stack.rss()
    check = run.check(f"RSS <= {RSS_FACTOR:g} x baseline + {RSS_SLACK_KB // 1024} MiB")
    figures = {}
    for name in SERVICES:
        before, after = baseline.get(name), now.get(name)
        if before is None or after is None:
            check.fail(f"{name}: no RSS reading")
            continue
        figures[name] = f"{before // 1024} -> {after // 1024} MiB"
        check.expect(after <= before * RSS_FACTOR + RSS_SLACK_KB,
                     f"{name}: {before} KiB -> {after} KiB")
    run.outcome.figures["RSS"] = figures
    return run.finish(settle=False)


def network_suite(size: Size, config: StackConfig | None = None,
                  on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every network fault in turn on one stack, then the memory check."""
    outcomes: list[Outcome] = []

    def keep(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    with Stack(config or StackConfig()) as stack:
        _traffic(stack)
        time.sleep(size.run_s)
        baseline = stack.rss()
        for scenario in (feed_disconnects, pong_silence, snapshot_refusals,
                         snapshot_rate_limit, rest_errors, redis_outage):
            keep(scenario(stack, size))
        keep(memory_bound(stack, baseline))
    return outcomes


# ---------------------------------------------------------------------- load


def _lag_figures(stack: Stack) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{stack.url('book')}/metrics", timeout=5).text
    buckets: list[tuple[float, float]] = []
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kumex_book_stream_lag_milliseconds":
                out["stream lag ms"] = sample.value
            elif sample.name == "kumex_book_stream_lag_messages":
                out["stream lag messages"] = sample.value
            elif sample.name == "kumex_book_apply_delay_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name == "kumex_book_apply_delay_seconds_count":
                out["apply delay samples"] = sample.value
            elif sample.name == "kumex_book_apply_delay_seconds_sum":
                out["apply delay sum s"] = sample.value
    total = out.get("apply delay samples", 0.0)
    if buckets and total:
        buckets.sort()
        for q in (0.5, 0.99):
            out[f"apply delay p{int(q * 100)} <= ms"] = next(
                (le * 1000 for le, n in buckets if n >= q * total), float("inf"))
    return out


def soak(minutes: float, *, rate: float = 2450.0, checkpoint_s: float = 60.0,
         sample_s: float = 30.0, on_line: Callable[[str], None] = print) -> Outcome:
    """~5,000 messages a second through the whole set for ``minutes``.

    ``rate`` is the flow's actions a second (about 2 messages each). The
    book is checked against the journal at every checkpoint while the flow
    runs (its sequence then the true book at that sequence); the book's gap
    and stale counters must stay at zero (no message lost or reordered on the
    way); RSS and lag are sampled every ``sample_s``.
    """
    journal = int(rate * 3.5 * checkpoint_s * 3)
    config = StackConfig(flow_rate=rate, journal_size=journal, poll_interval=0,
                         sweep_interval=0.5, safety_s=180.0)
    outcome = Outcome(f"soak {minutes:g} min at flow rate {rate:g}/s")
    started = time.monotonic()
    with Stack(config) as stack:
        assert stack.http is not None
        stack.start_sweeper()
        truth = OrderBook(SYM, sequence=config.start_sequence)
        equal = Check("book = journal at checkpoints (flow running)")
        lossless = Check("no message lost or reordered (book gaps, stale, feed drops = 0)")
        outcome.checks += [equal, lossless]
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        seq0 = stack.engine_sequence()
        next_sample = next_check = t0
        end = t0 + minutes * 60
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                next_sample += sample_s
                seq = stack.engine_sequence()
                sample = {"t": round(now - t0), "msg/s": round((seq - seq0) / max(now - t0, 1)),
                          "rss MiB": {k: (v or 0) // 1024 for k, v in stack.rss().items()},
                          **_lag_figures(stack)}
                samples.append(sample)
                on_line(f"soak sample: {sample}")
            if now >= next_check:
                next_check += checkpoint_s
                _soak_checkpoint(stack, truth, equal)
            time.sleep(0.5)
        _soak_checkpoint(stack, truth, equal)
        for name, metric_name in (("book", "kumex_book_gaps_total"),
                                  ("book", "kumex_book_resyncs_total"),
                                  ("book", "kumex_book_messages_ignored_total"),
                                  ("feed", "kumex_feed_messages_dropped_total"),
                                  ("feed", "kumex_feed_gaps_total"),
                                  ("feed", "kumex_feed_reconnects_total")):
            value = stack.metric(name, metric_name)
            lossless.expect(value == 0, f"{metric_name} = {value:g}")
        elapsed = time.monotonic() - t0
        messages = stack.engine_sequence() - seq0
        sweeps = stack.sweeper.sweeps if stack.sweeper is not None else 0
        outcome.checks += stack.settle()
        rss = [s["rss MiB"] for s in samples]
        outcome.figures = {
            "messages": messages, "msg/s": round(messages / elapsed),
            "sweeps": sweeps, "fills": stack.metric("strategy", "kumex_strategy_fills_total"),
            "rss first/max/last MiB": {
                name: (rss[0][name], max(r[name] for r in rss), rss[-1][name])
                for name in (*SERVICES, "sandbox", "redis")} if rss else {},
            "stream lag ms max": max((s.get("stream lag ms", 0) for s in samples), default=0),
            "last lag figures": _lag_figures(stack),
            "samples": len(samples),
            "own orders forgotten by the sandbox (not checkable)": stack.last_forgotten,
        }
        growth = Check("RSS stable (last <= 1.5 x first sample + 64 MiB)")
        if len(rss) >= 2:
            for name in SERVICES:
                first, last = rss[1][name], rss[-1][name]  # the first sample is warm-up
                growth.expect(last <= first * RSS_FACTOR + RSS_SLACK_KB // 1024,
                              f"{name}: {first} -> {last} MiB")
        outcome.checks.append(growth)
    outcome.seconds = time.monotonic() - started
    return outcome


def _soak_checkpoint(stack: Stack, truth: OrderBook, equal: Check) -> None:
    """The book now (sequence S) against the journal's book at S, the flow running."""
    assert stack.http is not None
    try:
        r = httpx.get(f"{stack.url('book')}/book/{SYM}", params={"depth": DEPTH}, timeout=10)
    except httpx.HTTPError as exc:
        equal.fail(f"book unreachable: {exc!r}")
        return
    if r.status_code != 200:
        equal.fail(f"book answered {r.status_code} during the soak")
        return
    body = r.json()
    target = int(body["sequence"])
    while truth.sequence < target:
        page = stack.http.get(f"/sandbox/journal/{SYM}",
                              params={"after": truth.sequence, "limit": 100_000}).json()
        if page["first"] is not None and page["first"] > truth.sequence + 1:
            equal.fail(f"journal starts at {page['first']}, needed {truth.sequence + 1}")
            return
        if not page["messages"]:
            break
        for text in page["messages"]:
            if truth.sequence >= target:
                break
            truth.apply(parse_message(text))
    bids, asks = truth.depth_rows(DEPTH)
    equal.expect(truth.sequence == target and (body["bids"], body["asks"]) == (bids, asks),
                 f"book differs from the journal at sequence {target}")
