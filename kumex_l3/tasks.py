"""Stopping asyncio tasks for sure.

``task.cancel()`` followed by ``await task`` can wait forever on Python 3.11:
``asyncio.wait_for`` drops a cancellation that arrives while the awaitable it
wraps is completing (CPython gh-86296, fixed by the rewrite of ``wait_for`` in
3.12), and redis-py wraps every socket write in ``wait_for`` when a socket
timeout is set. A task looping on Redis reads then swallows the one
cancellation it was sent and goes on reading, and the service never stops.
:func:`cancel_and_wait` cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["cancel_and_wait", "race"]

log = logging.getLogger(__name__)

#: How long to wait for a cancelled task before cancelling it again.
RECANCEL_S = 0.2


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None,
                          timeout: float | None = None) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` (``None`` entries are skipped) and wait until they have ended.

    A task still running :data:`RECANCEL_S` after a cancellation is cancelled
    again. With ``timeout``, gives up after that many seconds and returns the
    tasks still running (else the empty set). An exception a task ended with
    (other than its cancellation) while being stopped is logged, not raised:
    the caller is stopping. A task already done is left alone. Cancelling the
    caller ends the wait; the tasks have been cancelled at least once.
    """
    pending: set[asyncio.Task[Any]] = {t for t in tasks if t is not None and not t.done()}
    running = set(pending)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        wait = RECANCEL_S if deadline is None else min(RECANCEL_S, deadline - loop.time())
        if wait <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=wait)
    for task in running - pending:
        if not task.cancelled():
            error = task.exception()
            if error is not None:
                log.warning("task %s ended with %r while stopping", task.get_name(), error,
                            exc_info=error)
    return pending


async def race(*coros: Coroutine[Any, Any, Any]) -> list[object]:
    """Run ``coros`` as tasks until one of them ends, then cancel the others: what each
    ended with, in order (its result, its exception, or the cancellation)."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results: list[object] = await asyncio.gather(*tasks, return_exceptions=True)
    return results
