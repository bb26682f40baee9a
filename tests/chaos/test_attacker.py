"""Hostile accounts: another user copies the grid's clientOids from the public L3 feed.

One :class:`chaos.stack.Stack` (sandbox, feed, book, order monitor, grid,
demo-2 sweeping the grid's orders) and :class:`chaos.stack.Attacker`: demo-2
again, racing every clientOid of the grid it sees on the feed with an IOC of its
own under the same clientOid, and guessing the next ones. The grid's clientOids
cannot be guessed, its order monitor links a clientOid only by the first
``received`` after the registration and records every later claimant as a
conflict, resolved by our account's own records. So, with and without a REST
500 window: zero orders of ours linked to a foreign orderId, every hash equal to
the exchange's record (status, filledSize, orderId), and the conflicts visible
as order events and a metric.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chaos import scenarios
from chaos.stack import SERVICES, Stack, StackConfig


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(StackConfig(seed=43)) as running:
        yield running


@pytest.mark.parametrize("rest_window", [False, True], ids=["steady", "rest-500-window"])
def test_another_account_copying_clientoids_takes_over_nothing(
        stack: Stack, rest_window: bool) -> None:
    outcome = scenarios.attacker(stack, scenarios.QUICK, rest_window=rest_window)
    print(outcome.report())
    if outcome.violations:
        for name in SERVICES:
            print(f"--- {name} log (tail) ---\n{stack.log(name)[-6000:]}")
    assert outcome.violations == 0, outcome.report()
    assert outcome.faults.get("clientOids copied from the feed", 0) > 0
