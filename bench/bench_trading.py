"""Fill-to-counter-order latency of the whole trading path, on the sandbox's own clock.

From the sandbox emitting a ``match`` for a grid order to the sandbox receiving
the grid's counter-order::

    sandbox engine --L3 WS--> feed --XADD--> Redis --XREADGROUP--> order monitor
      --Lua: hash + order-events--> Redis --XREAD--> strategy --HSET plan, register,
      signed POST /api/v1/orders--> sandbox engine

Every piece runs as its own process (Redis, sandbox, feed, order monitor,
strategy), the sandbox with ``SANDBOX_REST_LATENCY_MS=0``, its synthetic flow
paused and its book emptied. Another user (demo-key-2) drives the fills: an
IOC sell hits the grid's buy one step below the centre; the grid answers with
a sell at the centre; an IOC buy hits that; the grid answers with a buy one
step below; and so on, one fill at a time (the taker waits for each
counter-order to rest before the next fill, outside the measured span).

Both ends are timestamps the sandbox already has, on one clock (wall-clock
ns): the ``ts`` of the ``match`` (``/sandbox/journal``) and the ``orderTime``
of the counter-order (the ``ts`` of its ``received``, ``GET /api/v1/orders``).
The counter-order answering a fill has the opposite side, the price one grid
step away and the fill's size, and is the first such order placed after it.
The split by stage uses the Redis stream entry ids (ms resolution) of the
match in ``kumex:{SYM}:l3`` (the feed's write) and of its fill in
``kumex:{SYM}:order-events`` (the monitor's write).

    python -m bench.bench_trading [--fills 1000] [--warmup 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import redis

from bench.common import machine
from kumex_l3 import keys
from kumex_l3.redis_adapter import connect_sync
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.sandbox_proc import DEMO_KEY_1, DEMO_KEY_2, DemoKey, KcAuth, SandboxProcess

SYM = "XBTUSDM"
TICK = Decimal("0.1")
CENTRE = Decimal("30000.0")
STEP_TICKS = 10
PREFIX = "bench"
TARGET_P99_MS = 20.0




def _creds(key: DemoKey) -> dict[str, str]:
    return {"KUMEX_API_KEY": key.key, "KUMEX_API_SECRET": key.secret,
            "KUMEX_API_PASSPHRASE": key.passphrase}


def _empty_the_book(taker: httpx.Client) -> None:
    for side in ("sell", "buy"):
        taker.post("/api/v1/orders", json={
            "clientOid": f"clear-{side}", "symbol": SYM, "side": side, "type": "market",
            "size": 5_000_000, "leverage": "5"}).raise_for_status()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class CounterWatch:
    """Waits on ``kumex:{SYM}:order-events`` for a grid order resting at a side and price."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.stream = keys.order_events(SYM)
        last = r.xrevrange(self.stream, count=1)
        self.last = last[0][0].decode() if last else "0-0"

    def wait_open(self, side: str, price: Decimal, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply: Any = self.r.xread({self.stream: self.last}, count=100, block=1000)
            for _, entries in reply or []:
                for entry_id, raw in entries:
                    self.last = entry_id.decode()
                    ev = {k.decode(): v.decode() for k, v in raw.items()}
                    if (ev.get("status") == "open" and ev.get("side") == side
                            and Decimal(ev.get("price") or "0") == price
                            and ev.get("clientOid", "").startswith(PREFIX + "-")):
                        return
        raise TimeoutError(f"no grid {side} open at {price} within {timeout} s")


def drive(sandbox: SandboxProcess, r: redis.Redis, fills: int) -> None:
    """demo-2 fills the grid's order next to the centre, one fill at a time."""
    step = TICK * STEP_TICKS
    watch = CounterWatch(r)
    with httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(DEMO_KEY_2)) as taker:
        for i in range(fills):
            # Even: sell into the grid's buy below the centre; odd: buy its sell at the centre.
            side, price = ("sell", CENTRE - step) if i % 2 == 0 else ("buy", CENTRE)
            taker.post("/api/v1/orders", json={
                "clientOid": f"t{i}", "symbol": SYM, "side": side, "price": f"{price:f}",
                "size": 1, "leverage": "5", "timeInForce": "IOC"}).raise_for_status()
            counter = ("sell", CENTRE) if side == "sell" else ("buy", CENTRE - step)
            watch.wait_open(*counter)
            if (i + 1) % 200 == 0:
                print(f"  {i + 1} fills", flush=True)


@dataclass(frozen=True)
class Sample:
    latency_ms: float
    # None when the fill reached the order's hash by a reconciliation, not its match:
    feed_ms: float | None  # match ts -> its XADD to kumex:{SYM}:l3
    monitor_ms: float | None  # that XADD -> the fill event on order-events
    strategy_ms: float | None  # the fill event -> the counter-order at the sandbox


def _orders(api: httpx.Client) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for status in ("active", "done"):
        page = 1
        while True:
            data = api.get("/api/v1/orders", params={
                "status": status, "symbol": SYM, "pageSize": 1000,
                "currentPage": page}).json()["data"]
            out.update((o["id"], o) for o in data["items"])
            if page >= int(data["totalPage"] or 0):
                break
            page += 1
    return out


def _ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def measure(sandbox: SandboxProcess, r: redis.Redis, start_seq: int) -> list[Sample]:
    """Pair every match of a grid order with the counter-order that answered it."""
    step = TICK * STEP_TICKS
    with httpx.Client(base_url=sandbox.base_url, timeout=30) as http, \
            httpx.Client(base_url=sandbox.base_url, timeout=30, auth=KcAuth(DEMO_KEY_1)) as api:
        journal = http.get(f"/sandbox/journal/{SYM}", params={"after": start_seq}).json()
        orders = _orders(api)
    grid = {oid: o for oid, o in orders.items() if o["clientOid"].startswith(PREFIX + "-")}
    # tradeId -> the fill event's entry id and the l3 entry id that caused it.
    fill_events: dict[str, tuple[int, int]] = {}
    for entry_id, raw in r.xrange(keys.order_events(SYM)):
        if raw.get(b"change") == b"fill":
            fill_events[raw[b"tradeId"].decode()] = (_ms(entry_id), _ms(raw[b"streamId"]))
    # Counter candidates by (side, price, size), in the order the sandbox received them.
    candidates: dict[tuple[str, Decimal, int], list[dict[str, Any]]] = {}
    for o in sorted(grid.values(), key=lambda o: int(o["orderTime"])):
        candidates.setdefault((o["side"], Decimal(o["price"]), int(o["size"])), []).append(o)
    used: set[str] = set()
    samples: list[Sample] = []
    for text in journal["messages"]:
        msg = json.loads(text)
        data = msg["data"]
        if msg["subject"] != "match" or data["makerOrderId"] not in grid:
            continue
        maker = grid[data["makerOrderId"]]
        side = "sell" if maker["side"] == "buy" else "buy"
        price = Decimal(maker["price"]) + (step if maker["side"] == "buy" else -step)
        ts = int(data["ts"])
        counter = next((o for o in candidates.get((side, price, int(data["size"])), [])
                        if o["id"] not in used and int(o["orderTime"]) > ts), None)
        if counter is None:
            raise AssertionError(f"no counter-order for match {data['tradeId']}")
        used.add(counter["id"])
        received_ns = int(counter["orderTime"])
        stages = fill_events.get(data["tradeId"])
        if stages is None:
            # Learnt from a reconciliation (the exchange's record), not from its match.
            samples.append(Sample((received_ns - ts) / 1e6, None, None, None))
            continue
        event_ms, l3_ms = stages
        samples.append(Sample((received_ns - ts) / 1e6, l3_ms - ts / 1e6, event_ms - l3_ms,
                              received_ns / 1e6 - event_ms))
    return samples


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fills", type=int, default=1000, help="fills measured")
    parser.add_argument("--warmup", type=int, default=20, help="fills run first, not counted")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    total = args.fills + args.warmup
    with RedisServer() as server, SandboxProcess({
            "SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_REST_LATENCY_MS": "0",
            "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_JOURNAL_SIZE": "1000000",
            "SANDBOX_LOG_LEVEL": "warning"}) as sandbox:
        with httpx.Client(base_url=sandbox.base_url, timeout=10,
                          auth=KcAuth(DEMO_KEY_2)) as taker:
            _empty_the_book(taker)
        common = {"REDIS_URL": server.url, "KUMEX_SYMBOLS": SYM,
                  "KUMEX_BASE_URL": sandbox.base_url, "LOG_LEVEL": "WARNING"}
        feed = ServiceProcess("services.feed", {**common, "FEED_HTTP_HOST": "127.0.0.1",
                                                "FEED_SNAPSHOT_PER_MIN": "0"},
                              port_var="FEED_HTTP_PORT")
        monitor = ServiceProcess("services.order_monitor", {
            **common, **_creds(DEMO_KEY_1), "MONITOR_HTTP_HOST": "127.0.0.1",
            "MONITOR_REPLICA_ID": "bench"}, port_var="MONITOR_HTTP_PORT")
        strategy = ServiceProcess("services.strategy", {
            **common, **_creds(DEMO_KEY_1), "STRATEGY_HTTP_HOST": "127.0.0.1",
            "STRATEGY_CENTRE_PRICE": f"{CENTRE:f}", "STRATEGY_STEP_TICKS": str(STEP_TICKS),
            "STRATEGY_LEVELS": "2", "STRATEGY_SIZE": "1", "STRATEGY_MAX_POSITION": "10",
            "STRATEGY_MAX_OPEN_ORDERS": "20", "STRATEGY_CLIENT_OID_PREFIX": PREFIX},
            port_var="STRATEGY_HTTP_PORT")
        r = connect_sync(server.url, "bench")
        try:
            with feed, monitor:
                wait_for(lambda: _ready(feed.url) and _ready(monitor.url),
                         "feed and order monitor ready")
                # The monitor reconciles once more just after start (it reads the feed's
                # ctl=connected from the stream's history, at most one reconciliation a
                # second): let that pass so that the fills measured come from the stream.
                time.sleep(2.0)
                with strategy:
                    wait_for(lambda: _ready(strategy.url), "the grid placed")
                    seq = int(httpx.get(f"{sandbox.base_url}/sandbox/state",
                                        timeout=10).json()["sequences"][SYM])
                    print(f"driving {total} fills ({args.warmup} warm-up) ...", flush=True)
                    started = time.perf_counter()
                    drive(sandbox, r, total)
                    elapsed = time.perf_counter() - started
                samples = measure(sandbox, r, seq)
        finally:
            r.close()
    if len(samples) != total:
        print(f"error: {len(samples)} fills paired, {total} driven", file=sys.stderr)
        return 1
    kept = samples[args.warmup:]
    lat = [s.latency_ms for s in kept]
    p50, p99 = pct(lat, 0.50), pct(lat, 0.99)
    print(f"\nfills: {len(kept)} measured (+{args.warmup} warm-up) in {elapsed:.1f} s, "
          "one at a time")
    print("match ts -> counter-order received at the sandbox (ms):")
    print(f"  p50 {p50:.2f}   p90 {pct(lat, 0.90):.2f}   p99 {p99:.2f}   max {max(lat):.2f}   "
          f"mean {sum(lat) / len(lat):.2f}")
    split = [s for s in kept if s.feed_ms is not None]
    print(f"by stage, p50 / p99 (ms; Redis entry ids have 1 ms resolution; {len(split)} fills "
          f"seen as a match, {len(kept) - len(split)} learnt by a reconciliation):")
    for name, values in (("sandbox -> feed -> XADD l3", [s.feed_ms for s in split]),
                         ("l3 -> monitor -> fill event", [s.monitor_ms for s in split]),
                         ("fill event -> strategy -> sandbox", [s.strategy_ms for s in split])):
        known = [v for v in values if v is not None]
        if known:
            print(f"  {name:34s} {pct(known, 0.5):6.2f} / {pct(known, 0.99):6.2f}")
    verdict = "met" if p99 <= TARGET_P99_MS else "NOT met"
    print(f"target p99 <= {TARGET_P99_MS:g} ms: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
