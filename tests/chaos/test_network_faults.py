"""Chaos, CI-sized: network faults, each held for a while, then lifted.

One :class:`chaos.stack.Stack` for the module (sandbox with a 1 s WebSocket
ping interval, a Redis of its own, the four services, flow and sweeps
running). Each test names its fault (:mod:`chaos.scenarios`):

* feed disconnects (``POST /sandbox/disconnect``, ``disconnect_every_s``);
* a server that stops answering pings (``pong_disabled``);
* snapshots refused (``refuse_snapshots``) while the book has lost sync;
* the snapshot budget spent (``snapshot_rate_per_min``: 429 + Retry-After);
* every REST call answering 500 for 12 s;
* Redis stopped for 10 s, then started again on the same port;

and asserts that the degradation was *visible* while it lasted (the book
answering 503, a metric, a log line, a ``/readyz``), that every service
recovered *by itself* in the same process, and that afterwards the book and
the own orders equal the exchange's (see ``test_crash_restart.py``). The last
test bounds each service's RSS against its value before the faults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from chaos import scenarios
from chaos.scenarios import QUICK, Outcome, Size
from chaos.stack import SERVICES, Stack, StackConfig


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(StackConfig(seed=43)) as running:
        yield running


@pytest.fixture(scope="module")
def baseline(stack: Stack) -> dict[str, int | None]:
    """RSS of each service after a warm-up, before any fault."""
    stack.flow(stack.config.flow_rate)
    stack.start_sweeper()
    stack.settle()
    return stack.rss()


def _assert_clean(stack: Stack, outcome: Outcome) -> None:
    print(outcome.report())
    if outcome.violations:
        for name in SERVICES:
            print(f"--- {name} log (tail) ---\n{stack.log(name)[-6000:]}")
    assert outcome.violations == 0, outcome.report()
    assert outcome.checked > 0


@pytest.mark.parametrize("scenario", [
    scenarios.feed_disconnects,
    scenarios.pong_silence,
    scenarios.snapshot_refusals,
    scenarios.snapshot_rate_limit,
    scenarios.rest_errors,
    scenarios.redis_outage,
], ids=lambda f: f.__name__)
def test_fault_is_visible_then_everything_recovers_by_itself(
        stack: Stack, baseline: dict[str, int | None],
        scenario: Callable[[Stack, Size], Outcome]) -> None:
    _assert_clean(stack, scenario(stack, QUICK))


def test_memory_stays_bounded_through_the_faults(
        stack: Stack, baseline: dict[str, int | None]) -> None:
    outcome = scenarios.memory_bound(stack, baseline)
    _assert_clean(stack, outcome)
