"""``python -m kumex_l3 replay``: captures of several symbols, noise, gaps, samples."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kumex_l3 import OrderBook, parse_message
from kumex_l3.__main__ import main
from kumex_l3.testing.synthetic import StreamGenerator

SYM = "XBTUSDM"


def _capture(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")
    return path


def _streams() -> tuple[dict[str, object], list[str], list[str]]:
    """A snapshot at 1,000 messages, then 3,000 of SYM mixed with another symbol's."""
    gen = StreamGenerator(SYM, seed=11, start_sequence=0, target_orders=80, levels=15)
    gen.take(1_000)
    before = gen.flush()
    snapshot = gen.snapshot()
    ours = gen.take(3_000) + gen.flush()
    other = StreamGenerator("ETHUSDTM", seed=12, start_sequence=500).take(1_500)
    return snapshot, before, ours + other


def _reference(snapshot: dict[str, object], lines: list[str]) -> OrderBook:
    """The book, one message at a time through apply (the slow path)."""
    book = OrderBook.from_snapshot(snapshot)
    for line in lines:
        msg = parse_message(line)
        if getattr(msg, "symbol", None) == SYM and msg.sequence > book.sequence:  # type: ignore[union-attr]
            book.apply(msg)
    return book


def test_replay_from_a_snapshot_equals_apply_with_noise_and_another_symbol(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snapshot, before, after = _streams()
    interleaved: list[str] = []
    others = [line for line in after if f"level3v2:{SYM}" not in line]
    mine = [line for line in after if f"level3v2:{SYM}" in line]
    for i, line in enumerate(mine):
        interleaved.append(line)
        if i < len(others):
            interleaved.append(others[i])
        if i % 700 == 0:  # noise the live book would dead-letter, and replays
            interleaved += ['{"type":"message","topic":"/contractMarket/level3v2:XBTUSDM",'
                            '"subject":"open","data":{"broken"', "", mine[max(i - 5, 0)]]
    capture = _capture(tmp_path / "cap.jsonl.gz", before[-50:] + interleaved)
    (tmp_path / "snap.json").write_text(json.dumps({"code": "200000", "data": snapshot}))
    status = main(["replay", str(capture), "--snapshot", str(tmp_path / "snap.json"),
                   "--out", str(tmp_path / "out.json"), "--quiet", "--every", "250",
                   "--samples", str(tmp_path / "s.csv"), "--depth", "2"])
    err = capsys.readouterr().err
    assert status == 0, err
    want = _reference(snapshot, mine)
    got = OrderBook.from_snapshot(json.loads((tmp_path / "out.json").read_text()))
    assert got.sequence == want.sequence and got.l3() == want.l3()
    assert "5 refused" in err and "refused 5: bad envelope" in err, err
    # Each sample is the book at its sequence (checked against apply, message by message).
    with (tmp_path / "s.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    sampled = sorted({int(r["sequence"]) for r in rows})
    assert len(sampled) >= 10
    book = OrderBook.from_snapshot(snapshot)
    for line in mine:
        msg = parse_message(line)
        if msg.sequence <= book.sequence:  # type: ignore[union-attr]
            continue
        book.apply(msg)
        if book.sequence in sampled:
            at = [r for r in rows if int(r["sequence"]) == book.sequence]
            bids, asks = book.depth(2)
            assert [(r["price"], r["size"]) for r in at if r["side"] == "buy"] == \
                [(str(lv.price), str(lv.size)) for lv in bids]
            assert [(r["price"], r["size"]) for r in at if r["side"] == "sell"] == \
                [(str(lv.price), str(lv.size)) for lv in asks]


def test_a_gap_in_the_capture_stops_with_a_clear_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = StreamGenerator(SYM, seed=3, start_sequence=0).take(2_000)
    capture = _capture(tmp_path / "cap.jsonl.gz", lines[:900] + lines[950:])
    assert main(["replay", str(capture), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "gap after sequence 900 (next is 951): 50 messages were never captured" in err


def test_without_a_snapshot_a_capture_from_the_start_is_the_whole_book(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = StreamGenerator(SYM, seed=4, start_sequence=0).take(5_000)
    capture = tmp_path / "plain.jsonl"
    capture.write_text("\n".join(lines) + "\n")
    assert main(["replay", str(capture), "--quiet", "--out", str(tmp_path / "o.json")]) == 0
    want = OrderBook(SYM)
    for line in lines:
        want.apply(parse_message(line))
    got = json.loads((tmp_path / "o.json").read_text())
    assert got == want.to_snapshot()
    assert "5,000 applied" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "says"), [
    (["--every", "10"], "sampling wants"),
    (["--snapshot", "missing.json"], "missing.json"),
    (["--symbol", "ETHUSDTM", "--snapshot", "snap.json"], "not ETHUSDTM"),
])
def test_usage_errors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                args: list[str], says: str) -> None:
    gen = StreamGenerator(SYM, seed=5, start_sequence=0)
    capture = _capture(tmp_path / "c.gz", gen.take(10))
    (tmp_path / "snap.json").write_text(json.dumps(gen.snapshot()))
    args = [str(tmp_path / a) if a.endswith(".json") else a for a in args]
    assert main(["replay", str(capture), "--quiet", *args]) == 1
    assert says in capsys.readouterr().err


def test_the_tools_without_rich(tmp_path: Path) -> None:
    """rich is an optional extra: without it the replay runs (no progress bar) and the
    viewer says what to install, in a real process where ``import rich`` fails."""
    hidden = tmp_path / "hide"
    (hidden / "rich").mkdir(parents=True)
    (hidden / "rich" / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'rich\'", name="rich")\n')
    lines = StreamGenerator(SYM, seed=6, start_sequence=0).take(500)
    capture = tmp_path / "c.jsonl"
    capture.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(hidden)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kumex_l3", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    done = run("replay", str(capture))
    assert done.returncode == 0 and "500 applied" in done.stderr, done.stderr
    done = run("watch", SYM, "--once")
    assert done.returncode == 2
    assert "pip install 'kumex-l3[tools]'" in done.stderr, done.stderr
