"""The retry policy: jittered exponential delays, reproducible, capped, resettable."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from kumex_l3.backoff import Backoff, delays


class FixedRandom(random.Random):
    """``random()`` returns the given values in turn (an injected RNG)."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self._values = itertools.cycle(values)

    def random(self) -> float:
        return next(self._values)


def take(it: object, n: int) -> list[float]:
    return list(itertools.islice(it, n))  # type: ignore[call-overload]


def test_no_jitter_is_the_exact_capped_exponential() -> None:
    got = take(delays(1.0, 2.0, 30.0, jitter=0), 8)
    assert got == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_each_delay_lies_within_its_jitter_band() -> None:
    rng = random.Random(42)
    nominal = [0.5 * 3**i for i in range(6)] + [60.0] * 20
    nominal = [min(d, 60.0) for d in nominal]
    for jitter in (0.0, 0.25, 0.5, 1.0):
        got = take(delays(0.5, 3.0, 60.0, jitter=jitter, rng=rng), len(nominal))
        for d, n in zip(got, nominal, strict=True):
            assert n * (1 - jitter) <= d <= n


def test_injected_rng_sets_the_jitter() -> None:
    # random() == 0 -> the nominal delay; random() == 0.5 with jitter 0.5 -> 3/4 of it.
    got = take(delays(2.0, 2.0, 8.0, jitter=0.5, rng=FixedRandom(0.0, 0.5)), 4)
    assert got == [2.0, 3.0, 8.0, 6.0]


def test_same_seed_same_delays_other_seed_other_delays() -> None:
    a = take(delays(seed=7), 10)
    b = take(delays(seed=7), 10)
    c = take(delays(seed=8), 10)
    assert a == b
    assert a != c


def test_reset_starts_again_from_initial() -> None:
    policy = Backoff(1.0, 2.0, 10.0, jitter=0)
    assert [policy.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert policy.attempts == 5
    policy.reset()
    assert policy.attempts == 0
    assert [next(policy) for _ in range(3)] == [1.0, 2.0, 4.0]


def test_seeded_policy_stays_reproducible_across_resets() -> None:
    def run() -> list[float]:
        policy = Backoff(seed=3)
        out = [policy.next_delay() for _ in range(4)]
        policy.reset()
        out += [policy.next_delay() for _ in range(4)]
        return out

    assert run() == run()


def test_long_outages_stay_capped_and_finite() -> None:
    policy = Backoff(0.1, 10.0, 5.0, seed=1)
    got = [policy.next_delay() for _ in range(5000)]
    assert max(got) <= 5.0
    assert min(got[10:]) >= 2.5  # capped, jitter 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0.0},
        {"initial": -1.0},
        {"factor": 0.5},
        {"initial": 5.0, "max_delay": 1.0},
        {"jitter": -0.1},
        {"jitter": 1.5},
    ],
)
def test_bad_parameters_are_refused_at_once(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        delays(**kwargs)
    with pytest.raises(ValueError):
        Backoff(**kwargs)
