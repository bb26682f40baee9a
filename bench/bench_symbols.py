"""Cost per symbol: the feed and the book over 1, 10, 50 and 100 symbols.

Everything runs here, on loopback, as :mod:`bench.bench_read` sets it up (its
``stack``): a throwaway ``redis-server``, the sandbox, one feed (one line) and
one book replica as child processes; the book and Redis pinned to core 0, the
sandbox and the feed to the other cores. The symbols are the first N contracts
of the sandbox's catalog, and its synthetic flow spreads the messages over them
as a venue's are spread: the three first busiest, the others by a Zipf law.

a. **Same total rate.** For N = 1, 10, 50 and 100 symbols, the flow calibrated
   to ``--rate`` messages/s in all; over ``--seconds``: the CPU microseconds the
   feed and the book spend per message, their RSS, and the RSS each symbol adds
   beyond one (``(RSS(N) - RSS(1)) / (N - 1)``). The target: cost per message
   at 100 symbols within 1.2x of one symbol's.
b. **Largest total rate, 100 symbols.** The flow raised step by step
   (``--ramp``, messages/s; then as fast as the sandbox goes); each step
   ``--step-seconds``: the engine's rate, the rate the feed appended and the book
   applied, and the backlog left at the end. A step is *sustained* when the book
   applied at least 95 % of what the engine made and ends less than a second of
   messages behind. The sandbox shares a core with the feed: past its own
   ceiling the figure is the machine's, and the report says which it was.

    python -m bench.bench_symbols [--rate 3000] [--seconds 15] [--counts 1,10,50,100]
                                  [--ramp 2000,3000,4000,6000] [--step-seconds 10]
                                  [--only cost|max]

The machine is shared: every figure is printed with the load average.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import httpx

from bench.bench_pipeline import APPLY_DELAY, CpuWatch, calibrate, load, say, scrape
from bench.bench_read import BOOK_CORE, Stack, other_cores, pin, stack, total_sequence
from bench.common import machine
from kumex_l3 import keys
from kumex_l3.redis_adapter import connect_sync
from kumex_l3.testing.devredis import RedisServer
from services.sandbox.contracts import CONTRACTS

#: Cost per message at 100 symbols may be at most this multiple of one symbol's.
TARGET_GROWTH = 1.2


def symbols_of(n: int) -> tuple[str, ...]:
    return tuple(list(CONTRACTS)[:n])


def rss_mib(pid: int | None) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc), NaN when unknown."""
    if pid is None:
        return math.nan
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def pid_of(proc: object) -> int | None:
    process = getattr(proc, "process", None)
    return None if process is None else int(process.pid)


def book_sequences(book_url: str) -> dict[str, int]:
    """Each served book's sequence (GET /books)."""
    rows = httpx.get(f"{book_url}/books", timeout=5).json()["books"]
    return {r["symbol"]: int(r["sequence"]) for r in rows if r["sequence"] is not None}


def engine_sequences(http: httpx.Client) -> dict[str, int]:
    return {s: int(v) for s, v in http.get("/sandbox/state").json()["sequences"].items()}


def behind(engine: dict[str, int], book: dict[str, int]) -> int:
    """Messages the engine made that the book has not applied (books not served: all of
    theirs since the step began are counted by the rates, not here)."""
    return sum(max(0, engine[s] - seq) for s, seq in book.items() if s in engine)


def stream_heads(redis_url: str, symbols: tuple[str, ...]) -> int:
    """The sum of every stream head's sequence (what the feed appended)."""
    r = connect_sync(redis_url, "bench")
    try:
        heads = r.mget([keys.stream_head(s) for s in symbols])
    finally:
        r.close()
    return sum(int(h) for h in heads if h is not None)


# --------------------------------------------------------------------------- a. cost


@dataclass
class Cost:
    symbols: int
    rate: float
    feed_us: float
    book_us: float
    feed_mib: float
    book_mib: float
    apply_p99: float
    load: str


def cost(args: argparse.Namespace, server: RedisServer, n: int) -> Cost:
    symbols = symbols_of(n)
    with stack(server, symbols) as s:
        say(f"a. {n} symbol(s): calibrating the flow to ~{args.rate:,} msg/s ({load()}) ...")
        calibrate(s.http, args.rate, total_sequence)
        watch = CpuWatch({"feed": pid_of(s.feed), "book": pid_of(s.book)})
        h0, q0, t0 = (scrape(s.book.url, APPLY_DELAY), total_sequence(s.http),
                      time.perf_counter())
        time.sleep(args.seconds)
        used, _, _ = watch.read()
        q1, t1 = total_sequence(s.http), time.perf_counter()
        delay = scrape(s.book.url, APPLY_DELAY).minus(h0)
        messages = max(1, q1 - q0)
        row = Cost(n, messages / (t1 - t0), used["feed"] / messages * 1e6,
                   used["book"] / messages * 1e6, rss_mib(pid_of(s.feed)),
                   rss_mib(pid_of(s.book)), delay.quantile(0.99), load())
    say(f"   {n:3} symbols {row.rate:7,.0f} msg/s: feed {row.feed_us:.1f} us, book "
        f"{row.book_us:.1f} us a message; RSS feed {row.feed_mib:.0f} MiB, book "
        f"{row.book_mib:.0f} MiB ({row.load})")
    return row


# --------------------------------------------------------------------------- b. ramp


@dataclass
class Step:
    asked: str
    engine: float
    appended: float
    applied: float
    backlog: int
    load: str

    @property
    def sustained(self) -> bool:
        return self.applied >= 0.95 * self.engine and self.backlog < self.engine


def ramp_step(s: Stack, redis_url: str, symbols: tuple[str, ...], asked: str,
              seconds: float) -> Step:
    e0, f0, b0, t0 = (engine_sequences(s.http), stream_heads(redis_url, symbols),
                      book_sequences(s.book.url), time.perf_counter())
    time.sleep(seconds)
    e1, f1, b1, t1 = (engine_sequences(s.http), stream_heads(redis_url, symbols),
                      book_sequences(s.book.url), time.perf_counter())
    wall = t1 - t0
    made = sum(e1.values()) - sum(e0.values())
    applied = sum(b1[x] - b0[x] for x in b1 if x in b0)
    return Step(asked, made / wall, (f1 - f0) / wall, applied / wall, behind(e1, b1), load())


def ramp(args: argparse.Namespace, server: RedisServer) -> list[Step]:
    symbols = symbols_of(100)
    steps: list[Step] = []
    with stack(server, symbols) as s:
        for target in [*args.ramp, -1]:
            if target > 0:
                say(f"b. 100 symbols: calibrating the flow to ~{target:,} msg/s ...")
                calibrate(s.http, target, total_sequence)
                asked = f"{target:,}"
            else:
                say("b. 100 symbols: the flow as fast as the sandbox goes ...")
                s.http.post("/sandbox/flow/rate", json={"rate": "max"}).raise_for_status()
                time.sleep(1.0)
                asked = "max"
            step = ramp_step(s, server.url, symbols, asked, args.step_seconds)
            steps.append(step)
            say(f"   asked {asked} msg/s: engine {step.engine:,.0f}, feed appended "
                f"{step.appended:,.0f}, book applied {step.applied:,.0f} msg/s; backlog "
                f"{step.backlog:,} ({'sustained' if step.sustained else 'NOT sustained'}, "
                f"{step.load})")
            if not step.sustained:
                break
    return steps


# --------------------------------------------------------------------------- report


def report(costs: list[Cost], steps: list[Step]) -> None:
    print()
    print(f"machine: {machine()}; book and Redis pinned to core {BOOK_CORE}; sandbox and "
          f"feed on {other_cores()}")
    if costs:
        base = costs[0]
        print(f"a. same total rate (~{base.rate:,.0f} msg/s), the sandbox's catalog order "
              "(Zipf activity); baseline: 1 symbol, same run")
        print(f"   {'symbols':>7} {'msg/s':>7} {'feed us':>8} {'x 1':>5} {'book us':>8} "
              f"{'x 1':>5} {'feed MiB':>8} {'book MiB':>8} {'MiB/symbol f/b':>15} "
              f"{'apply p99':>9}  load")
        for c in costs:
            per = ("" if c.symbols == 1 else
                   f"{(c.feed_mib - base.feed_mib) / (c.symbols - 1):.2f}/"
                   f"{(c.book_mib - base.book_mib) / (c.symbols - 1):.2f}")
            print(f"   {c.symbols:7} {c.rate:7,.0f} {c.feed_us:8.1f} "
                  f"{c.feed_us / base.feed_us:5.2f} {c.book_us:8.1f} "
                  f"{c.book_us / base.book_us:5.2f} {c.feed_mib:8.0f} {c.book_mib:8.0f} "
                  f"{per:>15} {c.apply_p99 * 1000:7.1f} ms  {c.load}")
        last = costs[-1]
        for name, ratio in (("feed", last.feed_us / base.feed_us),
                            ("book", last.book_us / base.book_us)):
            verdict = "met" if ratio <= TARGET_GROWTH else "NOT met"
            print(f"   {name}: {last.symbols} symbols cost x{ratio:.2f} of one a message "
                  f"(target <= x{TARGET_GROWTH}): {verdict}")
    if steps:
        print("b. largest total rate with 100 symbols, one feed (one line) and one book")
        for st in steps:
            print(f"   asked {st.asked:>7}: engine {st.engine:8,.0f}  appended "
                  f"{st.appended:8,.0f}  applied {st.applied:8,.0f} msg/s  backlog "
                  f"{st.backlog:7,}  {'sustained' if st.sustained else 'NOT sustained'}  "
                  f"{st.load}")
        good = [st for st in steps if st.sustained]
        if good:
            best = max(good, key=lambda st: st.applied)
            bound = ("the sandbox's own ceiling here (the feed and the book kept up)"
                     if best is steps[-1] else "above it, see the last row")
            print(f"   sustained: {best.applied:,.0f} msg/s; {bound}")
        end = steps[-1]
        if not end.sustained:
            who = ("the feed (on the sandbox's core) appended less than the engine made"
                   if end.appended < 0.95 * end.engine else
                   "the book applied less than the feed appended")
            print(f"   at {end.engine:,.0f} msg/s: {who}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rate", type=int, default=3000, help="total flow, messages/s")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--counts", type=lambda v: [int(x) for x in v.split(",")],
                        default=[1, 10, 50, 100])
    parser.add_argument("--ramp", type=lambda v: [int(x) for x in v.split(",")],
                        default=[2000, 3000, 4000, 6000])
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--only", choices=("cost", "max"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this benchmark needs two cores: the book's and the others'")
    costs: list[Cost] = []
    steps: list[Step] = []
    with RedisServer() as server:
        pin(server.pid, str(BOOK_CORE))
        if args.only in (None, "cost"):
            costs = [cost(args, server, n) for n in args.counts]
        if args.only in (None, "max"):
            steps = ramp(args, server)
    report(costs, steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
