"""A capture made by the feed, replayed: ``python -m kumex_l3 replay`` against the exchange.

Everything runs here, on loopback: a throwaway ``redis-server``, the sandbox
(one symbol, its matching engine's synthetic flow as fast as it goes) and the
feed with ``FEED_CAPTURE``. With the flow paused, a snapshot is taken (the
capture holds every message after it); the flow then runs until ``--messages``
more messages, and pauses; once the feed has written the last of them it is
stopped (the capture closed) and the engine's final book fetched. The replay
command then rebuilds the book from the snapshot and the capture, in a process
of its own, and its final book is compared with the engine's, order by order.
The same replay is timed again with depth samples every ``--every`` messages.

    python -m bench.bench_replay [--messages 1000000] [--every 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.bench_pipeline import (
    SYM,
    engine_sequence,
    feed_process,
    load,
    pause_flow,
    subscribed,
    wait_until,
)
from bench.common import machine
from kumex_l3 import OrderBook, keys, parse_message
from kumex_l3.redis_adapter import connect_sync
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.sandbox_proc import SandboxProcess


def stream_last_sequence(r: redis.Redis) -> int:
    entries: Any = r.xrevrange(keys.l3_stream(SYM), count=20)
    for _, fields in entries:
        raw = fields.get(b"msg")
        if raw is not None:
            return int(parse_message(raw).sequence)  # type: ignore[union-attr]
    return -1


def replay(capture: Path, snapshot: Path, *extra: str) -> tuple[float, str]:
    """Wall seconds and stderr of one replay process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kumex_l3", "replay", str(capture),
                           "--snapshot", str(snapshot), "--quiet", *extra],
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"replay failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stderr


def rate_of(stderr: str) -> str:
    found = re.search(r"([\d,]+) msg/s", stderr)
    return found.group(1) if found else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--keep", type=Path, help="keep the capture and snapshots here")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"before: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kumex-replay-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        capture, snapshot = work / "capture.jsonl.gz", work / "snapshot.json"
        final, out = work / "exchange-final.json", work / "replayed.json"
        capture.unlink(missing_ok=True)
        env = {"SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0",
               "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0"}
        with RedisServer() as server, SandboxProcess(env) as sandbox, httpx.Client(
                base_url=sandbox.base_url, timeout=10) as http:
            r = connect_sync(server.url, "bench")
            with feed_process(server.url, sandbox, FEED_CAPTURE=str(capture), FEED_LINES="1",
                              FEED_BUFFER_MAX=str(args.messages + 100_000)):
                wait_until(lambda: subscribed(sandbox), "the feed to subscribe")
                snap = http.get(f"/sandbox/snapshot/{SYM}").json()
                snapshot.write_text(json.dumps(snap))
                first = int(snap.get("data", snap)["sequence"])
                target = first + args.messages
                print(f"snapshot at sequence {first:,}; capturing {args.messages:,} messages "
                      "of the engine's flow ...", flush=True)
                started = time.perf_counter()
                http.post("/sandbox/flow/resume", json={"rate": "max"}).raise_for_status()
                last_report = started
                while (seq := engine_sequence(http)) < target:
                    if time.perf_counter() - last_report > 10:
                        print(f"  {seq - first:,} messages", flush=True)
                        last_report = time.perf_counter()
                    time.sleep(0.02)
                pause_flow(http)
                end = engine_sequence(http)
                flow_s = time.perf_counter() - started
                wait_until(lambda: stream_last_sequence(r) >= end,
                           "the feed to write the last message")
            # Leaving the block stopped the feed (SIGTERM): the capture is closed.
            final.write_text(json.dumps(http.get(f"/sandbox/snapshot/{SYM}").json()))
            r.close()
        lines = end - first
        print(f"captured {lines:,} messages in {flow_s:.1f} s by the feed: "
              f"{capture.stat().st_size:,} bytes gzip")
        seconds, err = replay(capture, snapshot, "--out", str(out))
        seconds_sampled, err_sampled = replay(
            capture, snapshot, "--every", str(args.every), "--samples",
            str(work / "depth.csv"), "--depth", "5")
        print(f"after: {load()}")
        ours = OrderBook.from_snapshot(json.loads(out.read_text()))
        exchange = json.loads(final.read_text())
        theirs = OrderBook.from_snapshot(exchange.get("data", exchange))
        same = ours.sequence == theirs.sequence and ours.l3() == theirs.l3()
        print()
        print(f"{'replay of the capture (one process)':44} {'msg/s':>12} {'wall s':>8}")
        print(f"{'rebuild the book, final book written':44} {rate_of(err):>12} "
              f"{seconds:8.2f}")
        print(f"{f'the same, depth 5 sampled every {args.every}':44} "
              f"{rate_of(err_sampled):>12} {seconds_sampled:8.2f}")
        print(err.strip())
        print(f"replayed book = the engine's final book (sequence {theirs.sequence:,}, "
              f"{len(theirs):,} orders, order by order): {'yes' if same else 'NO'}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
