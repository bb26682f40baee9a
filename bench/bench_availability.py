"""Availability under the real venue's limits, with redundant lines and without, side by side.

Part 1, **fill times**: what ``FEED_ARBITRATION_WAIT_MS`` must cover. The
sandbox (one symbol, ``--rate`` actions a second) drops 1 % of the messages on
each connection, independently; one feed with two lines arbitrates them. The
feed's histogram ``kumex_feed_arbitration_fill_seconds`` says how long each
hole of the merged stream waited for the other line's copy (quantiles read
from its buckets), with no delay jitter and with ``--jitter-ms`` of delay drawn
once per connection (its path's latency: a skew between the lines, as over the
internet).

Part 2, **availability** (:func:`chaos.availability.availability`): three
symbols, 1 L3 snapshot a minute per IP at the sandbox and in the feeds, every
connection cut after 30-60 s on its own schedule, 0.1 % of the messages
dropped per connection, two feed processes, one kill -9 of the writing feed
half-way; ``--minutes`` long, once with ``FEED_LINES=2`` (ours) and once with
``FEED_LINES=1`` (the baseline), printed side by side.

    python -m bench.bench_availability [--minutes 10] [--lines 2,1] [--skip-fill]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench.common import machine
from chaos.availability import AvailabilityConfig, Figures, availability, describe
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.sandbox_proc import SandboxProcess

SYM = "XBTUSDM"
_FILL = "kumex_feed_arbitration_fill_seconds"


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` (cumulative counts)."""
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("inf")


def _fill_histogram(url: str) -> tuple[list[tuple[float, float]], float, float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    total = count = longest = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        if family.name == _FILL.replace("_seconds", "_max_seconds"):
            longest = family.samples[0].value
        if family.name != _FILL:
            continue
        for sample in family.samples:
            if sample.name == _FILL + "_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name == _FILL + "_sum":
                total = sample.value
            elif sample.name == _FILL + "_count":
                count = sample.value
    buckets.sort()
    return buckets, total, count, longest


def fill_times(rate: float, seconds: float, jitter_ms: float) -> dict[str, Any]:
    """One feed with two lines, 1 % dropped per connection: how long holes waited."""
    with RedisServer() as redis_server, SandboxProcess({
            "SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "5",
            "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_DROP_RATE": "0.01",
            "SANDBOX_DELAY_JITTER_MS": f"{jitter_ms:g}"}) as sandbox, \
            ServiceProcess("services.feed", {
                "REDIS_URL": redis_server.url, "KUMEX_SYMBOLS": SYM,
                "KUMEX_BASE_URL": sandbox.base_url, "FEED_HTTP_HOST": "127.0.0.1",
                "FEED_LINES": "2", "FEED_SNAPSHOT_PER_MIN": "0",
                # Long enough that no hole is declared early: what is measured is the wait.
                "FEED_ARBITRATION_WAIT_MS": "2000"}, port_var="FEED_HTTP_PORT") as feed, \
            httpx.Client(base_url=sandbox.base_url, timeout=30) as http:
        wait_for(lambda: httpx.get(f"{feed.url}/readyz", timeout=2).status_code == 200,
                 "the feed's lines")
        before = int(http.get("/sandbox/state").json()["sequences"][SYM])
        http.post("/sandbox/flow/resume", json={"rate": rate}).raise_for_status()
        time.sleep(seconds)
        http.post("/sandbox/flow/pause").raise_for_status()
        after = int(http.get("/sandbox/state").json()["sequences"][SYM])
        time.sleep(2.5)
        buckets, total, count, longest = _fill_histogram(feed.url)
        dropped = http.get("/sandbox/state").json()["faults"]["counts"].get("dropped", 0)
    return {"jitter_ms": jitter_ms, "msg_per_s": (after - before) / seconds, "holes": count,
            "dropped": dropped, "mean_ms": 1000 * total / count if count else 0.0,
            "p50_ms": 1000 * _quantile(buckets, 0.5), "p99_ms": 1000 * _quantile(buckets, 0.99),
            "p999_ms": 1000 * _quantile(buckets, 0.999), "max_ms": 1000 * longest}


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (5 min {five:.2f})"


def _side_by_side(runs: list[Figures]) -> str:
    symbols = list(runs[0].symbols)
    head = "| | " + " | ".join(f"FEED_LINES={f.lines}" for f in runs) + " |"
    rows = [head, "|---|" + "---:|" * len(runs)]
    for symbol in symbols:
        rows.append(f"| {symbol}: seconds with every answer 200 | " + " | ".join(
            f"**{f.symbols[symbol]['available']:.3%}** of {f.symbols[symbol]['seconds']} s"
            for f in runs) + " |")
        rows.append(f"| {symbol}: holes in the stream (messages lost) | " + " | ".join(
            f"{f.symbols[symbol]['stream_holes']} ({f.symbols[symbol]['stream_missing']})"
            for f in runs) + " |")
        rows.append(f"| {symbol}: book resyncs | " + " | ".join(
            f"{f.symbols[symbol]['book_resyncs']:g}" for f in runs) + " |")
    rows.append("| snapshots served (429s) | " + " | ".join(
        f"{f.snapshots_served} ({f.snapshots_rate_limited})" for f in runs) + " |")
    rows.append("| line messages skipped / covered by the other line | " + " | ".join(
        f"{f.feed.get('line_missed_total', 0):g} / {f.feed.get('line_covered_total', 0):g}"
        for f in runs) + " |")
    rows.append("| holes closed by arbitration / real gaps | " + " | ".join(
        f"{f.feed.get('arbitration_holes_closed_total', 0):g} / "
        f"{f.feed.get('arbitration_gaps_total', 0):g}" for f in runs) + " |")
    rows.append("| line reconnects | " + " | ".join(
        f"{f.feed.get('line_reconnects_total', 0):g}" for f in runs) + " |")
    rows.append("| kill -9 of the writer; messages written from memory at takeovers | "
                + " | ".join(f"{f.killed}; {f.feed.get('takeover_backlog_total', 0):g}"
                             for f in runs) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_availability",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--lines", default="2,1", help="FEED_LINES of each run, in order")
    parser.add_argument("--flow-rate", type=float, default=90.0,
                        help="synthetic actions a second, all symbols together")
    parser.add_argument("--skip-fill", action="store_true", help="no fill-time part")
    parser.add_argument("--rate", type=float, default=2500.0,
                        help="actions a second of the fill-time part")
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}; {_load()}", flush=True)
    if not args.skip_fill:
        print("== arbitration: how long a hole waits for the other line's copy", flush=True)
        for jitter in (0.0, args.jitter_ms):
            got = fill_times(args.rate, 20.0, jitter)
            print(f"  delay jitter {jitter:g} ms per connection, {got['msg_per_s']:.0f} msg/s: "
                  f"{got['holes']:g} holes filled ({got['dropped']} drops); fill time "
                  f"mean {got['mean_ms']:.2f} ms, p50 <= {got['p50_ms']:g} ms, "
                  f"p99 <= {got['p99_ms']:g} ms, p99.9 <= {got['p999_ms']:g} ms, "
                  f"max {got['max_ms']:.2f} ms; "
                  f"{_load()}", flush=True)
    runs: list[Figures] = []
    ok = True
    for lines in (int(x) for x in args.lines.split(",") if x.strip()):
        print(f"== availability: FEED_LINES={lines}, {args.minutes:g} min, {_load()}",
              flush=True)
        outcome, figures = availability(AvailabilityConfig(
            minutes=args.minutes, lines=lines, flow_rate=args.flow_rate),
            progress=lambda line: print(line, flush=True))
        for line in describe(figures):
            print(line, flush=True)
        print(outcome.report(), flush=True)
        ok = ok and (lines == 1 or outcome.violations == 0)
        runs.append(figures)
    if runs:
        print(f"\n{_side_by_side(runs)}\n{_load()}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
