"""The book's read path: GET /book under ``wrk`` while the book applies a live flow.

Everything runs here, on loopback: a throwaway ``redis-server``, the sandbox,
the feed and the book as child processes. The book, its Redis (0.1 core at
5,000 msg/s) and the ceiling server below are pinned to core 0; the sandbox and
the feed (the exchange and the feed's host) and ``wrk`` to the other cores, so
that the book's figures are one core's. (With Redis beside the busy sandbox,
the scheduler delays Redis's replies by up to tens of milliseconds now and
then, which is the machine's, not the book's.) ``wrk`` runs niced: on a
two-core machine it shares its core with the sandbox and the feed, which must
keep the flow on time. Debian's ``wrk`` (a C load generator) is installed with
``apt-get`` when missing.

a. **Read path.** For each of 8, 32 and 64 connections, ``wrk --latency`` for
   ``--seconds`` on ``GET /book/SYM?depth=12``, ``GET /book/SYM/l3?depth=5`` and,
   as the ceiling, the same server stack answering a constant 2 KB body
   (:mod:`bench.read_ceiling`: the fast route, and a plain FastAPI route): req/s
   and p50/p99 as ``wrk`` saw them, and the book's apply delay p99
   (``kumex_book_apply_delay_seconds``: exchange ``ts`` -> applied, an upper bound
   of feed receipt -> applied) during the same seconds. Idle first, then under a
   synthetic flow calibrated to ``--rate`` msg/s, with a window with no readers
   before the loaded runs.
b. **Symbols.** The book's CPU per message at ``--rate`` msg/s over one symbol,
   then over three (the same total rate spread by the sandbox's flow): the
   ratio says what each symbol's fixed costs add.

    python -m bench.bench_read [--seconds 8] [--rate 5000] [--connections 8,32,64]
                               [--only read|symbols]

The machine is shared: every figure is printed with the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.bench_pipeline import (
    APPLY_DELAY,
    Buckets,
    CpuWatch,
    calibrate,
    get_ok,
    load,
    pause_flow,
    say,
    scrape,
    wait_until,
)
from bench.common import machine
from kumex_l3.redis_adapter import connect_sync
from kumex_l3.testing.devredis import RedisServer, free_port
from kumex_l3.testing.procs import ServiceProcess
from kumex_l3.testing.sandbox_proc import SandboxProcess

ROOT = Path(__file__).resolve().parent.parent
RECEIPT_DELAY = "kumex_book_receipt_delay_seconds"
SYMBOLS = ("XBTUSDM", "XBTUSDTM", "ETHUSDTM")
SYM = SYMBOLS[0]
BOOK_CORE = 0


# --------------------------------------------------------------------------- cores and wrk


def other_cores() -> str:
    cores = sorted(os.sched_getaffinity(0) - {BOOK_CORE})
    return ",".join(map(str, cores)) if cores else str(BOOK_CORE)


def pin(pid: int | None, cores: str) -> None:
    """Every thread of ``pid`` on ``cores`` (``taskset -a``)."""
    if pid is not None:
        subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)], check=True,
                       stdout=subprocess.DEVNULL)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    say("wrk is missing: installing Debian's wrk with apt-get ...")
    apt = ["apt-get", "install", "-y", "-q", "wrk"]
    if os.geteuid() != 0:
        apt.insert(0, "sudo")
    if subprocess.call(apt) != 0:
        subprocess.check_call([*apt[:-4], "update", "-q"] if os.geteuid() else
                              ["apt-get", "update", "-q"])
        subprocess.check_call(apt)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk could not be installed")
    return found


@dataclass
class Wrk:
    """What one ``wrk --latency`` run reported."""

    rps: float
    p50: float
    p99: float
    non2xx: int
    errors: int

    @staticmethod
    def parse(text: str) -> Wrk:
        def seconds(value: str) -> float:
            m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
            if m is None:
                return math.nan
            return float(m[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m[2]]

        rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
        p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
        p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                           r"timeout (\d+)", text)
        return Wrk(float(rps[1]) if rps else 0.0, seconds(p50[1]) if p50 else math.nan,
                   seconds(p99[1]) if p99 else math.nan, int(non2xx[1]) if non2xx else 0,
                   sum(int(g) for g in errors.groups()) if errors else 0)


def run_wrk(wrk: str, url: str, connections: int, seconds: float) -> Wrk:
    threads = max(1, min(connections, len(other_cores().split(","))))
    # Niced: on a two-core machine wrk shares its core with the sandbox and the feed,
    # which must keep the flow on time (they would be other hosts in production).
    cmd = ["taskset", "-c", other_cores(), "nice", "-n", "10", wrk, f"-t{threads}",
           f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          timeout=seconds + 60)
    return Wrk.parse(done.stdout)


# --------------------------------------------------------------------------- processes


def sandbox_env(symbols: tuple[str, ...]) -> dict[str, str]:
    return {"SANDBOX_SYMBOLS": ",".join(symbols), "SANDBOX_FLOW_RATE": "0",
            "SANDBOX_SEED": "7", "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0",
            "SANDBOX_REST_LATENCY_MS": "0"}


def feed_process(redis_url: str, sandbox: SandboxProcess,
                 symbols: tuple[str, ...]) -> ServiceProcess:
    env = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": ",".join(symbols),
           "KUMEX_BASE_URL": sandbox.base_url, "FEED_HTTP_HOST": "127.0.0.1",
           "FEED_SNAPSHOT_PER_MIN": "0", "FEED_LINES": "1"}
    return ServiceProcess("services.feed", env, port_var="FEED_HTTP_PORT")


def book_process(redis_url: str, symbols: tuple[str, ...]) -> ServiceProcess:
    env = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": ",".join(symbols), "BOOK_HOST": "127.0.0.1",
           "BOOK_REPLICA_ID": "bench-read"}
    return ServiceProcess("services.book", env, port_var="BOOK_PORT")


@contextlib.contextmanager
def ceiling_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.read_ceiling", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get_ok(f"{url}/constant"), "the ceiling server")
        pin(proc.pid, str(BOOK_CORE))
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class Stack:
    sandbox: SandboxProcess
    feed: ServiceProcess
    book: ServiceProcess
    http: httpx.Client


@contextlib.contextmanager
def stack(server: RedisServer, symbols: tuple[str, ...]) -> Iterator[Stack]:
    r = connect_sync(server.url, "bench")
    r.flushall()
    r.close()
    with contextlib.ExitStack() as es:
        sandbox = es.enter_context(SandboxProcess(sandbox_env(symbols)))
        feed = es.enter_context(feed_process(server.url, sandbox, symbols))
        wait_until(lambda: get_ok(f"{feed.url}/readyz"), "the feed to subscribe")
        book = es.enter_context(book_process(server.url, symbols))
        wait_until(lambda: get_ok(f"{book.url}/readyz"), "the book to sync")
        for proc in (sandbox, feed):
            pin(None if proc.process is None else proc.process.pid, other_cores())
        pin(None if book.process is None else book.process.pid, str(BOOK_CORE))
        http = es.enter_context(httpx.Client(base_url=sandbox.base_url, timeout=10))
        es.callback(pause_flow, http)
        yield Stack(sandbox, feed, book, http)


def total_sequence(http: httpx.Client) -> int:
    return sum(int(v) for v in http.get("/sandbox/state").json()["sequences"].values())


# --------------------------------------------------------------------------- a. read path


@dataclass
class Row:
    phase: str
    connections: int
    target: str
    result: Wrk
    delay_p99: float
    receipt_p99: float
    #: The flow's messages/s during the run (0 when idle).
    rate: float
    load: str


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return "> 1000" if math.isinf(seconds) else f"{seconds * 1000:.2f}"


def phase_read(args: argparse.Namespace, server: RedisServer, wrk: str) -> tuple[
        list[Row], dict[str, float]]:
    rows: list[Row] = []
    extra: dict[str, float] = {}
    with stack(server, (SYM,)) as s, ceiling_server() as ceiling:
        book = s.book.url
        targets = [("book", f"{book}/book/{SYM}?depth=12"), ("l3", f"{book}/book/{SYM}/l3?depth=5"),
                   ("ceiling", f"{ceiling}/constant"), ("fastapi", f"{ceiling}/constant/app")]
        for phase in ("idle", "flow"):
            if phase == "flow":
                say(f"a. calibrating the flow to ~{args.rate:,} msg/s ({load()}) ...")
                _, measured = calibrate(s.http, args.rate, total_sequence)
                extra["rate"] = measured
                say(f"a. no readers for {args.quiet_seconds:g} s ...")
                pid = None if s.book.process is None else s.book.process.pid
                watch = CpuWatch({"book": pid})
                h0, r0, q0 = (scrape(book, APPLY_DELAY), scrape(book, RECEIPT_DELAY),
                              total_sequence(s.http))
                time.sleep(args.quiet_seconds)
                used, _, _ = watch.read()
                messages = total_sequence(s.http) - q0
                extra["quiet_p99"] = scrape(book, APPLY_DELAY).minus(h0).quantile(0.99)
                extra["quiet_receipt_p99"] = scrape(book, RECEIPT_DELAY).minus(r0).quantile(
                    0.99)
                extra["one_symbol_us"] = used["book"] / max(1, messages) * 1e6
                extra["quiet_rate"] = messages / args.quiet_seconds
            for conns in args.connections:
                for name, url in targets:
                    h0, r0 = scrape(book, APPLY_DELAY), scrape(book, RECEIPT_DELAY)
                    q0, t0 = total_sequence(s.http), time.perf_counter()
                    result = run_wrk(wrk, url, conns, args.seconds)
                    rate = (total_sequence(s.http) - q0) / (time.perf_counter() - t0)
                    delay = scrape(book, APPLY_DELAY).minus(h0)
                    receipt = scrape(book, RECEIPT_DELAY).minus(r0)
                    p99 = delay.quantile(0.99) if delay.total else math.nan
                    rp99 = receipt.quantile(0.99) if receipt.total else math.nan
                    rows.append(Row(phase, conns, name, result, p99, rp99, rate, load()))
                    say(f"   {phase:4} {conns:3} conns {name:8} {result.rps:9,.0f} req/s "
                        f"p50 {ms(result.p50)} ms p99 {ms(result.p99)} ms, "
                        f"p99 receipt->applied {ms(rp99)} ms, exchange->applied {ms(p99)} ms, "
                        f"flow {rate:,.0f} msg/s ({load()})")
    return rows, extra


# --------------------------------------------------------------------------- b. symbols


def book_cost(args: argparse.Namespace, server: RedisServer, symbols: tuple[str, ...]) -> tuple[
        float, float, Buckets]:
    """(book CPU us per message, msg/s, apply delay) at ``args.rate`` over ``symbols``."""
    with stack(server, symbols) as s:
        say(f"b. {len(symbols)} symbol(s): calibrating the flow to ~{args.rate:,} msg/s ...")
        calibrate(s.http, args.rate, total_sequence)
        pid = None if s.book.process is None else s.book.process.pid
        watch = CpuWatch({"book": pid})
        h0, q0, t0 = scrape(s.book.url, APPLY_DELAY), total_sequence(s.http), time.perf_counter()
        time.sleep(args.cost_seconds)
        used, _, _ = watch.read()
        q1, t1 = total_sequence(s.http), time.perf_counter()
        delay = scrape(s.book.url, APPLY_DELAY).minus(h0)
    return used["book"] / max(1, q1 - q0) * 1e6, (q1 - q0) / (t1 - t0), delay


# --------------------------------------------------------------------------- report


def report(rows: list[Row], extra: dict[str, float],
           cost: dict[int, tuple[float, float, Buckets]]) -> None:
    print()
    print(f"machine: {machine()}; book and Redis pinned to core {BOOK_CORE}; sandbox, feed "
          f"and wrk (niced) on {other_cores()}")
    if rows:
        print(f"a. read path, wrk --latency {rows[0].connections}.. connections; "
              f"the flow rows at ~{extra.get('rate', 0):,.0f} msg/s")
        print(f"   {'phase':5} {'conns':>5} {'route':8} {'req/s':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'x ceiling':>9} {'receipt p99':>11} {'exch. p99':>9} "
              f"{'msg/s':>6}  load")
        ceilings = {(r.phase, r.connections): r.result.rps for r in rows if r.target == "ceiling"}
        for r in rows:
            ceiling = ceilings.get((r.phase, r.connections), 0.0)
            ratio = r.result.rps / ceiling if ceiling and r.target in ("book", "l3") else math.nan
            bad = "" if not (r.result.non2xx or r.result.errors) else (
                f"  ({r.result.non2xx} non-2xx, {r.result.errors} socket errors)")
            print(f"   {r.phase:5} {r.connections:5} {r.target:8} {r.result.rps:9,.0f} "
                  f"{ms(r.result.p50):>8} {ms(r.result.p99):>8} "
                  f"{'' if math.isnan(ratio) else f'{ratio:.2f}':>9} {ms(r.receipt_p99):>11} "
                  f"{ms(r.delay_p99):>9} {r.rate:6,.0f}  "
                  f"{r.load}{bad}")
        if "quiet_p99" in extra:
            print(f"   no readers, {extra['quiet_rate']:,.0f} msg/s: p99 receipt -> applied "
                  f"{ms(extra['quiet_receipt_p99'])} ms (target <= 3 ms), exchange -> applied "
                  f"{ms(extra['quiet_p99'])} ms; book "
                  f"{extra['one_symbol_us']:.1f} us CPU a message")
    if cost:
        print("b. book CPU per message, same total rate")
        base = cost.get(1, (math.nan, 0.0, Buckets()))[0]
        for n, (us, rate, delay) in sorted(cost.items()):
            print(f"   {n} symbol(s) {rate:8,.0f} msg/s  {us:6.1f} us a message  "
                  f"x{us / base:.2f} of one symbol  apply p99 {ms(delay.quantile(0.99))} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="each wrk run")
    parser.add_argument("--quiet-seconds", type=float, default=15.0)
    parser.add_argument("--cost-seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=5000, help="flow, messages/s")
    parser.add_argument("--connections", type=lambda v: [int(x) for x in v.split(",")],
                        default=[8, 32, 64])
    parser.add_argument("--only", choices=("read", "symbols"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this benchmark needs two cores: the book's and wrk's")
    wrk = ensure_wrk() if args.only != "symbols" else ""
    rows: list[Row] = []
    extra: dict[str, float] = {}
    cost: dict[int, tuple[float, float, Buckets]] = {}
    with RedisServer() as server:
        pin(server.pid, str(BOOK_CORE))
        if args.only in (None, "read"):
            rows, extra = phase_read(args, server, wrk)
        if args.only in (None, "symbols"):
            cost[1] = book_cost(args, server, (SYM,))
            cost[3] = book_cost(args, server, SYMBOLS)
    report(rows, extra, cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
