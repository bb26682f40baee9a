"""Decode + apply throughput of the L3 book, beside two baselines, on one core.

A fixed seeded stream of level3v2 messages (raw bytes, as they sit in the Redis
stream) goes through:

* kumex-l3: ``parse_message`` (msgspec) + ``OrderBook.apply`` (sequence and
  integrity checks included);
* naive: ``json.loads`` + a book whose levels are scanned lists
  (bench/baselines.py);
* C SortedDict: ``json.loads`` + a book on the ``order-book`` package's C ladder.

The three final books are compared level by level, so each did the same work.
Then decoding alone: msgspec typed structs versus ``json.loads``.

    python -m bench.bench_book [--messages 1000000] [--seed 42]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from decimal import Decimal

from bench.baselines import CSortedDictBook, NaiveListBook
from bench.common import machine
from kumex_l3 import OrderBook, parse_message
from kumex_l3.synthetic import StreamGenerator

TARGET = 500_000  # msg/s, decode + apply, one core


def make_stream(n: int, seed: int) -> list[bytes]:
    gen = StreamGenerator(seed=seed, target_orders=400, levels=60)
    return [m.encode() for m in gen.take(n)]


def timed(fn: Callable[[], None]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"generating {args.messages:,} messages (seed {args.seed}) ...", flush=True)
    stream = make_stream(args.messages, args.seed)
    print(f"stream: {sum(map(len, stream)) / len(stream):.0f} bytes a message on average")

    ours = OrderBook("XBTUSDM")

    def run_ours() -> None:
        apply, parse = ours.apply, parse_message
        for raw in stream:
            apply(parse(raw))

    naive = NaiveListBook()
    csd = CSortedDictBook()

    def run_naive() -> None:
        for raw in stream:
            naive.process(raw)

    def run_csd() -> None:
        for raw in stream:
            csd.process(raw)

    results: list[tuple[str, float]] = []
    for name, fn in (("kumex-l3 (msgspec + OrderBook)", run_ours),
                     ("baseline: naive list levels (json)", run_naive),
                     ("baseline: order-book C SortedDict (json)", run_csd)):
        print(f"running {name} ...", flush=True)
        results.append((name, len(stream) / timed(fn)))

    # Same final book everywhere, or the comparison means nothing.
    bids, asks = ours.depth()
    want = ([(p, Decimal(s), n) for p, s, n in bids], [(p, Decimal(s), n) for p, s, n in asks])
    for name, book in (("naive", naive), ("C SortedDict", csd)):
        got = book.depth()
        if (list(got[0]), list(got[1])) != want:
            raise SystemExit(f"{name} baseline ended with a different book")
    ours.check()

    mine = results[0][1]
    print()
    print(f"{'decode + apply, 1 core':44} {'msg/s':>12} {'ours vs it':>11}")
    for name, rate in results:
        ratio = "" if rate is mine else f"{mine / rate:10.2f}x"
        print(f"{name:44} {rate:12,.0f} {ratio:>11}")
    verdict = "meets" if mine >= TARGET else "MISSES"
    print(f"target {TARGET:,} msg/s: {verdict} ({mine / TARGET:.2f} of target); "
          f"book holds {len(ours)} orders at sequence {ours.sequence}")

    sample = stream[: min(len(stream), 300_000)]
    dec_msgspec = len(sample) / timed(lambda: [parse_message(r) for r in sample] and None)
    dec_json = len(sample) / timed(lambda: [json.loads(r) for r in sample] and None)
    print()
    print(f"{'decode only':44} {'msg/s':>12}")
    print(f"{'msgspec typed structs (validated)':44} {dec_msgspec:12,.0f} "
          f"{dec_msgspec / dec_json:10.2f}x")
    print(f"{'json.loads to dicts (no validation)':44} {dec_json:12,.0f}")


if __name__ == "__main__":
    main()
