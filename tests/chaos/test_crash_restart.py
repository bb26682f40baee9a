"""Chaos, CI-sized: kill -9 of each service in turn, then Redis restarts.

One :class:`chaos.stack.Stack` for the module: the sandbox (journal on), a
Redis of its own with append-only persistence, and the four services as
real processes, with the synthetic flow running and another user (demo-2)
sweeping the grid's orders. Each test injects one fault in the middle of
that traffic (:mod:`chaos.scenarios`) and then asserts zero violations of:

* the book served equals the sandbox engine's book at the same sequence, and
  every ``GET /book`` 200 given meanwhile equals the book rebuilt from the
  sandbox journal at its sequence (never a wrong or silently empty book);
* every own order's hash (status, filledSize, orderId) equals the sandbox's
  record (``GET /api/v1/orders/byClientOid``); the grid never sent a
  clientOid twice; every order of the demo user has a hash;
* the restarted service is ready again (and the book came back from its
  checkpoint); after a Redis restart, every service recovered in the same
  process.

Redis without persistence (last: it empties Redis) must be *detected*: the
book resyncs, the grid restores its state and adopts its open orders from the
exchange; orders finished before the loss are exempt from the hash checks
(their hashes are gone for good). ``python -m chaos.run`` runs the same
scenarios longer (``make chaos``). Waits have a ceiling; nothing is timed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chaos import scenarios
from chaos.scenarios import Outcome
from chaos.stack import SERVICES, Stack, StackConfig


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(StackConfig(seed=41)) as running:
        yield running


def _assert_clean(stack: Stack, outcome: Outcome) -> None:
    print(outcome.report())
    if outcome.violations:
        for name in SERVICES:
            print(f"--- {name} log (tail) ---\n{stack.log(name)[-6000:]}")
    assert outcome.violations == 0, outcome.report()
    assert outcome.checked > 0


@pytest.mark.parametrize("service", SERVICES)
def test_kill_9_then_restart_keeps_books_and_orders_equal_to_the_exchange(
        stack: Stack, service: str) -> None:
    _assert_clean(stack, scenarios.kill_and_restart(stack, scenarios.QUICK, service))


def test_redis_restart_with_append_only_loses_nothing(stack: Stack) -> None:
    _assert_clean(stack, scenarios.redis_restart(stack, scenarios.QUICK, persist=True))


def test_redis_restart_without_persistence_is_detected_and_everything_resyncs(
        stack: Stack) -> None:
    outcome = scenarios.redis_restart(stack, scenarios.QUICK, persist=False)
    _assert_clean(stack, outcome)
    assert outcome.figures["book answers"]["empty 200"] == 0
