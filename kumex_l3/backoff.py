"""Retry policy: jittered exponential delays (pure, no I/O, no clock, no sleeping).

As in python-websockets (``client.py:backoff``): the policy is a stream of delays,
and only the loop that retries sleeps. :func:`delays` is the bare generator;
:class:`Backoff` wraps it with :meth:`Backoff.reset` for the usual loop::

    policy = Backoff(initial=1.0, factor=2.0, max_delay=30.0)
    while True:
        try:
            await connect_and_serve()
        except SomeRetryableError:
            await asyncio.sleep(policy.next_delay())
        else:
            policy.reset()          # a success: the next failure starts small again

Attempt ``n`` (from 0) is centred on ``min(initial * factor**n, max_delay)`` and
jittered down by up to ``jitter`` of it: with the default ``jitter=0.5`` each
delay is uniform in ``[d/2, d]``, so clients that failed together do not retry
together, and no delay is ever much shorter than the policy asks. ``jitter=0``
gives the exact exponential sequence, ``jitter=1`` "full jitter" (``[0, d]``).
The randomness comes from an injectable :class:`random.Random` (or a seed), so
tests are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["Backoff", "delays"]


def _check(initial: float, factor: float, max_delay: float, jitter: float) -> None:
    if initial <= 0:
        raise ValueError("initial delay must be > 0")
    if factor < 1:
        raise ValueError("factor must be >= 1")
    if max_delay < initial:
        raise ValueError("max_delay must be >= initial")
    if not 0 <= jitter <= 1:
        raise ValueError("jitter must be within [0, 1]")


def delays(
    initial: float = 1.0,
    factor: float = 2.0,
    max_delay: float = 30.0,
    *,
    jitter: float = 0.5,
    rng: random.Random | None = None,
    seed: int | None = None,
) -> Iterator[float]:
    """An endless generator of retry delays in seconds (see the module docstring).

    ``rng`` wins over ``seed``; with neither, a fresh unseeded ``Random`` is used.
    Raises ``ValueError`` at once on a bad parameter.
    """
    _check(initial, factor, max_delay, jitter)
    return _delays(initial, factor, max_delay, jitter,
                   rng if rng is not None else random.Random(seed))


def _delays(initial: float, factor: float, max_delay: float, jitter: float,
            rng: random.Random) -> Iterator[float]:
    delay = initial
    while True:
        yield delay * (1.0 - jitter * rng.random())
        # Once capped, stay capped (and never overflow a float on long outages).
        delay = min(delay * factor, max_delay)


class Backoff:
    """A resettable :func:`delays`: :meth:`next_delay` on failure, :meth:`reset` on success.

    ``attempts`` counts the delays handed out since the last reset. The same
    ``rng`` keeps being used across resets (a seeded policy stays reproducible).
    """

    def __init__(
        self,
        initial: float = 1.0,
        factor: float = 2.0,
        max_delay: float = 30.0,
        *,
        jitter: float = 0.5,
        rng: random.Random | None = None,
        seed: int | None = None,
    ) -> None:
        _check(initial, factor, max_delay, jitter)
        self.initial = initial
        self.factor = factor
        self.max_delay = max_delay
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random(seed)
        self.attempts = 0
        self._it = self._fresh()

    def _fresh(self) -> Iterator[float]:
        return _delays(self.initial, self.factor, self.max_delay, self.jitter, self._rng)

    def next_delay(self) -> float:
        """The delay to sleep before the next attempt."""
        self.attempts += 1
        return next(self._it)

    def reset(self) -> None:
        """Start again from ``initial`` (call it after a success)."""
        self.attempts = 0
        self._it = self._fresh()

    def __iter__(self) -> Iterator[float]:
        return self

    def __next__(self) -> float:
        return self.next_delay()

    def __repr__(self) -> str:
        return (f"Backoff(initial={self.initial}, factor={self.factor}, "
                f"max_delay={self.max_delay}, jitter={self.jitter}, attempts={self.attempts})")
