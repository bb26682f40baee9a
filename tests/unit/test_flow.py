"""Tests of the sandbox's synthetic order flow (services/sandbox/flow.py)."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

from services.sandbox.contracts import CONTRACTS
from services.sandbox.engine import MatchingEngine, Message
from services.sandbox.flow import SyntheticFlow

T0 = 1_700_000_000_000_000_000
STEP_NS = 250_000


def make(seed: int, **kw: object) -> tuple[dict[str, MatchingEngine], SyntheticFlow]:
    engines = {s: MatchingEngine(c, id_seed=11) for s, c in CONTRACTS.items()}
    return engines, SyntheticFlow(engines, seed=seed, **kw)  # type: ignore[arg-type]


def run(seed: int, steps: int) -> list[tuple[str, list[Message]]]:
    _, flow = make(seed)
    out = flow.prime(T0)
    for i in range(steps):
        out += flow.step(T0 + (i + 1) * STEP_NS)
    return out


def test_same_seed_same_messages_other_seed_differs() -> None:
    a = run(42, 20_000)
    b = run(42, 20_000)
    assert a == b
    c = run(43, 2_000)
    assert c != a[: len(c)]


def test_flow_invariants_over_20k_steps() -> None:
    engines, flow = make(7)
    seqs = {s: e.sequence for s, e in engines.items()}
    subjects: Counter[str] = Counter()
    last_ts = dict.fromkeys(engines, 0)

    def consume(batch: list[tuple[str, list[Message]]]) -> None:
        for symbol, msgs in batch:
            assert msgs, "a returned batch is never empty"
            for m in msgs:
                d = m["data"]
                assert m["topic"] == f"/contractMarket/level3v2:{symbol}"
                assert d["symbol"] == symbol
                assert d["sequence"] == seqs[symbol] + 1
                seqs[symbol] = d["sequence"]
                assert d["ts"] > last_ts[symbol]
                last_ts[symbol] = d["ts"]
                subjects[m["subject"]] += 1

    primed = flow.prime(T0)
    assert [s for s, _ in primed] == list(engines)
    consume(primed)
    for symbol, engine in engines.items():
        assert engine.resting_count() == 300
        book = engine.book_l3()
        assert len(book["bids"]) >= 25 and len(book["asks"]) >= 25, symbol
        assert engine.best_bid() is not None and engine.best_ask() is not None
    counts: dict[str, list[int]] = {s: [] for s in engines}
    for i in range(20_000):
        consume(flow.step(T0 + (i + 1) * STEP_NS))
        if i % 50 == 0:
            for symbol, engine in engines.items():
                bid, ask = engine.best_bid(), engine.best_ask()
                assert bid is not None and ask is not None, (i, symbol)
                assert bid < ask, (i, symbol, bid, ask)
                hb, ha = engine.best_ticks("buy"), engine.best_ticks("sell")
                assert hb is not None and ha is not None and hb < ha
                counts[symbol].append(engine.resting_count())
                assert engine.sequence == seqs[symbol]
    assert set(subjects) == {"received", "open", "update", "match", "done"}
    assert subjects["match"] > 1000 and subjects["update"] > 200
    assert flow.rejects == 0
    for symbol, engine in engines.items():
        assert min(counts[symbol]) >= 150 and max(counts[symbol]) <= 600, (symbol, counts[symbol])
        levels = engine.book_l3()
        assert len(levels["bids"]) >= 10 and len(levels["asks"]) >= 10
        for user in ("flow-maker-0", "flow-maker-1"):
            assert engine.all_orders(user)
            assert engine.active_count(user) <= engine.max_active_per_user
    taker_orders = [o for e in engines.values() for o in e.all_orders("flow-taker-1")]
    assert {o.type for o in taker_orders} == {"limit", "market"}
    assert {o.time_in_force for o in taker_orders} == {"GTC", "IOC"}
    assert any(o.filled_size for o in taker_orders)


def test_single_symbol_with_start_mid_and_small_target() -> None:
    engine = MatchingEngine(CONTRACTS["ETHUSDTM"])
    flow = SyntheticFlow(
        {"ETHUSDTM": engine}, seed=1, start_mid={"ETHUSDTM": Decimal("1500")}, target_resting=60
    )
    flow.prime(T0)
    mid = engine.mid()
    assert mid is not None and abs(mid - Decimal("1500")) < Decimal("1")
    assert engine.resting_count() == 60
    for i in range(3_000):
        for symbol, _msgs in flow.step(T0 + i + 1):
            assert symbol == "ETHUSDTM"
    assert 15 <= engine.resting_count() <= 200
    bid, ask = engine.best_bid(), engine.best_ask()
    assert bid is not None and ask is not None and bid < ask
