"""Availability at the real venue's limits: redundant lines, fail-over, the snapshot budget.

:func:`availability` runs, on 127.0.0.1 only, the sandbox with three symbols
and the real venue's limits (1 L3 snapshot a minute per IP, every WebSocket
connection cut after 30-60 s on its own schedule, 0.1 % of the messages
dropped per connection), two feed processes with ``FEED_LINES`` lines each
and ``FEED_SNAPSHOT_PER_MIN=1``, and one book. A poller per symbol reads
``GET /book/SYM?depth=1000`` ten times a second. Half-way through, the feed
that writes the most symbols is killed with SIGKILL (and started again ten
seconds later, as a standby). Then:

* **available**: each symbol answered 200 in at least 99.9 % of the seconds
  after its first sync (a second counts when every answer in it was a 200);
* **true**: every 200 equals the book rebuilt from the sandbox's journal at
  its own sequence;
* **snapshots only for real holes**: the book resynced only where the stream
  itself has a hole (no line delivered those messages); the losses another
  line covered never reached the stream, so they cost no snapshot.

Run it with ``FEED_LINES=1`` beside it (:mod:`bench.bench_availability`): the
baseline the redundancy must beat.

:func:`outage` is the venue-wide outage: every connection cut at once and new
ones refused for 5 s. Each symbol has a gap and needs a snapshot; with one a
minute they come back one by one, in the order the scheduler announced, and
every 503 meanwhile says when the next snapshot is due.

Nothing asserts on time: the checks count what the pollers saw.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import httpx
import redis

from chaos.scenarios import Outcome
from chaos.stack import Check, Poller, verify_answers
from kumex_l3 import keys
from kumex_l3.lease import LeaseOwner
from kumex_l3.redis_adapter import connect_sync
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, Started, metric
from kumex_l3.testing.sandbox_proc import SandboxProcess

__all__ = ["AvailabilityConfig", "Figures", "availability", "outage"]

SYMBOLS: Final = ("XBTUSDM", "XBTUSDTM", "ETHUSDTM")
#: Availability every symbol must reach (a fraction of its seconds after the first sync).
TARGET: Final = 0.999


@dataclass(frozen=True)
class AvailabilityConfig:
    """One run's sizes and knobs (the issue's figures by default)."""

    minutes: float = 10.0
    lines: int = 2
    feeds: int = 2
    symbols: tuple[str, ...] = SYMBOLS
    snapshot_per_min: float = 1.0
    drop_rate: float = 0.001
    cut_every_s: float = 30.0
    cut_every_max_s: float = 60.0
    #: Synthetic flow, actions a second (all symbols together).
    flow_rate: float = 90.0
    #: When to kill -9 the writing feed, as a fraction of the run (None: never).
    kill_at: float | None = 0.5
    restart_after_s: float = 10.0
    poll_interval: float = 0.1
    seed: int = 41
    start_sequence: int = 9_000_000
    #: Ceiling of a wait for the set to come up (never a measurement).
    safety_s: float = 400.0


@dataclass
class Figures:
    """What one run measured, per symbol and in all."""

    lines: int
    minutes: float
    symbols: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots_served: int = 0
    snapshots_rate_limited: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    feed: dict[str, float] = field(default_factory=dict)
    killed: str | None = None

    def worst(self) -> float:
        return min((s["available"] for s in self.symbols.values()), default=0.0)


class _Set(Started):
    """Redis, the sandbox, the feeds and the book of one run (see the module docstring)."""

    def __init__(self, config: AvailabilityConfig) -> None:
        self.config = config
        self.workdir = Path(tempfile.mkdtemp(prefix="kumex-availability-"))
        self.redis = RedisServer(dir=self.workdir / "redis")
        self.sandbox: SandboxProcess | None = None
        self.feeds: list[ServiceProcess] = []
        self.book: ServiceProcess | None = None
        self.http: httpx.Client | None = None
        #: Feed metrics read last, per process run (a killed feed keeps its last reading).
        self.feed_readings: dict[str, dict[str, float]] = {}

    def start(self) -> _Set:
        cfg = self.config
        (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis.start()
        seconds = cfg.minutes * 60 + 300
        per_symbol = int(cfg.flow_rate * 3.5 * seconds / len(cfg.symbols)) + 50_000
        self.sandbox = SandboxProcess({
            "SANDBOX_SYMBOLS": ",".join(cfg.symbols), "SANDBOX_FLOW_RATE": "0",
            "SANDBOX_SEED": str(cfg.seed), "SANDBOX_START_SEQUENCE": str(cfg.start_sequence),
            "SANDBOX_JOURNAL_SIZE": str(per_symbol),
            "SANDBOX_SNAPSHOT_RATE_PER_MIN": f"{cfg.snapshot_per_min:g}",
            "SANDBOX_DROP_RATE": f"{cfg.drop_rate:g}",
            "SANDBOX_DISCONNECT_EVERY_S": f"{cfg.cut_every_s:g}",
            "SANDBOX_DISCONNECT_EVERY_MAX_S": f"{cfg.cut_every_max_s:g}"}).start()
        self.http = httpx.Client(base_url=self.sandbox.base_url, timeout=30)
        self.http.post("/sandbox/step", json={"n": 400}).raise_for_status()
        for i in range(cfg.feeds):
            self.feeds.append(self._feed(i).start())
        self.book = ServiceProcess("services.book", {
            **self._common(), "BOOK_HOST": "127.0.0.1", "BOOK_REPLICA_ID": "availability-book"},
            port_var="BOOK_PORT", name="book").start()
        self.http.post("/sandbox/flow/resume", json={"rate": cfg.flow_rate}).raise_for_status()
        return self

    def _common(self) -> dict[str, str]:
        assert self.sandbox is not None
        return {"REDIS_URL": self.redis.url, "KUMEX_SYMBOLS": ",".join(self.config.symbols),
                "KUMEX_BASE_URL": self.sandbox.base_url, "LOG_LEVEL": "INFO"}

    def _feed(self, index: int) -> ServiceProcess:
        cfg = self.config
        return ServiceProcess("services.feed", {
            **self._common(), "FEED_HTTP_HOST": "127.0.0.1", "FEED_LINES": str(cfg.lines),
            "FEED_SNAPSHOT_PER_MIN": f"{cfg.snapshot_per_min:g}",
            "FEED_STREAM_MAXLEN": "2000000"},
            port_var="FEED_HTTP_PORT", name=f"feed-{index + 1}")

    def close(self) -> None:
        for proc in [self.book, *self.feeds, self.sandbox]:
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.close()
        if self.http is not None:
            self.http.close()
        with contextlib.suppress(Exception):
            self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> redis.Redis:
        return connect_sync(self.redis.url, "chaos")

    def state(self) -> dict[str, Any]:
        assert self.http is not None
        result: dict[str, Any] = self.http.get("/sandbox/state").json()
        return result

    def read_feeds(self) -> None:
        """Keep each running feed's metrics (summed at the end over every process run)."""
        for proc in self.feeds:
            if proc.process is None:
                continue
            key = f"{proc.name}:{proc.process.pid}"
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{proc.url}/metrics", timeout=5).text
                self.feed_readings[key] = _sums(text)

    def writer_counts(self) -> Counter[str]:
        """How many symbols each feed id writes now (from the leases)."""
        client = self.client()
        try:
            counts: Counter[str] = Counter()
            for symbol in self.config.symbols:
                raw = client.get(keys.owner(symbol, "feed"))
                if raw is not None:
                    counts[LeaseOwner.from_json(raw).id] += 1
            return counts
        finally:
            client.close()

    def feed_of(self, feed_id: str) -> ServiceProcess | None:
        for proc in self.feeds:
            if proc.process is None:
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if httpx.get(f"{proc.url}/readyz", timeout=5).json().get("feed") == feed_id:
                    return proc
        return None

    def stream_holes(self, symbol: str) -> tuple[int, int, int]:
        """Sequence holes in the symbol's stream (count, messages missing) and duplicates."""
        client = self.client()
        try:
            last, holes, missing, twice = None, 0, 0, 0
            cursor = "-"
            while True:
                chunk: Any = client.xrange(keys.l3_stream(symbol), cursor, "+", count=5000)
                if not chunk:
                    break
                for _, fields in chunk:
                    raw = fields.get(keys.FIELD_MSG.encode())
                    if raw is None:
                        continue
                    seq = int(json.loads(raw)["data"]["sequence"])
                    if last is not None:
                        if seq <= last:
                            twice += 1
                            continue
                        if seq > last + 1:
                            holes += 1
                            missing += seq - last - 1
                    last = seq
                if len(chunk) < 5000:
                    break
                cursor = "(" + chunk[-1][0].decode()
            return holes, missing, twice
        finally:
            client.close()


def _sums(text: str) -> dict[str, float]:
    """Every sample of a /metrics page summed by name (labels summed over)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _seconds(poller: Poller, until: float) -> dict[str, Any]:
    """Per whole second since the first 200: every answer a 200 / at least one / none."""
    times, answers = poller.times, poller.answers
    first = next((t for t, a in zip(times, answers, strict=False) if a[0] == 200), None)
    if first is None:
        return {"first_sync_s": None, "seconds": 0, "available": 0.0, "any_200": 0.0,
                "bad_seconds": [], "empty_seconds": 0, "answers": len(answers)}
    buckets: dict[int, list[int]] = {}
    for at, answer in zip(times, answers, strict=False):
        if at >= first:
            buckets.setdefault(int(at - first), []).append(answer[0])
    total = int(until - first)
    start = times[0] if times else first
    good = [s for s in range(total) if (b := buckets.get(s)) and all(x == 200 for x in b)]
    some = [s for s in range(total) if (b := buckets.get(s)) and 200 in b]
    empty = sum(1 for s in range(total) if s not in buckets)
    bad = [s for s in range(total) if s in buckets and s not in set(good)]
    return {"first_sync_s": round(first - start, 1), "seconds": total,
            "available": len(good) / max(1, total - empty),
            "any_200": len(some) / max(1, total - empty), "bad_seconds": bad[:20],
            "bad": len(bad), "empty_seconds": empty, "answers": len(answers),
            "answers_200": sum(1 for a in answers if a[0] == 200)}


def availability(config: AvailabilityConfig | None = None, *,
                 progress: Callable[[str], None] = print) -> tuple[Outcome, Figures]:
    """One run (see the module docstring): the outcome (checks) and the figures."""
    cfg = config or AvailabilityConfig()
    name = f"availability, {cfg.lines} line(s) x {cfg.feeds} feeds"
    outcome = Outcome(name)
    figures = Figures(cfg.lines, cfg.minutes)
    started = time.monotonic()
    with _Set(cfg) as run:
        assert run.book is not None and run.http is not None
        book = run.book
        pollers = {s: Poller(lambda: book.url, interval=cfg.poll_interval, symbol=s, timed=True,
                             max_answers=10_000_000) for s in cfg.symbols}
        for poller in pollers.values():
            poller.start()
        t0 = time.monotonic()
        end = t0 + cfg.minutes * 60
        kill_at = t0 + cfg.minutes * 60 * cfg.kill_at if cfg.kill_at is not None else None
        restart_at: float | None = None
        killed: ServiceProcess | None = None
        last_note = t0
        try:
            while time.monotonic() < end:
                now = time.monotonic()
                if kill_at is not None and now >= kill_at:
                    kill_at = None
                    run.read_feeds()
                    writers = run.writer_counts()
                    if writers:
                        feed_id, count = writers.most_common(1)[0]
                        killed = run.feed_of(feed_id)
                        if killed is not None:
                            figures.killed = f"{killed.name} ({feed_id}, wrote {count})"
                            progress(f"  kill -9 {figures.killed} at "
                                     f"{now - t0:.0f} s")
                            killed.kill()
                            restart_at = now + cfg.restart_after_s
                if restart_at is not None and now >= restart_at and killed is not None:
                    restart_at = None
                    killed.start()
                    progress(f"  {killed.name} started again at {time.monotonic() - t0:.0f} s")
                if now - last_note >= 60:
                    last_note = now
                    run.read_feeds()
                    ok = {s: sum(1 for a in p.answers if a[0] == 200) / max(1, len(p.answers))
                          for s, p in pollers.items()}
                    progress(f"  {now - t0:.0f} s: 200s so far " + ", ".join(
                        f"{s} {v:.2%}" for s, v in ok.items()))
                time.sleep(0.2)
        finally:
            until = time.monotonic()
            for poller in pollers.values():
                poller.stop()
        run.read_feeds()
        state = run.state()
        counts = {k: int(v) for k, v in state["faults"]["counts"].items()}
        figures.snapshots_served = counts.get("snapshots_served", 0)
        figures.snapshots_rate_limited = counts.get("snapshots_rate_limited", 0)
        figures.faults = {k: counts[k] for k in ("dropped", "disconnects") if k in counts}
        feed: dict[str, float] = {}
        for reading in run.feed_readings.values():
            for key, value in reading.items():
                feed[key] = feed.get(key, 0.0) + value
        figures.feed = {k.removeprefix("kumex_feed_"): v for k, v in feed.items() if k in {
            "kumex_feed_line_missed_total", "kumex_feed_line_covered_total",
            "kumex_feed_arbitration_holes_closed_total", "kumex_feed_arbitration_gaps_total",
            "kumex_feed_arbitration_lost_total", "kumex_feed_takeovers_total",
            "kumex_feed_takeover_backlog_total", "kumex_feed_line_reconnects_total",
            "kumex_feed_snapshots_fetched_total"}}
        # Calm, then every answer against the journal.
        run.http.post("/sandbox/flow/pause").raise_for_status()
        available = Check(f"each symbol 200 in >= {TARGET:.1%} of its seconds")
        true = Check("every 200 = journal at its sequence")
        holes_only = Check("the book resynced only where the stream has a hole")
        for symbol, poller in pollers.items():
            secs = _seconds(poller, until)
            holes, missing, twice = run.stream_holes(symbol)
            gaps = metric(book.url, "kumex_book_gaps_total", symbol=symbol)
            secs.update({"stream_holes": holes, "stream_missing": missing,
                         "stream_duplicates": twice, "book_gaps": gaps,
                         "book_resyncs": metric(book.url, "kumex_book_resyncs_total",
                                                symbol=symbol)})
            figures.symbols[symbol] = secs
            available.expect(secs["available"] >= TARGET,
                             f"{symbol}: {secs['available']:.3%} of {secs['seconds']} s "
                             f"(bad seconds {secs['bad_seconds']})")
            verified = verify_answers(run.http, symbol, cfg.start_sequence, poller.answers)
            true.checked += verified.checked
            true.violations += verified.violations
            holes_only.expect(gaps <= holes and twice == 0,
                              f"{symbol}: {gaps:g} book gaps for {holes} stream holes, "
                              f"{twice} sequences written twice")
        outcome.checks = [available, true, holes_only]
    outcome.faults = {"kill -9 writer": 1 if figures.killed else 0, **figures.faults}
    outcome.figures = {
        "lines": cfg.lines,
        "available": {s: round(v["available"], 5) for s, v in figures.symbols.items()},
        "stream holes": {s: v["stream_holes"] for s, v in figures.symbols.items()},
        "snapshots served": figures.snapshots_served,
        "line missed/covered": (figures.feed.get("line_missed_total"),
                                figures.feed.get("line_covered_total")),
    }
    outcome.seconds = time.monotonic() - started
    return outcome, figures


def outage(config: AvailabilityConfig | None = None, *, seconds: float = 5.0,
           progress: Callable[[str], None] = print) -> Outcome:
    """A venue-wide outage (see the module docstring): back in the announced order."""
    cfg = replace(config or AvailabilityConfig(), drop_rate=0.0, cut_every_s=0.0,
                  cut_every_max_s=0.0, kill_at=None)
    outcome = Outcome(f"venue-wide outage ({seconds:g} s), {cfg.snapshot_per_min:g} "
                      "snapshot/min")
    started = time.monotonic()
    period = 60.0 / cfg.snapshot_per_min
    with _Set(cfg) as run:
        assert run.book is not None and run.http is not None
        book = run.book
        progress("  waiting for every symbol's first sync (one snapshot each)")
        _wait(lambda: all(_status(book.url, s) == 200 for s in cfg.symbols), cfg.safety_s)
        pollers = {s: Poller(lambda: book.url, interval=cfg.poll_interval, symbol=s,
                             timed=True) for s in cfg.symbols}
        for poller in pollers.values():
            poller.start()
        time.sleep(2.0)
        cut = time.monotonic()
        closed = run.http.post("/sandbox/disconnect", json={"seconds": seconds}).json()
        progress(f"  outage: {closed['disconnected']} connections cut, refused {seconds:g} s")
        outcome.faults[f"outage {seconds:g} s"] = 1
        outcome.faults["connections cut"] = int(closed["disconnected"])
        limit = seconds + len(cfg.symbols) * period + 60
        _wait(lambda: all(_status(book.url, s) == 200 for s in cfg.symbols), limit)
        time.sleep(2.0)
        for poller in pollers.values():
            poller.stop()
        back = Check("each symbol back within the snapshot budget's schedule")
        named = Check("every 503 while waiting named when the next snapshot is due")
        order: list[tuple[float, str]] = []
        for symbol, poller in pollers.items():
            after = [(t, a) for t, a in zip(poller.times, poller.answers, strict=False)
                     if t >= cut]
            down = [t for t, a in after if a[0] != 200]
            returned = next((t for t, a in after if a[0] == 200 and down and t > down[0]),
                            None)
            if returned is None:
                back.fail(f"{symbol} never answered 200 after the outage")
                continue
            order.append((returned - cut, symbol))
            waiting = [d for t, d in poller.details if t >= cut and "not synced" in d]
            named.expect(bool(waiting) and all("is due" in d or "no snapshot of it is queued"
                                                in d for d in waiting),
                         f"{symbol}: 503 details {waiting[:2]}")
            named.expect(any("is due" in d for d in waiting),
                         f"{symbol}: no 503 said when the snapshot is due")
        order.sort()
        for rank, (took, symbol) in enumerate(order):
            back.expect(took <= seconds + (rank + 1) * period + 15,
                        f"{symbol} back after {took:.0f} s, rank {rank}")
        outcome.checks = [back, named]
        outcome.figures = {"back after (s)": {s: round(t, 1) for t, s in order},
                           "snapshot period (s)": period}
    outcome.seconds = time.monotonic() - started
    return outcome


def _status(url: str, symbol: str) -> int:
    try:
        return httpx.get(f"{url}/book/{symbol}", params={"depth": 1}, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _wait(check: Callable[[], bool], ceiling: float) -> None:
    deadline = time.monotonic() + ceiling
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within the {ceiling:.0f} s ceiling")
        time.sleep(0.2)


def describe(figures: Figures) -> Iterator[str]:
    """Lines of a report of one run."""
    yield (f"lines {figures.lines}: snapshots served {figures.snapshots_served} "
           f"(429s {figures.snapshots_rate_limited}), killed {figures.killed}, "
           f"faults {figures.faults}")
    for symbol, s in figures.symbols.items():
        yield (f"  {symbol}: available {s['available']:.3%} of {s['seconds']} s "
               f"(any 200 {s['any_200']:.3%}; bad {s.get('bad', 0)}, first sync "
               f"{s.get('first_sync_s')}), stream holes {s['stream_holes']} "
               f"({s['stream_missing']} messages), book gaps {s['book_gaps']:g}")
    yield f"  feed: {figures.feed}"
