"""The sandbox engine's messages rebuild its book exactly in kumex_l3's OrderBook.

Prime the synthetic flow, take ``engine.snapshot()`` as JSON text, then feed
100,000 flow messages through ``json.dumps`` → ``parse_message`` →
``OrderBook.apply``; at checkpoints and at the end the book's L3 (prices, order
ids, sizes, ts, queue order, sequence) equals ``engine.book_l3()`` and
``book.check()`` passes. A book rebuilt from a fresh snapshot at each
checkpoint must be the same too (snapshot rows carry the queue order in ``ts``).
"""

from __future__ import annotations

import json
from typing import Any

from kumex_l3 import OrderBook, parse_message
from kumex_l3.book import L3Level
from services.sandbox.contracts import CONTRACTS
from services.sandbox.engine import MatchingEngine
from services.sandbox.flow import SyntheticFlow

T0 = 1_700_000_000_000_000_000
TOTAL_MESSAGES = 100_000
CHECKPOINT_EVERY = 10_000


def book_form(book: OrderBook) -> dict[str, Any]:
    """``book.l3()`` in the form of ``MatchingEngine.book_l3()``."""

    def side(levels: list[L3Level]) -> list[tuple[str, list[tuple[str, int, int]]]]:
        return [(lv.text, [(o.order_id, int(o.size), o.ts) for o in lv.orders]) for lv in levels]

    bids, asks = book.l3()
    for lv in bids + asks:
        assert lv.size == sum(o.size for o in lv.orders)
    return {"sequence": book.sequence, "bids": side(bids), "asks": side(asks)}


def assert_same(book: OrderBook, engine: MatchingEngine) -> None:
    book.check()
    assert book_form(book) == engine.book_l3()
    assert book.best_bid() == engine.best_bid()
    assert book.best_ask() == engine.best_ask()


def test_messages_rebuild_the_engine_book_exactly() -> None:
    engines = {s: MatchingEngine(c, id_seed=2) for s, c in CONTRACTS.items()}
    flow = SyntheticFlow(engines, seed=2024)
    flow.prime(T0)
    books = {s: OrderBook.from_snapshot(json.dumps(e.snapshot(T0 + 1))) for s, e in engines.items()}
    for symbol, engine in engines.items():
        assert_same(books[symbol], engine)
        assert len(books[symbol]) > 250
    applied = 0
    next_checkpoint = CHECKPOINT_EVERY
    now = T0 + 1
    subjects: set[str] = set()
    while applied < TOTAL_MESSAGES:
        now += 200_000
        for symbol, msgs in flow.step(now):
            book = books[symbol]
            for msg in msgs:
                assert book.apply(parse_message(json.dumps(msg)))
                subjects.add(msg["subject"])
            applied += len(msgs)
        if applied >= next_checkpoint:
            next_checkpoint += CHECKPOINT_EVERY
            for symbol, engine in engines.items():
                assert_same(books[symbol], engine)
                fresh = OrderBook.from_snapshot(json.dumps(engine.snapshot(now)))
                assert book_form(fresh) == engine.book_l3()
    for symbol, engine in engines.items():
        assert_same(books[symbol], engine)
        assert books[symbol].sequence == engine.sequence
        assert books[symbol].stats.unknown_update == 0
    assert subjects == {"received", "open", "update", "match", "done"}
    # Hidden makers were hit (matches the book cannot place) and the book coped.
    assert sum(b.stats.unknown_match for b in books.values()) > 0
    assert flow.rejects == 0
