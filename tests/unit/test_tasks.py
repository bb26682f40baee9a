"""cancel_and_wait: a task that loses a cancellation is cancelled again until it ends;
race: the first to end wins, the others are cancelled."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from kumex_l3.tasks import cancel_and_wait, race


async def _stubborn(swallow: int, seen: list[int]) -> None:
    """Loops like a stream reader whose first ``swallow`` cancellations get lost."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append(1)
            if len(seen) > swallow:
                raise


def test_a_swallowed_cancellation_is_sent_again() -> None:
    async def main() -> tuple[set[asyncio.Task[None]], asyncio.Task[None], list[int]]:
        seen: list[int] = []
        task = asyncio.create_task(_stubborn(3, seen))
        await asyncio.sleep(0)
        return await cancel_and_wait(task), task, seen

    pending, task, seen = asyncio.run(main())
    assert pending == set()
    assert task.cancelled()
    assert len(seen) == 4


def test_the_lost_cancellation_is_real_on_this_python() -> None:
    # What the helper is for: wait_for returns the result of an awaitable that
    # completed in the same turn as the cancellation (CPython gh-86296, 3.11),
    # so one cancel() is not always enough. On 3.12 and later it is raised.
    async def main() -> tuple[bool, object]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def reader() -> int:
            return await asyncio.wait_for(fut, 3600)

        task = asyncio.create_task(reader())
        await asyncio.sleep(0)
        fut.set_result(7)
        task.cancel()
        await asyncio.wait([task])
        return task.cancelled(), None if task.cancelled() else task.result()

    cancelled, result = asyncio.run(main())
    if sys.version_info < (3, 12):
        assert (cancelled, result) == (False, 7)
    else:
        assert cancelled


def test_timeout_returns_what_still_runs_and_none_is_skipped() -> None:
    async def main() -> tuple[set[asyncio.Task[None]], bool, set[asyncio.Task[None]], int]:
        seen: list[int] = []
        # More lost cancellations than a short timeout sends (one per RECANCEL_S).
        task = asyncio.create_task(_stubborn(5, seen))
        await asyncio.sleep(0)
        pending = await cancel_and_wait(None, task, timeout=0.3)
        still_running = not task.done()
        return pending, still_running, await cancel_and_wait(task), len(seen)

    pending, still_running, after, seen = asyncio.run(main())
    assert still_running
    assert len(pending) == 1
    assert after == set()
    assert seen == 6


def test_an_error_on_the_way_out_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise RuntimeError("flush failed")

    async def main() -> set[asyncio.Task[None]]:
        task = asyncio.create_task(failing(), name="flusher")
        done = asyncio.create_task(asyncio.sleep(0), name="done-before")
        await asyncio.sleep(0)
        await done
        return await cancel_and_wait(task, done)

    with caplog.at_level(logging.WARNING, logger="kumex_l3.tasks"):
        assert asyncio.run(main()) == set()
    assert [r.getMessage() for r in caplog.records] == [
        "task flusher ended with RuntimeError('flush failed') while stopping"]


def test_race_gives_what_each_ended_with_and_cancels_the_rest() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    async def main() -> None:
        done = asyncio.Event()
        first, second, third = await race(asyncio.sleep(0.01, "first"), done.wait(),
                                          asyncio.sleep(3600))
        assert first == "first"
        assert isinstance(second, asyncio.CancelledError)
        assert isinstance(third, asyncio.CancelledError)
        assert not done.is_set()
        failed, slow = await race(fails(), asyncio.sleep(3600))
        assert isinstance(failed, ValueError) and str(failed) == "boom"
        assert isinstance(slow, asyncio.CancelledError)

    asyncio.run(main())
