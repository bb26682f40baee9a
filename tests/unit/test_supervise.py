"""kumex_l3.lease.supervise: the one loop that keeps a symbol's worker running."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kumex_l3.backoff import Backoff
from kumex_l3.lease import supervise


class LeaseLost(Exception):
    """What a worker raises when it finds its lease gone."""


class Clock:
    """A clock the test moves by hand: how long each run 'lasted'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _backoff() -> Backoff:
    return Backoff(initial=0.001, factor=2.0, max_delay=0.008, jitter=0.0)


def test_failures_grow_the_backoff_and_a_long_run_resets_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Quick failures back off more each time; one that ran ``healthy_after_s`` was a
    success, so the next failure starts from the first delay again."""
    clock = Clock()
    backoff = _backoff()
    attempts: list[int] = []
    lasted = [0.0, 0.0, 0.0, 10.0, 0.0]
    failures: list[str] = []

    async def run() -> None:
        attempts.append(backoff.attempts)
        if len(attempts) > len(lasted):
            return  # the worker ends: supervision ends
        clock.now += lasted[len(attempts) - 1]
        raise RuntimeError(f"boom {len(attempts)}")

    with caplog.at_level(logging.ERROR, logger="kumex_l3.lease"):
        asyncio.run(supervise(run, what="worker", symbol="XBTUSDM", backoff=backoff,
                              on_failure=lambda e: failures.append(str(e)),
                              healthy_after_s=5.0, clock=clock))
    # Attempts before each run: 0, 1, 2, 3 (quick failures), then 10 s of health: reset.
    assert attempts == [0, 1, 2, 3, 1, 2]
    assert failures == [f"boom {i}" for i in range(1, 6)]
    logged = [r for r in caplog.records if "worker failed; starting it again" in r.message]
    assert len(logged) == 5 and all(r.exc_info for r in logged)  # a bug: its traceback


def test_a_lost_lease_or_a_lease_no_longer_held_ends_it() -> None:
    runs = 0

    async def lost() -> None:
        nonlocal runs
        runs += 1
        raise LeaseLost("XBTUSDM")

    asyncio.run(supervise(lost, what="w", symbol="XBTUSDM", backoff=_backoff(),
                          stop_on=(LeaseLost,)))
    assert runs == 1
    held = [True, True, False]

    async def failing() -> None:
        nonlocal runs
        runs += 1
        raise ConnectionError("redis went away")

    runs = 0
    asyncio.run(supervise(failing, what="w", symbol="XBTUSDM", backoff=_backoff(),
                          holds=lambda: held.pop(0)))
    assert runs == 2  # started while held, never after


def test_cancellation_goes_through() -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def forever() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(supervise(forever, what="w", symbol="S",
                                             backoff=_backoff()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
