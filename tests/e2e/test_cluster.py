"""End to end on a Redis Cluster whose master is killed mid-run.

A real local cluster (three masters with one replica each, six ``redis-server``
processes). ``kill -9`` of the master that serves the symbol's slot, with the
flow going on: its replica is promoted within seconds, every service finds the
new master by itself, and no human acts. Then:

- market data: every answer the book gave, before, during and after the
  failover, equals the exchange's book at its own sequence, and the book ends
  equal to the engine's;
- trading: every own order of the grid ends as the exchange's records say, in
  the order monitor's hashes and in the grid's own view.

Redis replicates asynchronously: the writes the dead master acknowledged and had
not yet sent to its replica are lost. The feed's next write finds the stream's
head behind what it sent and writes on from the head (a gap the book repairs
from a snapshot), and the order monitor's consumer group re-reads what its
acknowledgements lost; these tests are where that is shown to end right.

The killed node is started again at the end of each test and rejoins as a
replica, so the session's cluster serves the next test whole.
"""

from __future__ import annotations

import random
import time

import httpx
import pytest
import redis.cluster
from redis.cluster import ClusterNode

from kumex_l3 import keys
from kumex_l3.testing.devcluster import RedisClusterServers
from kumex_l3.testing.procs import metric, wait_for
from kumex_l3.testing.sandbox_proc import SandboxProcess
from tests.e2e.test_market_data import (
    MESSAGES,
    START,
    SYM,
    Poller,
    _assert_answers_were_true,
    _assert_equal_to_engine,
    _book,
    _feed,
    _run_flow_until,
    _settle,
)
from tests.e2e.test_market_data import (
    sandbox as sandbox,  # the fixture, used here as it is there
)
from tests.e2e.test_trading import (
    _assert_the_exchange_the_monitor_and_the_grid_agree,
    _consuming,
    _grid_stack,
    _placed_grid,
    _settled,
    _sweep_until,
)

pytestmark = pytest.mark.cluster


def test_master_killed_mid_run_the_book_stays_equal_to_the_exchange(
        redis_cluster: RedisClusterServers, cluster_url: str,
        sandbox: SandboxProcess) -> None:
    victim = redis_cluster.master_of(keys.l3_stream(SYM))
    with httpx.Client(base_url=sandbox.base_url, timeout=10) as http, \
            _feed(cluster_url, sandbox) as feed, _book(cluster_url) as book:
        poller = Poller(book.url)
        poller.start()
        try:
            _run_flow_until(http, START + MESSAGES // 4, disconnect_at=[])
            killed = time.monotonic()
            redis_cluster.kill(victim)
            failover = time.monotonic() - killed
            _run_flow_until(http, START + MESSAGES // 2, disconnect_at=[])
            final = _settle(http, book.url)
        finally:
            poller.stop.set()
            poller.join()
            redis_cluster.revive(victim)
        _assert_equal_to_engine(http, final)
        checked = _assert_answers_were_true(http, poller.answers)
        unserved = sum(1 for status, _ in poller.answers if status != 200)
        print(f"master of {SYM}'s slot killed: replica promoted in {failover:.1f} s; "
              f"{len(poller.answers)} answers, {checked} checked true, {unserved} not 200; "
              f"feed Redis errors {metric(feed.url, 'kumex_feed_redis_errors_total'):.0f}, "
              f"book resyncs {metric(book.url, 'kumex_book_resyncs_total'):.0f}")
        assert checked >= 50


def test_master_killed_mid_run_every_own_order_ends_as_the_exchange_says(
        redis_cluster: RedisClusterServers, cluster_url: str) -> None:
    """The grid trades on the cluster; ``kill -9`` of the master of the symbol's slot while
    demo-2 fills the grid's orders."""
    rng = random.Random(5)
    victim = redis_cluster.master_of(keys.l3_stream(SYM))
    # The test's own client retries (redis-py's default): it reads the grid's orders to
    # aim its sweeps, also while the slot moves, and is no part of what is tested.
    redis_sync = redis.cluster.RedisCluster(startup_nodes=[
        ClusterNode(s.host, s.port) for s in redis_cluster.servers if s.running])
    try:
        with _grid_stack(cluster_url, seed=13, rest_latency_ms=100) as (
                sandbox, http, api, taker, _, monitor):
            with _placed_grid(cluster_url, sandbox, http) as strategy:
                def fills() -> float:
                    return metric(strategy.url, "kumex_strategy_fills_total")

                http.post("/sandbox/flow/resume", json={"rate": 100}).raise_for_status()
                sweeps = _sweep_until(lambda: fills() >= 3, http, taker, redis_sync, rng)
                try:
                    redis_cluster.kill(victim)
                    sweeps += _sweep_until(lambda: True, http, taker, redis_sync, rng,
                                           at_least=4)
                finally:
                    redis_cluster.revive(victim)
                wait_for(lambda: _consuming(monitor), "the monitor consuming again")
                target = fills() + 3
                sweeps += _sweep_until(lambda: fills() >= target, http, taker, redis_sync, rng)
                http.post("/sandbox/flow/pause").raise_for_status()
                wait_for(lambda: _settled(api, redis_sync, strategy),
                         "own orders equal to the exchange's records")
                position = httpx.get(f"{strategy.url}/state", timeout=5).json()["position"]
                assert strategy.stop() == 0
            own, filled_orders = _assert_the_exchange_the_monitor_and_the_grid_agree(
                api, redis_sync, position)
            print(f"{len(own)} grid orders, {filled_orders} with fills, position {position}, "
                  f"{sweeps} sweeps; the monitor corrected "
                  f"{metric(monitor.url, 'kumex_order_monitor_corrections_total'):.0f} orders")
            assert filled_orders >= 4
    finally:
        redis_sync.close()
