"""The market-data path end to end: sandbox -> feed -> Redis -> book, as separate processes.

Everything runs here, on loopback: a throwaway ``redis-server``
(:class:`~kumex_l3.testing.devredis.RedisServer`), then ``python -m services.sandbox``,
``services.feed`` and ``services.book`` as child processes, stopped on exit and
on Ctrl-C or SIGTERM. Three figures, each printed beside its target or ceiling:

a. **Throughput.** A seeded capture of ``--messages`` level3v2 messages (one
   symbol, from an empty book) is replayed by the sandbox as fast as it can,
   resumed only once the feed is subscribed and the book is synced at sequence
   0 (an empty snapshot stored beforehand). msg/s is measured from the first
   to the last message the book applied (``GET /books`` polled every 20 ms).
   Beside it, from the same run: when each hop finished (sandbox publishing,
   feed ``XADD``: the stream ids, book), the CPU each process used per
   message (and what the rest of the machine used), and, as ceilings, the
   sandbox replaying to nobody, a fresh book reading the stream already
   written, and ``redis-benchmark`` ``XADD`` pipelined (``-P 100``, one
   connection, a message-sized field) on the same Redis server. The book's
   final L3 is compared with the sandbox's.
b. **Lag.** Synthetic flow at a rate calibrated to ``--rate`` messages/s;
   after a warm-up, ``kumex_book_apply_delay_seconds`` (exchange ``ts`` ->
   book applied, same clock) over ``--lag-seconds``, from the difference of
   two scrapes of the book's histogram: p50/p90/p99 at bucket resolution.
c. **HTTP.** While that flow runs, a separate load process (httpx, a bounded
   number of requests and seconds) sends ``GET /book/SYM?depth=12`` over
   ``--connections`` keep-alive connections: requests/s and latency p50/p99
   as the client saw them, with the apply delay during the same window.

    python -m bench.bench_pipeline [--messages 300000] [--lag-seconds 30] [--rate 5000]
                                   [--connections 8] [--http-seconds 10]
                                   [--only throughput|lag] [--feed-lines N]

The machine is shared: every figure is printed with the load average, and the
CPU lines say how much of the machine other work took meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.common import machine
from kumex_l3 import keys
from kumex_l3.redis_adapter import connect_sync
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess
from kumex_l3.testing.sandbox_proc import SandboxProcess
from kumex_l3.testing.synthetic import StreamGenerator

SYM = "XBTUSDM"
TARGET_MSG_S = 50_000
TARGET_P99_S = 0.010
POLL_S = 0.02
APPLY_DELAY = "kumex_book_apply_delay_seconds"
HTTP_DURATION = "kumex_book_http_request_duration_seconds"
#: No progress for this long in a phase: give up (a safety net, not a measurement).
STALL_S = 30.0


# --------------------------------------------------------------------------- helpers




def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def get_ok(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_of(proc: ServiceProcess | SandboxProcess) -> int | None:
    return None if proc.process is None else proc.process.pid


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far, every process (/proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU used by our processes, and by the machine as a whole, since it was made."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = dict(pids, bench=os.getpid())
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.busy = machine_busy()
        self.t0 = time.perf_counter()

    def read(self) -> tuple[dict[str, float], float, float]:
        """(CPU seconds per process, machine busy seconds, wall seconds) since the start."""
        used = {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}
        return used, machine_busy() - self.busy, time.perf_counter() - self.t0

    def describe(self, messages: int = 0, **extra: float) -> str:
        """One line; ``extra``: CPU seconds of processes measured elsewhere (already gone).

        With ``messages``, also the CPU microseconds each process spent per message.
        """
        used, busy, wall = self.read()
        used.update(extra)
        ours = sum(used.values())
        parts = ", ".join(f"{k} {v / wall:.2f}" for k, v in used.items())
        line = (f"CPU over {wall:.1f} s, in cores: {parts}; all ours {ours / wall:.2f}, "
                f"other work on the machine {max(0.0, busy - ours) / wall:.2f}, "
                f"of {os.cpu_count()}")
        if messages:
            per = ", ".join(f"{k} {v / messages * 1e6:.1f}" for k, v in used.items()
                            if k != "bench")
            line += f"\n   CPU per message, us: {per}"
        return line


@dataclass
class Buckets:
    """One scrape of a histogram: cumulative count per upper bound, and the sum."""

    counts: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    sum: float = 0.0

    def minus(self, before: Buckets) -> Buckets:
        return Buckets({le: c - before.counts.get(le, 0.0) for le, c in self.counts.items()},
                       self.total - before.total, self.sum - before.sum)

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding rank ``q * total`` (inf: past the top)."""
        if self.total <= 0:
            return math.nan
        rank = q * self.total
        lower, below = 0.0, 0.0
        for le in sorted(self.counts):
            count = self.counts[le]
            if count >= rank and count > below:
                if math.isinf(le):
                    return le
                return lower + (le - lower) * (rank - below) / (count - below)
            lower, below = le, count
        return math.inf

    def max_bucket(self) -> float:
        """Upper bound of the highest non-empty bucket."""
        for le in sorted(self.counts):
            if self.counts[le] >= self.total:
                return le
        return math.inf


def scrape(url: str, name: str, **labels: str) -> Buckets:
    """The histogram ``name`` (samples with these labels, summed) from a /metrics page."""
    out = Buckets()
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not all(s.labels.get(k) == v for k, v in labels.items()):
                continue
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                out.counts[le] = out.counts.get(le, 0.0) + s.value
            elif s.name == f"{name}_count":
                out.total += s.value
            elif s.name == f"{name}_sum":
                out.sum += s.value
    return out


def gauge(url: str, name: str, **labels: str) -> float:
    total = 0.0
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def ms(seconds: float) -> str:
    return "> 1000 ms" if math.isinf(seconds) else f"{seconds * 1000:.2f} ms"


# --------------------------------------------------------------------------- processes


#: ``--feed-lines``: the feed's redundant lines (None: its own default, 2).
FEED_EXTRA: dict[str, str] = {}


def feed_process(redis_url: str, sandbox: SandboxProcess, **extra: str) -> ServiceProcess:
    env = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM, "KUMEX_BASE_URL": sandbox.base_url,
           "FEED_HTTP_HOST": "127.0.0.1", "FEED_BACKOFF_INITIAL": "0.2",
           "FEED_BACKOFF_MAX": "1", **FEED_EXTRA, **extra}
    return ServiceProcess("services.feed", env, port_var="FEED_HTTP_PORT")


def book_process(redis_url: str, **extra: str) -> ServiceProcess:
    env = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM, "BOOK_HOST": "127.0.0.1",
           "BOOK_REPLICA_ID": "bench-book", **extra}
    return ServiceProcess("services.book", env, port_var="BOOK_PORT")


def subscribed(sandbox: SandboxProcess) -> bool:
    hub = httpx.get(f"{sandbox.base_url}/sandbox/state", timeout=5).json()["hub"]
    return any(hub["subscriptions"].values())


def book_sequence(client: httpx.Client, book_url: str) -> int | None:
    rows = client.get(f"{book_url}/books").json()["books"]
    seq = rows[0]["sequence"]
    return None if seq is None else int(seq)


# --------------------------------------------------------------------------- a. throughput


@dataclass
class Throughput:
    messages: int
    book_rate: float = 0.0
    overall_rate: float = 0.0
    alone_rate: float = 0.0
    book_alone_rate: float = 0.0
    book_alone_cpu: str = ""
    sandbox_rate: float = 0.0
    feed_rate: float = 0.0
    redis_ceiling: float | None = None
    redis_note: str = ""
    max_backlog: int = 0
    timeline: list[tuple[str, float]] = field(default_factory=list)
    cpu: str = ""
    wall: float = 0.0
    same_book: bool = False
    load: str = ""


def write_capture(path: Path, n: int, seed: int) -> str:
    """``n`` messages from an empty book at sequence 0; returns a message of about mean size."""
    lines = StreamGenerator(SYM, seed=seed, start_sequence=0).take(n)
    with path.open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line)
            fh.write("\n")
    mean = sum(map(len, lines)) / len(lines)
    sample = min(lines[:1000], key=lambda line: abs(len(line) - mean))
    say(f"capture: {n:,} messages, {mean:.0f} bytes on average, {path.stat().st_size:,} bytes")
    return sample


#: ``--sandbox-loop``: the sandbox's event loop (None: its own default, asyncio's).
SANDBOX_LOOP: dict[str, str] = {}


def replay_env(capture: Path) -> dict[str, str]:
    return {"SANDBOX_SYMBOLS": SYM, "SANDBOX_REPLAY": str(capture), "SANDBOX_REPLAY_SPEED": "0",
            "SANDBOX_FLOW_RATE": "0", "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0",
            "SANDBOX_REST_LATENCY_MS": "0", **SANDBOX_LOOP}


def replay_alone(capture: Path, n: int) -> float:
    """The sandbox's own replay rate with no client: its parse + book + hub, nothing sent."""
    with SandboxProcess(replay_env(capture)) as sandbox, httpx.Client(
            base_url=sandbox.base_url, timeout=10) as http:
        http.post("/sandbox/flow/resume").raise_for_status()
        start = time.perf_counter()
        while True:
            replay = http.get("/sandbox/state").json()["replay"]
            if replay["done"]:
                break
            if time.perf_counter() - start > max(STALL_S, n / 1000):
                raise RuntimeError("the sandbox replay alone did not finish")
            time.sleep(0.05)
        return float(replay["published"]) / (time.perf_counter() - start)


def redis_xadd_ceiling(port: int, field_text: str, n: int) -> tuple[float | None, str]:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None, "redis-benchmark is not on PATH: ceiling not available"
    cmd = [exe, "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-P", "100", "-n", str(n),
           "--csv", "XADD", "bench:xadd", "MAXLEN", "~", "100000", "*", "msg", field_text]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    row = [line for line in out.splitlines() if line.startswith('"XADD')]
    if not row:
        return None, f"redis-benchmark gave no figure: {out[-200:]!r}"
    rps = float(row[0].rsplit('","', 7)[1])  # the field itself may hold '","'
    return rps, (f"redis-benchmark -c 1 -P 100 -n {n} XADD MAXLEN ~ 100000 "
                 f"(field {len(field_text)} bytes)")


def stream_msg_ms(r: redis.Redis, newest: bool) -> int:
    """Server time (ms, from the entry id) of the oldest or newest ``msg`` entry."""
    stream = keys.l3_stream(SYM)
    end = "+"
    start = "-"
    while True:
        chunk: Any = (r.xrevrange(stream, end, "-", count=100) if newest
                      else r.xrange(stream, start, "+", count=100))
        if not chunk:
            raise RuntimeError("no message in the stream")
        for entry_id, fields in chunk:
            if keys.FIELD_MSG.encode() in fields:
                return int(entry_id.split(b"-")[0])
        last = chunk[-1][0].decode()
        if newest:
            end = f"({last}"
        else:
            start = f"({last}"


def same_book(book_url: str, sandbox: SandboxProcess) -> bool:
    """The book's full L3 equals the sandbox's replayed book (order ids, prices, sizes)."""
    ours = httpx.get(f"{book_url}/book/{SYM}/l3", params={"depth": 1000}, timeout=10).json()
    theirs = httpx.get(f"{sandbox.base_url}/sandbox/snapshot/{SYM}", timeout=10).json()
    theirs = theirs.get("data", theirs)
    for ours_side, their_side in (("bids", "bids"), ("asks", "asks")):
        got = [(o["orderId"], lv["price"], o["size"]) for lv in ours[ours_side]
               for o in lv["orders"]]
        want = [(row[0], row[1], row[2]) for row in theirs[their_side]]
        if got != want:
            return False
    return bool(ours["sequence"] == theirs["sequence"])


def follow_book(sequence: Callable[[], int], n: int, t0: float,
                more: Callable[[float, int], str] | None = None,
                ) -> tuple[tuple[float, int], float]:
    """Poll ``sequence()`` (the book's) every 20 ms until it reaches ``n``.

    Returns ``((time, sequence) of the first poll that saw a message applied, time it saw
    ``n``)``; ``more(now, sequence)`` runs at every poll and adds to the progress line.
    """
    first: tuple[float, int] | None = None
    last_seq, last_change = 0, t0
    next_line = t0 + 1.0
    while True:
        seq = sequence()
        now = time.perf_counter()
        if seq > 0 and first is None:
            first = (now, seq)
        if seq != last_seq:
            last_seq, last_change = seq, now
        if seq >= n:
            assert first is not None
            return first, now
        extra = more(now, seq) if more is not None else ""
        if now >= next_line:
            say(f"   t={now - t0:5.1f} s  book at {seq:,} / {n:,}  {extra}")
            next_line += 1.0
        if now - last_change > STALL_S:
            raise RuntimeError(f"the book stopped at sequence {seq} of {n}")
        time.sleep(POLL_S)


def book_alone(server: RedisServer, r: redis.Redis, n: int) -> tuple[float, str]:
    """A new book catching up on the stream the feed wrote: XREAD + sync + apply, no feed.

    Its checkpoint, lease and top are removed and the empty snapshot put back (the feed
    may have stored a newer one), so it starts at sequence 0 like the first.
    """
    r.delete(keys.checkpoint(SYM), keys.top(SYM), keys.owner(SYM, "book"))
    r.set(keys.snapshot(SYM), json.dumps({"symbol": SYM, "sequence": 0, "ts": 0,
                                          "bids": [], "asks": []}))
    # No feed any more: its heartbeat is not watched.
    with book_process(server.url, BOOK_FEED_CHECK_SECONDS="0") as book:
        # GET /books says nothing until the book has caught up, and scraping its metrics
        # every 20 ms costs it: read the top hash it writes (at most 10 times a second,
        # with its own ms clock) and time from its first write to its last before the end.
        pids = {"book": pid_of(book), "redis": server.pid}
        watch: CpuWatch | None = None  # from the first message applied: not the start's scan
        seen: list[tuple[int, int]] = []

        def top_sequence() -> int:
            nonlocal watch
            top: Any = r.hmget(keys.top(SYM), ["sequence", "updatedAt"])
            if top[0] is None or top[1] is None:
                return 0
            point = (int(top[0]), int(top[1]))
            if point[0] > 0 and (not seen or point != seen[-1]):
                seen.append(point)
                if watch is None:
                    watch = CpuWatch(pids)
            return point[0]

        follow_book(top_sequence, n, time.perf_counter())
        assert watch is not None
        cpu = watch.describe(messages=n - seen[0][0])
    inner = [p for p in seen if p[0] < n] or seen
    (s0, t0), (s1, t1) = seen[0], inner[-1] if inner[-1] != seen[0] else seen[-1]
    return (s1 - s0) / max(1e-3, (t1 - t0) / 1000), cpu


def phase_throughput(args: argparse.Namespace, server: RedisServer, r: redis.Redis,
                     workdir: Path) -> Throughput:
    n = args.messages
    res = Throughput(n)
    capture = workdir / "capture.jsonl"
    field_text = write_capture(capture, n, args.seed)

    say("a. the sandbox replaying the capture to nobody (its own ceiling) ...")
    res.alone_rate = replay_alone(capture, n)
    say(f"   sandbox replay alone: {res.alone_rate:,.0f} msg/s")

    r.flushall()
    # The capture starts from an empty book: store that as the snapshot, so the book is
    # synced at sequence 0 before the first message and times only the messages.
    r.set(keys.snapshot(SYM), json.dumps({"symbol": SYM, "sequence": 0, "ts": 0,
                                          "bids": [], "asks": []}))
    with contextlib.ExitStack() as stack:
        sandbox = stack.enter_context(SandboxProcess(replay_env(capture)))
        # Room for the whole capture: the figure is the path's speed, not the trimming; and
        # in the feed's buffer too: the sandbox may outrun Redis for a while on these
        # shared cores, and the figure is the whole path's pace, not the buffer's bound.
        feed = stack.enter_context(feed_process(server.url, sandbox,
                                                FEED_STREAM_MAXLEN=str(n + 100_000),
                                                FEED_BUFFER_MAX=str(n + 100_000)))
        wait_until(lambda: get_ok(f"{feed.url}/readyz"), "the feed to subscribe")
        wait_until(lambda: subscribed(sandbox), "the sandbox to see the subscription")
        book = stack.enter_context(book_process(server.url))
        wait_until(lambda: get_ok(f"{book.url}/readyz"), "the book to sync at sequence 0")
        http = stack.enter_context(httpx.Client(timeout=10))
        if book_sequence(http, book.url) != 0:
            raise RuntimeError("the book did not start at sequence 0")

        watch = CpuWatch({"sandbox": pid_of(sandbox), "feed": pid_of(feed),
                          "book": pid_of(book), "redis": server.pid})
        say(f"a. replaying {n:,} messages through sandbox -> feed -> redis -> book "
            f"({load()}) ...")
        wall0 = time.time()
        http.post(f"{sandbox.base_url}/sandbox/flow/resume").raise_for_status()
        t0 = time.perf_counter()
        sandbox_done: float | None = None
        stream = keys.l3_stream(SYM)
        polls = 0

        def hops(now: float, seq: int) -> str:
            nonlocal sandbox_done, polls
            backlog = int(r.xlen(stream)) - seq
            res.max_backlog = max(res.max_backlog, backlog)
            polls += 1
            if sandbox_done is None and polls % 5 == 0:
                replay = http.get(f"{sandbox.base_url}/sandbox/state").json()["replay"]
                if replay["done"]:
                    sandbox_done = now
            return f"stream backlog {backlog:,}"

        first, end = follow_book(lambda: book_sequence(http, book.url) or 0, n, t0, hops)
        res.cpu = watch.describe(messages=n)
        res.wall = end - t0
        res.load = load()
        res.book_rate = (n - first[1]) / (end - first[0]) if end > first[0] else math.inf
        res.overall_rate = n / (end - t0)
        if sandbox_done is None:
            sandbox_done = end
        res.sandbox_rate = n / (sandbox_done - t0)
        first_ms, last_ms = stream_msg_ms(r, newest=False), stream_msg_ms(r, newest=True)
        res.feed_rate = (n - 1) / max(1e-3, (last_ms - first_ms) / 1000)
        res.timeline = [
            ("feed: first XADD", first_ms / 1000 - wall0),
            ("book: first message applied (seen)", first[0] - t0),
            ("sandbox: last message published (seen, +-0.1 s)", sandbox_done - t0),
            ("feed: last XADD", last_ms / 1000 - wall0),
            ("book: last message applied (seen)", end - t0),
        ]
        gaps = gauge(book.url, "kumex_book_gaps_total", symbol=SYM)
        resyncs = gauge(book.url, "kumex_book_resyncs_total", symbol=SYM)
        if gaps or resyncs:
            raise RuntimeError(f"the book saw {gaps:.0f} gaps and {resyncs:.0f} resyncs")
        res.same_book = same_book(book.url, sandbox)
    say("a. a fresh book reading the same stream, already written (the book's own rate) ...")
    res.book_alone_rate, res.book_alone_cpu = book_alone(server, r, n)
    say(f"   book alone: {res.book_alone_rate:,.0f} msg/s")
    say("a. redis-benchmark XADD on the same server (the Redis hop's ceiling) ...")
    res.redis_ceiling, res.redis_note = redis_xadd_ceiling(server.port, field_text,
                                                           max(n, 500_000))
    r.delete("bench:xadd")
    return res


# --------------------------------------------------------------------------- b. lag, c. HTTP


@dataclass
class Lag:
    flow_rate: float = 0.0
    msg_rate: float = 0.0
    seconds: float = 0.0
    delay: Buckets = field(default_factory=Buckets)
    load: str = ""
    cpu: str = ""


@dataclass
class HttpLoad:
    result: dict[str, Any] = field(default_factory=dict)
    delay: Buckets = field(default_factory=Buckets)
    server: Buckets = field(default_factory=Buckets)
    msg_rate: float = 0.0
    load: str = ""
    cpu: str = ""


def pause_flow(http: httpx.Client) -> None:
    with contextlib.suppress(httpx.HTTPError):
        http.post("/sandbox/flow/pause")


def engine_sequence(http: httpx.Client) -> int:
    return int(http.get("/sandbox/state").json()["sequences"][SYM])


def measure_rate(http: httpx.Client, seconds: float,
                 sequence: Callable[[httpx.Client], int] = engine_sequence) -> float:
    s0, t0 = sequence(http), time.perf_counter()
    time.sleep(seconds)
    s1, t1 = sequence(http), time.perf_counter()
    return (s1 - s0) / (t1 - t0)


def calibrate(http: httpx.Client, target: float,
              sequence: Callable[[httpx.Client], int] = engine_sequence) -> tuple[float, float]:
    """A flow rate (actions/s) giving about ``target`` messages/s; returns (rate, msg/s).

    ``sequence(http)``: the messages counted so far (default: the benchmark's symbol's).
    """
    rate = target / 3.0
    http.post("/sandbox/flow/resume", json={"rate": rate}).raise_for_status()
    time.sleep(1.0)
    measured = 0.0
    for _ in range(4):
        measured = measure_rate(http, 3.0, sequence)
        per_action = measured / rate
        say(f"   flow {rate:,.0f} actions/s -> {measured:,.0f} msg/s "
            f"({per_action:.2f} messages an action)")
        if abs(measured - target) <= 0.03 * target:
            break
        rate = target / per_action
        http.post("/sandbox/flow/rate", json={"rate": rate}).raise_for_status()
        time.sleep(1.0)
    return rate, measured


def run_load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_pipeline", "--load-worker", url,
           "--connections", str(args.connections), "--http-seconds", str(args.http_seconds),
           "--http-max-requests", str(args.http_max_requests)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          timeout=args.http_seconds + 60, cwd=Path(__file__).parent.parent)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def phase_lag_http(args: argparse.Namespace, server: RedisServer,
                   r: redis.Redis) -> tuple[Lag, HttpLoad]:
    lag, web = Lag(), HttpLoad()
    r.flushall()
    env = {"SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": str(args.seed),
           "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0", **SANDBOX_LOOP}
    with contextlib.ExitStack() as stack:
        sandbox = stack.enter_context(SandboxProcess(env))
        feed = stack.enter_context(feed_process(server.url, sandbox,
                                                FEED_SNAPSHOT_PER_MIN="0"))
        wait_until(lambda: get_ok(f"{feed.url}/readyz"), "the feed to subscribe")
        book = stack.enter_context(book_process(server.url))
        wait_until(lambda: get_ok(f"{book.url}/readyz"), "the book to sync")
        http = stack.enter_context(httpx.Client(base_url=sandbox.base_url, timeout=10))
        # Runs first on the way out, even after Ctrl-C: the services stop faster when idle.
        stack.callback(pause_flow, http)

        say(f"b. calibrating the synthetic flow to ~{args.rate:,} msg/s ({load()}) ...")
        lag.flow_rate, _ = calibrate(http, args.rate)
        say(f"b. apply delay over {args.lag_seconds:.0f} s at flow {lag.flow_rate:,.0f} "
            f"actions/s ...")
        pids = {"sandbox": pid_of(sandbox), "feed": pid_of(feed), "book": pid_of(book),
                "redis": server.pid}
        watch = CpuWatch(pids)
        h0 = scrape(book.url, APPLY_DELAY, symbol=SYM)
        s0, t0 = engine_sequence(http), time.perf_counter()
        end = t0 + args.lag_seconds
        mark_s, mark_t = s0, t0
        while (now := time.perf_counter()) < end:
            time.sleep(min(5.0, end - now))
            s, t = engine_sequence(http), time.perf_counter()
            part = scrape(book.url, APPLY_DELAY, symbol=SYM).minus(h0)
            lag_ms = gauge(book.url, "kumex_book_stream_lag_milliseconds", symbol=SYM)
            say(f"   t={t - t0:4.0f} s  {(s - mark_s) / (t - mark_t):,.0f} msg/s, "
                f"delay p99 so far {ms(part.quantile(0.99))}, stream lag {lag_ms:.0f} ms "
                f"({load()})")
            mark_s, mark_t = s, t
        s1, t1 = engine_sequence(http), time.perf_counter()
        lag.delay = scrape(book.url, APPLY_DELAY, symbol=SYM).minus(h0)
        lag.msg_rate = (s1 - s0) / (t1 - t0)
        lag.seconds = t1 - t0
        lag.load = load()
        lag.cpu = watch.describe()

        say(f"c. GET /book/{SYM}?depth=12 from a load process, {args.connections} connections, "
            f"{args.http_seconds:.0f} s, flow still on ({load()}) ...")
        h0 = scrape(book.url, APPLY_DELAY, symbol=SYM)
        w0 = scrape(book.url, HTTP_DURATION, route="/book/{symbol}")
        s0, t0 = engine_sequence(http), time.perf_counter()
        watch = CpuWatch(pids)
        web.result = run_load(f"{book.url}/book/{SYM}?depth=12", args)
        s1, t1 = engine_sequence(http), time.perf_counter()
        web.cpu = watch.describe(load_client=web.result["client_cpu"])
        web.load = load()
        web.delay = scrape(book.url, APPLY_DELAY, symbol=SYM).minus(h0)
        web.server = scrape(book.url, HTTP_DURATION, route="/book/{symbol}").minus(w0)
        web.msg_rate = (s1 - s0) / (t1 - t0)
    return lag, web


# --------------------------------------------------------------------------- load worker


async def _load_worker(url: str, connections: int, seconds: float,
                       max_requests: int) -> dict[str, Any]:
    if httpx.URL(url).host not in {"127.0.0.1", "localhost", "::1"}:
        raise SystemExit("the load worker only targets loopback")
    latencies: list[float] = []
    errors = 0
    other = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        await asyncio.gather(*(client.get(url) for _ in range(connections)))  # open them
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal errors, other
            clock = time.perf_counter
            while clock() < deadline and len(latencies) + errors + other < max_requests:
                t = clock()
                try:
                    resp = await client.get(url)
                except httpx.HTTPError:
                    errors += 1
                    continue
                if resp.status_code == 200:
                    latencies.append(clock() - t)
                else:
                    other += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {"ok": len(latencies), "errors": errors, "non200": other, "seconds": elapsed,
            "rps": len(latencies) / elapsed, "p50": pct(0.50), "p90": pct(0.90),
            "p99": pct(0.99), "max": latencies[-1] if latencies else 0.0,
            "client_cpu": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
            "connections": connections}


# --------------------------------------------------------------------------- report


def report(a: Throughput | None, lag: Lag | None,
           web: HttpLoad | None) -> None:
    rows: list[tuple[str, str, str, str]] = []
    if a is not None:
        print()
        print(f"a. throughput, {a.messages:,} messages replayed as fast as possible ({a.load})")
        print(f"   {'end to end, book first -> last applied':48} {a.book_rate:12,.0f} msg/s")
        print(f"   {'end to end, resume -> last applied':48} {a.overall_rate:12,.0f} msg/s")
        print(f"   {'sandbox publishing (same run)':48} {a.sandbox_rate:12,.0f} msg/s")
        print(f"   {'feed XADD, first -> last (stream ids)':48} {a.feed_rate:12,.0f} msg/s")
        print(f"   {'ceiling: sandbox replaying to nobody':48} {a.alone_rate:12,.0f} msg/s")
        print(f"   {'ceiling: book alone, stream already written':48} "
              f"{a.book_alone_rate:12,.0f} msg/s")
        print(f"     {a.book_alone_cpu}")
        if a.redis_ceiling is not None:
            print(f"   {'ceiling: redis-benchmark XADD pipelined':48} "
                  f"{a.redis_ceiling:12,.0f} msg/s  ({a.redis_note})")
        else:
            print(f"   ceiling: {a.redis_note}")
        print(f"   largest stream backlog ahead of the book: {a.max_backlog:,} entries")
        print(f"   book's final L3 equals the sandbox's: {'yes' if a.same_book else 'NO'}")
        print("   timeline from resume:")
        for what, at in a.timeline:
            print(f"     {at:7.2f} s  {what}")
        print(f"   {a.cpu}")
        rows.append(("throughput, end to end (msg/s)", f"{a.book_rate:,.0f}",
                     f">= {TARGET_MSG_S:,}", "meets" if a.book_rate >= TARGET_MSG_S
                     else "MISSES"))
        rows.append(("  sandbox replay alone (msg/s)", f"{a.alone_rate:,.0f}", "ceiling", ""))
        rows.append(("  book alone, from Redis (msg/s)", f"{a.book_alone_rate:,.0f}",
                     "ceiling", ""))
        if a.redis_ceiling is not None:
            rows.append(("  redis XADD -P 100 (msg/s)", f"{a.redis_ceiling:,.0f}", "ceiling",
                         ""))
    if lag is not None:
        d = lag.delay
        print()
        print(f"b. apply delay (exchange ts -> book applied) at {lag.msg_rate:,.0f} msg/s "
              f"(flow {lag.flow_rate:,.0f} actions/s), {lag.seconds:.0f} s, "
              f"{d.total:,.0f} observations ({lag.load})")
        print(f"   p50 {ms(d.quantile(0.5))}  p90 {ms(d.quantile(0.9))}  "
              f"p99 {ms(d.quantile(0.99))}  max bucket <= {ms(d.max_bucket())}  "
              f"mean {ms(d.sum / d.total if d.total else 0.0)}")
        print("   (quantiles interpolated inside histogram buckets: bucket resolution)")
        print(f"   {lag.cpu}")
        p99 = d.quantile(0.99)
        rows.append((f"apply delay p99 @ {lag.msg_rate:,.0f} msg/s", ms(p99),
                     f"<= {ms(TARGET_P99_S)}", "meets" if p99 <= TARGET_P99_S else "MISSES"))
        rows.append(("  apply delay p50", ms(d.quantile(0.5)), "", ""))
    if web is not None:
        w = web.result
        print()
        print(f"c. GET /book/{SYM}?depth=12, {w['connections']} connections, "
              f"{w['seconds']:.1f} s, flow at {web.msg_rate:,.0f} msg/s ({web.load})")
        print(f"   {w['rps']:,.0f} req/s; client-side latency p50 {ms(w['p50'])}  "
              f"p90 {ms(w['p90'])}  p99 {ms(w['p99'])}  max {ms(w['max'])}; "
              f"{w['errors']} errors, {w['non200']} non-200")
        print(f"   {web.cpu}")
        s = web.server
        print(f"   server-side (book's histogram, coarse buckets): "
              f"p50 {ms(s.quantile(0.5))}  p99 {ms(s.quantile(0.99))}")
        d = web.delay
        print(f"   apply delay meanwhile: p50 {ms(d.quantile(0.5))}  p99 {ms(d.quantile(0.99))}"
              f"  max bucket <= {ms(d.max_bucket())}")
        rows.append(("GET /book depth=12 (req/s)", f"{w['rps']:,.0f}", "(no target)", ""))
        rows.append(("  latency p50 / p99", f"{ms(w['p50'])} / {ms(w['p99'])}", "", ""))
        rows.append(("  apply delay p99 under HTTP load", ms(d.quantile(0.99)),
                     f"<= {ms(TARGET_P99_S)}", "meets" if d.quantile(0.99) <= TARGET_P99_S
                     else "MISSES"))
    print()
    print(f"machine: {machine()}; {load()}")
    print(f"{'figure':42} {'ours':>20} {'target/ceiling':>16}  verdict")
    for name, ours, target, verdict in rows:
        print(f"{name:42} {ours:>20} {target:>16}  {verdict}")


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=300_000,
                        help="messages in the replayed capture (a)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rate", type=int, default=5_000,
                        help="messages/s of the steady flow (b, c)")
    parser.add_argument("--lag-seconds", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--http-seconds", type=float, default=10.0)
    parser.add_argument("--http-max-requests", type=int, default=200_000)
    parser.add_argument("--only", choices=["throughput", "lag"], default=None)
    parser.add_argument("--sandbox-loop", choices=["asyncio", "uvloop"], default=None,
                        help="the sandbox's event loop (default: its own, asyncio's); the "
                             "services use KUMEX_EVENT_LOOP")
    parser.add_argument("--feed-lines", type=int, default=None,
                        help="the feed's redundant WebSocket lines (default: its own, 2)")
    parser.add_argument("--load-worker", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sandbox_loop:
        SANDBOX_LOOP["SANDBOX_EVENT_LOOP"] = args.sandbox_loop
    if args.feed_lines is not None:
        FEED_EXTRA["FEED_LINES"] = str(args.feed_lines)

    if args.load_worker:
        print(json.dumps(asyncio.run(_load_worker(args.load_worker, args.connections,
                                                  args.http_seconds,
                                                  args.http_max_requests))))
        return 0

    signal.signal(signal.SIGTERM, _terminate)
    say(f"machine: {machine()}; {load()}")
    a = lag = web = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp, \
                RedisServer() as server:
            r = connect_sync(server.url, "bench")
            say(f"redis-server on port {server.port}")
            if args.only in (None, "throughput"):
                a = phase_throughput(args, server, r, Path(tmp))
            if args.only in (None, "lag"):
                lag, web = phase_lag_http(args, server, r)
            r.close()
    except KeyboardInterrupt:
        print("\ninterrupted: every process stopped", file=sys.stderr)
        return 130
    report(a, lag, web)
    return 0


if __name__ == "__main__":
    sys.exit(main())
