"""Line arbitration (pure) against a slow, obvious reference, and the sequence guard.

The reference for the arbiter is what redundancy promises: when every copy
of a message reaches the arbiter within ``wait`` of the hole it fills, the
merged stream holds every sequence that at least one line delivered, once and
in order, each with its own text; the sequences no line delivered are exactly
the declared gaps, one per run; and an implausible frame is refused, never
released, whatever line carries it.
"""

from __future__ import annotations

import random

import pytest

from kumex_l3.sequence import MAX_SEQUENCE_JUMP, SequenceGuard, Verdict
from services.feed.arbiter import Arbiter, GapDeclared, Output, Rebased, Refused, Released

WEDGE = 2**63 - 1


# --------------------------------------------------------------------------- the guard


def test_guard_verdicts() -> None:
    guard = SequenceGuard()
    assert guard.check(100) is Verdict.FIRST and guard.position == 100
    assert guard.check(101) is Verdict.NEXT
    assert guard.check(101) is Verdict.STALE and guard.position == 101
    assert guard.check(90) is Verdict.STALE
    assert guard.check(105) is Verdict.GAP and guard.position == 105
    # A wedge: refused, the position holds, and genuine messages still see their gaps.
    assert guard.check(WEDGE) is Verdict.IMPLAUSIBLE and guard.position == 105
    assert guard.check(WEDGE) is Verdict.IMPLAUSIBLE  # a second copy is no corroboration
    assert guard.check(106) is Verdict.NEXT
    assert guard.check(108) is Verdict.GAP
    # Far behind is implausible too.
    guard = SequenceGuard(10**12)
    assert guard.check(1) is Verdict.IMPLAUSIBLE and guard.position == 10**12


def test_guard_follows_a_stream_that_really_moved() -> None:
    far = 10**12
    guard = SequenceGuard(500)
    assert guard.check(far) is Verdict.IMPLAUSIBLE
    assert guard.check(far + 2) is Verdict.REBASE and guard.position == far + 2
    assert guard.check(far + 3) is Verdict.NEXT
    # Two crafted neighbours move it; the genuine stream, contiguous, moves it back.
    guard = SequenceGuard(500)
    assert guard.check(WEDGE - 1) is Verdict.IMPLAUSIBLE
    assert guard.check(WEDGE) is Verdict.REBASE
    assert guard.check(501) is Verdict.IMPLAUSIBLE
    assert guard.check(502) is Verdict.REBASE and guard.position == 502


def test_guard_advance_false_and_reset() -> None:
    guard = SequenceGuard(10)
    assert guard.check(15, advance=False) is Verdict.GAP and guard.position == 10
    guard.advance(12)
    assert guard.position == 12
    guard.advance(11)
    assert guard.position == 12
    guard.check(MAX_SEQUENCE_JUMP * 5)
    guard.reset(7)
    assert guard.position == 7 and guard.far_neighbours(MAX_SEQUENCE_JUMP * 5 + 1) == []


# --------------------------------------------------------------------------- the arbiter


def _text(seq: int) -> str:
    return f'{{"sequence":{seq}}}'


def _run(arbiter: Arbiter, events: list[tuple[float, int, int, str]]) -> list[Output]:
    """Feed (time, line, seq, text) events in time order, expiring as time passes."""
    out: list[Output] = []
    for at, line, seq, text in sorted(events, key=lambda e: e[0]):
        due = arbiter.due()
        while due is not None and due <= at:
            out += arbiter.expire(due)
            due = arbiter.due()
        if arbiter.seen(line, seq):
            out += arbiter.offer(line, seq, text, at)
    due = arbiter.due()
    while due is not None:
        out += arbiter.expire(due)
        due = arbiter.due()
    return out


def _schedule(rng: random.Random, start: int, count: int, lines: int, *, drop: float,
              dup: float, skew: float, period: float) -> tuple[list[tuple[float, int, int, str]],
                                                            set[int]]:
    """Each line delivers each message with prob 1-drop, late by up to ``skew`` (so copies
    reorder within a line too), sometimes twice. Returns the events and the delivered set."""
    events: list[tuple[float, int, int, str]] = []
    delivered: set[int] = set()
    for i in range(count):
        seq = start + i
        for line in range(lines):
            if rng.random() < drop:
                continue
            delivered.add(seq)
            at = i * period + rng.random() * skew
            events.append((at, line, seq, _text(seq)))
            if rng.random() < dup:
                events.append((at + rng.random() * skew, line, seq, _text(seq)))
    return events, delivered


def _runs(missing: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for seq in missing:
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


@pytest.mark.parametrize("seed", range(12))
def test_arbiter_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    lines = rng.choice([1, 2, 2, 3])
    start, count = 1_000_000 + rng.randrange(1000), 6000
    drop = rng.choice([0.001, 0.01, 0.1, 0.4])
    period, skew = 0.001, rng.choice([0.0005, 0.004, 0.02])
    wait = 2 * skew + period
    events, delivered = _schedule(rng, start, count, lines, drop=drop, dup=0.05,
                                  skew=skew, period=period)
    arbiter = Arbiter("XBTUSDM", lines, wait=wait, position=start - 1)
    out = _run(arbiter, events)
    released = [o for o in out if isinstance(o, Released)]
    gaps = [o for o in out if isinstance(o, GapDeclared)]
    seqs = [r.sequence for r in released]
    assert seqs == sorted(delivered), "every delivered sequence once, in order"
    assert all(r.text == _text(r.sequence) for r in released)
    last = max(delivered)
    missing = [s for s in range(start, last + 1) if s not in delivered]
    assert [(g.first, g.last) for g in gaps] == _runs(missing)
    stats = arbiter.stats
    assert stats.real_gaps == len(gaps) and stats.lost == len(missing)
    assert sum(stats.first) == len(released)
    assert stats.refused == 0 and not any(isinstance(o, Refused | Rebased) for o in out)
    assert arbiter.held == 0 and arbiter.position == last
    for line in range(lines):
        assert 0 <= stats.covered[line] <= stats.missed[line]
    # What a line skipped was either covered by another line or lost with every line.
    assert sum(stats.missed) - sum(stats.covered) <= stats.lost * lines
    if lines > 1 and drop <= 0.01:
        # Two lines dropping the same message is rare: most holes of one line were covered.
        assert sum(stats.covered) >= 0.9 * sum(stats.missed) - 5


def test_a_wedge_on_every_line_is_refused_and_never_moves_the_position() -> None:
    rng = random.Random(7)
    events, delivered = _schedule(rng, 500, 400, 2, drop=0.01, dup=0.0, skew=0.002,
                                  period=0.001)
    for line in range(2):
        events.append((0.2, line, WEDGE, _text(WEDGE)))
    arbiter = Arbiter("XBTUSDM", 2, wait=0.005, position=499, far_hold=0.05)
    out = _run(arbiter, events)
    released = [o.sequence for o in out if isinstance(o, Released)]
    assert released == sorted(delivered)
    (refused,) = [o for o in out if isinstance(o, Refused)]
    assert refused.sequence == WEDGE and "implausible" in refused.reason
    assert arbiter.position == max(delivered) and arbiter.stats.duplicates >= 1


def test_a_corroborated_jump_is_followed() -> None:
    arbiter = Arbiter("XBTUSDM", 1, wait=0.01, position=99, far_hold=1.0)
    far = 10**12
    out: list[Output] = []
    for i, seq in enumerate([100, 101, far, far + 1, far + 2]):
        assert arbiter.seen(0, seq)
        out += arbiter.offer(0, seq, _text(seq), i * 0.001)
    assert [o.sequence for o in out if isinstance(o, Released)] == [100, 101, far, far + 1,
                                                                    far + 2]
    assert Rebased(101, far) in out and arbiter.stats.rebases == 1


def test_a_far_message_in_a_quiet_market_is_refused_then_corroborated() -> None:
    """One message every few seconds after the stream moved: the first is refused after
    ``far_hold``, but remembered: the second is corroborated by it and taken."""
    arbiter = Arbiter("XBTUSDM", 1, wait=0.01, position=99, far_hold=1.0)
    far = 10**12
    assert arbiter.seen(0, far) and arbiter.offer(0, far, _text(far), 0.0) == []
    assert [type(o) for o in arbiter.expire(1.5)] == [Refused]
    assert arbiter.seen(0, far + 1)
    out = arbiter.offer(0, far + 1, _text(far + 1), 5.0)
    assert [o.sequence for o in out if isinstance(o, Released)] == [far + 1]


def test_pending_is_bounded() -> None:
    arbiter = Arbiter("XBTUSDM", 1, wait=60.0, position=0, max_pending=10)
    out: list[Output] = []
    for seq in range(2, 14):
        assert arbiter.seen(0, seq)
        out += arbiter.offer(0, seq, _text(seq), 0.0)
    assert GapDeclared(1, 1) in out
    assert [o.sequence for o in out if isinstance(o, Released)] == list(range(2, 14))
    assert arbiter.held == 0


def test_first_message_without_a_position() -> None:
    arbiter = Arbiter("XBTUSDM", 2, wait=0.01)
    assert arbiter.seen(1, 42)
    assert arbiter.offer(1, 42, _text(42), 0.0) == [Released(42, _text(42), 1)]
    assert not arbiter.seen(0, 41) and not arbiter.seen(0, 42)
    assert arbiter.seen(0, 43)
