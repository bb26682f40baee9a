"""FaultState validation and the pure WsFaultFilter (drop, duplicate, reorder)."""

from __future__ import annotations

import itertools
import json

import pytest

from services.sandbox.faults import FaultState, WsFaultFilter


def test_defaults_and_to_dict_is_json() -> None:
    faults = FaultState()
    faults.counts["dropped"] += 2
    data = faults.to_dict()
    assert data["drop_rate"] == 0.0
    assert data["rest_latency_ms"] == 30.0
    assert data["snapshot_rate_per_min"] == 1.0
    assert data["rest_error_status"] is None
    assert data["counts"] == {"dropped": 2}
    assert json.loads(json.dumps(data)) == data


def test_update_sets_knobs() -> None:
    faults = FaultState()
    faults.update(drop_rate=0.5, delay_ms=20, refuse_snapshots=True, rest_error_status=429,
                  rest_error_until=12.5, disconnect_every_s=3)
    assert faults.drop_rate == 0.5
    assert faults.delay_ms == 20.0
    assert faults.refuse_snapshots is True
    assert faults.rest_error_status == 429
    assert faults.rest_error_active(12.0) == 429
    assert faults.rest_error_active(13.0) is None
    faults.update(rest_error_status=None)
    assert faults.rest_error_active(0.0) is None


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"nope": 1}, "unknown fault knob 'nope'"),
        ({"counts": {}}, "unknown fault knob 'counts'"),
        ({"drop_rate": 1.5}, "drop_rate must be in [0, 1]"),
        ({"reorder_rate": -0.1}, "reorder_rate must be in [0, 1]"),
        ({"duplicate_rate": "0.1"}, "duplicate_rate must be a number"),
        ({"delay_ms": -1}, "delay_ms must be >= 0"),
        ({"rest_latency_ms": float("nan")}, "rest_latency_ms must be finite"),
        ({"rest_error_status": 404}, "rest_error_status must be 429, 500 or null"),
        ({"rest_error_status": True}, "rest_error_status must be 429, 500 or null"),
        ({"refuse_snapshots": 1}, "refuse_snapshots must be true or false"),
        ({"disconnect_every_s": True}, "disconnect_every_s must be a number"),
    ],
)
def test_update_refuses_bad_values(changes: dict[str, object], words: str) -> None:
    faults = FaultState()
    before = faults.to_dict()
    with pytest.raises(ValueError) as info:
        faults.update(**changes)
    assert words in str(info.value)
    assert faults.to_dict() == before


def test_update_is_all_or_nothing() -> None:
    faults = FaultState()
    with pytest.raises(ValueError):
        faults.update(drop_rate=0.5, delay_ms=-1)
    assert faults.drop_rate == 0.0


def _run(faults: FaultState, batches: list[list[int]], seed: int = 7) -> list[int]:
    flt = WsFaultFilter(faults, seed=seed)
    out: list[int] = []
    for batch in batches:
        out.extend(flt.filter("XBTUSDM", batch))
    out.extend(flt.flush("XBTUSDM"))
    return out


def test_no_fault_passes_everything() -> None:
    faults = FaultState()
    assert _run(faults, [[1, 2, 3], [4]]) == [1, 2, 3, 4]
    assert not faults.counts


def test_drop_leaves_gaps_and_counts() -> None:
    faults = FaultState(drop_rate=0.3)
    sent = list(range(1, 1001))
    out = _run(faults, [sent[i:i + 3] for i in range(0, len(sent), 3)])
    assert out == sorted(out)
    assert set(out) < set(sent)
    assert faults.counts["dropped"] == len(sent) - len(out)
    assert 200 < faults.counts["dropped"] < 400


def test_duplicate_sends_twice_in_a_row() -> None:
    faults = FaultState(duplicate_rate=0.2)
    sent = list(range(1, 501))
    out = _run(faults, [[s] for s in sent])
    doubles = [a for a, b in itertools.pairwise(out) if a == b]
    assert doubles
    assert len(doubles) == faults.counts["duplicated"] == len(out) - len(sent)
    assert sorted(set(out)) == sent


def test_reorder_swaps_neighbours_across_calls() -> None:
    faults = FaultState(reorder_rate=0.2)
    sent = list(range(1, 501))
    out = _run(faults, [[s] for s in sent])  # one message a call: swaps cross calls
    assert sorted(out) == sent
    inversions = [i for i in range(len(out) - 1) if out[i] > out[i + 1]]
    assert inversions
    assert len(inversions) == faults.counts["reordered"]
    for i in inversions:
        assert out[i] == out[i + 1] + 1  # a neighbouring pair, swapped


def test_reorder_holds_per_symbol() -> None:
    faults = FaultState(reorder_rate=1.0)
    flt = WsFaultFilter(faults, seed=1)
    assert flt.filter("A", [1]) == []
    assert flt.held("A")
    assert flt.filter("B", [10]) == []
    assert flt.filter("A", [2]) == [2, 1]
    assert flt.flush("B") == [10]
    assert flt.flush("B") == []
    faults.update(reorder_rate=0.0)
    assert flt.filter("A", [3, 4]) == [3, 4]


def test_same_seed_same_faults() -> None:
    sent = [[i, i + 1] for i in range(0, 400, 2)]
    a = _run(FaultState(drop_rate=0.1, duplicate_rate=0.1, reorder_rate=0.1), sent, seed=3)
    b = _run(FaultState(drop_rate=0.1, duplicate_rate=0.1, reorder_rate=0.1), sent, seed=3)
    c = _run(FaultState(drop_rate=0.1, duplicate_rate=0.1, reorder_rate=0.1), sent, seed=4)
    assert a == b
    assert a != c
