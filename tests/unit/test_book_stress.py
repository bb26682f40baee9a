"""Seeded random stress: the book against a slow, obviously correct reference.

Over all seeds at least 200,000 generated messages (opens, partial and full
matches, updates, cancels, dones for takers and refused orders, many levels)
are applied; after every message the full L3 view and the depth are compared
with :class:`ReferenceBook`, and ``check()`` runs on a stride.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from kumex_l3 import OrderBook, parse_message
from kumex_l3.testing.synthetic import StreamGenerator
from tests.reference_book import ReferenceBook

# (seed, messages, target resting orders, half-band in ticks, tick decimals)
CASES = [
    (1, 60_000, 60, 12, 1),
    (2, 60_000, 250, 60, 1),
    (3, 40_000, 8, 3, 0),  # a thin book: sides empty often, levels created and destroyed
    (4, 45_000, 120, 400, 2),  # sparse levels, two decimals
]


def _book_l3(book: OrderBook) -> tuple[list[object], list[object]]:
    bids, asks = book.l3()
    return (
        [(lv.price, [(o.order_id, Decimal(o.size), o.ts) for o in lv.orders]) for lv in bids],
        [(lv.price, [(o.order_id, Decimal(o.size), o.ts) for o in lv.orders]) for lv in asks],
    )


def _book_depth(book: OrderBook) -> tuple[list[object], list[object]]:
    bids, asks = book.depth()
    return ([(p, Decimal(s), n) for p, s, n in bids], [(p, Decimal(s), n) for p, s, n in asks])


def test_cases_cover_at_least_200k_messages() -> None:
    assert sum(case[1] for case in CASES) >= 200_000


@pytest.mark.parametrize(("seed", "count", "target", "levels", "decimals"), CASES)
def test_book_matches_reference(seed: int, count: int, target: int, levels: int,
                                decimals: int) -> None:
    gen = StreamGenerator(seed=seed, target_orders=target, levels=levels,
                          tick_decimals=decimals, mid_ticks=315_700 * 10**decimals // 10)
    book = OrderBook(gen.symbol)
    ref = ReferenceBook(symbol=gen.symbol)
    subjects: dict[str, int] = {}
    for i, raw in enumerate(gen.take(count)):
        msg = parse_message(raw)
        subjects[type(msg).__name__] = subjects.get(type(msg).__name__, 0) + 1
        assert book.apply(msg) is True
        ref.apply(raw)
        assert book.sequence == ref.sequence
        assert _book_l3(book) == ref.l3(), f"seed {seed}: L3 differs after message {i}: {raw}"
        assert _book_depth(book) == ref.depth()
        assert len(book) == len(ref.orders)
        if i % 97 == 0:
            book.check()
    book.check()
    # The stream really exercised every subject and partial fills.
    assert set(subjects) == {"Received", "Open", "Update", "Match", "Done"}
    assert book.stats.unknown_done > 0


@pytest.mark.parametrize("seed", [11, 12])
def test_snapshot_then_stream_and_checkpoint_round_trip(seed: int) -> None:
    """Start from a snapshot mid-stream, restore checkpoints along the way, stay equal."""
    gen = StreamGenerator(seed=seed, target_orders=150, levels=30)
    warmup = gen.take(5_000) + gen.flush()
    ref = ReferenceBook(symbol=gen.symbol)
    for raw in warmup:
        ref.apply(raw)
    snap = gen.snapshot()
    book = OrderBook.from_snapshot(snap)
    assert _book_l3(book) == ref.l3()
    for i, raw in enumerate(gen.take(20_000)):
        book.apply(parse_message(raw))
        ref.apply(raw)
        if i % 1_000 == 0:
            state = book.to_state()
            restored = OrderBook.from_state(state)
            assert restored.to_state() == state
            assert _book_l3(restored) == _book_l3(book)
            book = restored
    assert _book_l3(book) == ref.l3()
    book.check()
