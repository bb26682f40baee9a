"""Checks of a served book against the truth the sandbox journals (tests and chaos)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kumex_l3 import OrderBook, parse_message


def assert_l3_equals_engine(ours: dict[str, Any], engine: dict[str, Any]) -> None:
    """``GET /book/{sym}/l3`` equals the sandbox's ``/sandbox/book/{sym}``, order by order."""
    assert ours["sequence"] == engine["sequence"]
    for side in ("bids", "asks"):
        got = [(lv["price"], [(o["orderId"], int(o["size"])) for o in lv["orders"]])
               for lv in ours[side]]
        want = [(lv["price"], [(o["orderId"], int(o["size"])) for o in lv["orders"]])
                for lv in engine[side]]
        assert got == want, f"{side} differ from the engine's book"


def assert_answers_were_true(truth: OrderBook, journal: Iterable[str],
                             answers: list[tuple[int, dict[str, Any]]]) -> int:
    """Every 200 answer of ``GET /book`` equals ``truth`` replayed to its sequence; every
    other answer is a 503 with a ``detail``. Returns how many 200s were checked."""
    by_seq: dict[int, list[dict[str, Any]]] = {}
    for status, body in answers:
        assert status in (200, 503), (status, body)
        if status == 503:
            assert body.get("detail"), body
        else:
            by_seq.setdefault(body["sequence"], []).append(body)
    checked = 0
    for text in journal:
        truth.apply(parse_message(text))
        for body in by_seq.pop(truth.sequence, []):
            bids, asks = truth.depth_rows(1000)
            assert (body["bids"], body["asks"]) == (bids, asks), (
                f"the book served a wrong book at sequence {truth.sequence}")
            checked += 1
    assert not by_seq, f"answers at sequences the engine never had: {sorted(by_seq)[:5]}"
    return checked
