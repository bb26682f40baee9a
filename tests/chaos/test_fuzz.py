"""Property-based fuzzing of the pure core: the parser, the feed's frame router, the book.

Properties:

* whatever bytes, text or JSON comes in, :func:`kumex_l3.parse_message` returns
  a message or raises :class:`~kumex_l3.errors.MessageError`, nothing else;
  the feed's frame classifier (:func:`kumex_l3.wsclient.classify`) and its
  session never raise anything but a ``WsError``; the book's synchroniser never
  raises at all (it dead-letters);
* the same for valid messages mutated: fields deleted, values swapped for
  other types, numbers at their edges (beyond int64, negative, NaN, exponents);
* a valid stream with random faults (drops, duplicates, swaps) applied to an
  :class:`~kumex_l3.book.OrderBook` only ever raises ``SequenceGap``,
  ``IntegrityError`` or ``MessageError``; whenever ``apply`` returned
  normally ``check()`` passes and the book equals the true book at its
  sequence (after an error the book is rebuilt from a snapshot of the truth).

Budget: :data:`EXAMPLES` (``max_examples`` of the cheap properties; the stream
properties run a fifth of it), modest for CI; ``KUMEX_FUZZ_EXAMPLES=5000``
raises it (``make chaos``). :mod:`tests.chaos.fuzz_parser_atheris` is the
coverage-guided counterpart, run as a script.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kumex_l3 import OrderBook, parse_message, parse_snapshot
from kumex_l3.errors import IntegrityError, MessageError, SequenceGap
from kumex_l3.messages import Control, DataMessage
from kumex_l3.sequence import CORROBORATION_WINDOW, MAX_SEQUENCE_JUMP
from kumex_l3.sync import Applied, DeadLetter, Output, Synchronizer
from kumex_l3.testing.synthetic import StreamGenerator
from kumex_l3.wsclient import Session, WsError, classify
from tests.chaos import corpus

#: max_examples of each cheap property (parser, router); CI default, or KUMEX_FUZZ_EXAMPLES.
EXAMPLES: Final = int(os.environ.get("KUMEX_FUZZ_EXAMPLES", "300"))
#: max_examples of the stream properties (each example applies a few hundred messages).
STREAM_EXAMPLES: Final = max(10, EXAMPLES // 5)
#: Inputs of the atheris smoke run (a real campaign runs the script with a time budget).
ATHERIS_SMOKE_RUNS: Final = 2000

SYM = "XBTUSDM"
_FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "real_l3_2022.jsonl"

_settings = settings(max_examples=EXAMPLES, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_stream_settings = settings(max_examples=STREAM_EXAMPLES, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.data_too_large])


def _valid_texts() -> list[str]:
    """Valid messages of every subject: the real 2022 capture plus a generated stream."""
    texts = [line for line in _FIXTURE.read_text().splitlines() if line.strip()]
    texts += StreamGenerator(SYM, seed=3, start_sequence=100, target_orders=20,
                             levels=10).take(300)
    subjects = {json.loads(t)["subject"] for t in texts}
    assert subjects == {"received", "open", "update", "match", "done"}, subjects
    return texts


VALID: Final = _valid_texts()

#: Values that break parsers: beyond int64, negative, non-finite, exponents, wrong types.
EDGE_SCALARS: Final[list[Any]] = [
    None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64,
    10**40, 1.5, -0.0, 1e308, math.nan, math.inf, -math.inf, "", " ", "0", "-0", "-1",
    "1.5", "1e3", "1E-3", "1e999999999", "-1e999999999", "1e-999999999", "9" * 5000,
    "NaN", "sNaN", "Infinity", "-Infinity", "0x10", "1_000", "\u00b2", "\uff11", "٣",
    "\x00", "\u202e", "buy", "sell", "open", "filled", "canceled", "message",
    "/contractMarket/level3v2:" + SYM, "/contractMarket/level3v2:", SYM,
]
#: Stands for JSON nested deeper than the recursion limit (json.dumps cannot write it).
_DEEP: Final = "@@chaos-deep@@"
#: The scalars, containers, a string over the parser's size limit and deep nesting.
EDGE_VALUES: Final[list[Any]] = [*EDGE_SCALARS, [], {}, [1, 2], {"sequence": 1},
                                 [[[[[]]]]], "x" * 70_000, _DEEP]


def _dumps(value: Any) -> str:
    """``json.dumps`` (NaN and Infinity as bare literals) with :data:`_DEEP` expanded."""
    text = json.dumps(value, allow_nan=True)
    deep = "[" * corpus.DEEP_NESTING + "]" * corpus.DEEP_NESTING
    return text.replace(json.dumps(_DEEP), deep)


def _must_not_raise_unexpectedly(raw: bytes | str) -> None:
    """The parser, the router, the session and the synchroniser on one frame."""
    try:
        msg = parse_message(raw)
    except MessageError as exc:
        assert exc.reason
    else:
        assert isinstance(msg, Control | DataMessage)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    classify(raw)
    session = Session("fuzz", 10.0, 10.0)
    session.receive('{"id":"fuzz","type":"welcome"}', 0.0)
    with contextlib.suppress(WsError):
        session.receive(text, 0.0)
    sync = Synchronizer(SYM)
    sync.start()
    sync.on_snapshot({"symbol": SYM, "sequence": 100, "ts": 1, "bids": [], "asks": []})
    sync.on_entry("1-1", {b"msg": raw if isinstance(raw, bytes) else raw.encode("utf-8",
                                                                              "surrogatepass")})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.sampled_from(EDGE_SCALARS),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)

_DATA_KEYS: Final = ["symbol", "sequence", "ts", "side", "price", "size", "orderId",
                     "orderTime", "clientOid", "makerOrderId", "takerOrderId", "tradeId",
                     "remainSize", "reason"]


@st.composite
def envelopes(draw: st.DrawFn) -> str:
    """Objects shaped like level3v2 envelopes, with any values in any of their fields."""
    plausible = st.sampled_from(["message", "welcome", "ack", "pong", "ping", "error", "x"])
    subject = st.sampled_from(["received", "open", "update", "match", "done", "OPEN", "x"])
    topic = st.sampled_from([f"/contractMarket/level3v2:{SYM}", "/contractMarket/level3v2:",
                             f"/contractMarket/level3v2:{SYM},ETHUSDTM", "x"])
    data = draw(st.dictionaries(st.sampled_from(_DATA_KEYS), json_values | st.sampled_from(
        EDGE_VALUES), max_size=len(_DATA_KEYS)))
    env: dict[str, Any] = {"type": draw(plausible | json_values), "data": data}
    if draw(st.booleans()):
        env["topic"] = draw(topic | json_values)
    if draw(st.booleans()):
        env["subject"] = draw(subject | json_values)
    if draw(st.booleans()):
        env["code"] = draw(json_values)
    if draw(st.booleans()):
        env["id"] = draw(json_values)
    return _dumps(env)


# --------------------------------------------------------------------------- the parser


@_settings
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(raw: bytes) -> None:
    _must_not_raise_unexpectedly(raw)


@_settings
@given(st.text(max_size=500))
def test_arbitrary_text(raw: str) -> None:
    _must_not_raise_unexpectedly(raw)


@_settings
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    _must_not_raise_unexpectedly(_dumps(value))


@_settings
@given(envelopes())
def test_envelope_shaped_json(raw: str) -> None:
    _must_not_raise_unexpectedly(raw)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A valid message with a few fields deleted, retyped or set to an edge value."""
    msg = json.loads(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        target = msg if draw(st.integers(0, 3)) == 0 or not isinstance(
            msg.get("data"), dict) else msg["data"]
        if not target:
            break
        key = draw(st.sampled_from(sorted(target)))
        action = draw(st.sampled_from(["delete", "edge", "json", "stringify", "nest"]))
        if action == "delete":
            del target[key]
        elif action == "edge":
            target[key] = draw(st.sampled_from(EDGE_VALUES))
        elif action == "json":
            target[key] = draw(json_values)
        elif action == "stringify":
            target[key] = json.dumps(target[key])
        else:
            target[key] = [target[key]]
    text = _dumps(msg)
    if draw(st.integers(0, 9)) == 0:  # truncated, or with garbage after it
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] if draw(st.booleans()) else text + text[cut:]
    return text


@_settings
@given(mutated())
def test_mutated_valid_messages(raw: str) -> None:
    _must_not_raise_unexpectedly(raw)
    _must_not_raise_unexpectedly(raw.encode())


@pytest.mark.parametrize("frame", [*corpus.malformed(SYM, 101), corpus.oversized(SYM, 101)],
                         ids=lambda f: f.name)
def test_every_corpus_frame_is_refused(frame: corpus.Frame) -> None:
    expect = (contextlib.nullcontext() if frame.name in _NOT_PARSER_ERRORS
              else pytest.raises(MessageError))
    with expect:
        parse_message(frame.raw)
    _must_not_raise_unexpectedly(frame.raw)


#: Frames the parser accepts as such (control envelopes, another symbol's message):
#: the synchroniser refuses them (test_bad_input checks that).
_NOT_PARSER_ERRORS: Final = frozenset({
    "welcome_in_stream", "ack_in_stream", "pong_in_stream", "server_ping", "error_envelope",
    "error_code_superscript_digit", "topic_of_another_symbol"})


@_settings
@given(st.dictionaries(st.sampled_from(["symbol", "sequence", "ts", "bids", "asks"]),
                       json_values | st.sampled_from(EDGE_VALUES), max_size=5),
       st.lists(st.lists(json_values | st.sampled_from(EDGE_VALUES), max_size=6), max_size=4))
def test_snapshots_only_raise_message_error(data: dict[str, Any], rows: list[Any]) -> None:
    if rows:
        data.setdefault("bids", rows)
    for form in (data, _dumps(data)):
        with contextlib.suppress(MessageError):
            parse_snapshot(form)
        with contextlib.suppress(MessageError, IntegrityError):
            OrderBook.from_snapshot(form)


# --------------------------------------------------------------------------- the book


class _Truth:
    """The true book, advanced along the clean stream on demand."""

    def __init__(self, snapshot: dict[str, Any], messages: list[DataMessage]) -> None:
        self.book = OrderBook.from_snapshot(snapshot)
        self._messages = messages
        self._next = 0

    def at(self, sequence: int) -> OrderBook:
        while self.book.sequence < sequence:
            self.book.apply(self._messages[self._next])
            self._next += 1
        assert self.book.sequence == sequence
        return self.book


def _data_messages(texts: list[str]) -> list[DataMessage]:
    out: list[DataMessage] = []
    for text in texts:
        msg = parse_message(text)
        assert not isinstance(msg, Control)
        out.append(msg)
    return out


def _same(book: OrderBook, truth: OrderBook) -> None:
    assert book.sequence == truth.sequence
    assert book.l3() == truth.l3()


@_stream_settings
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(50, 400),
       faults=st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap", "far"]),
                                 st.integers(0, 399)), max_size=8))
def test_book_under_faulty_streams(seed: int, n: int, faults: list[tuple[str, int]]) -> None:
    gen = StreamGenerator(SYM, seed=seed, start_sequence=1_000, target_orders=60, levels=20)
    gen.take(300)
    gen.flush()
    snapshot = gen.snapshot()
    messages = _data_messages(gen.take(n))
    stream = list(messages)
    for kind, at in faults:
        if not stream:
            break
        i = at % len(stream)
        if kind == "drop":
            del stream[i]
        elif kind == "dup":
            stream.insert(i, stream[i])
        elif kind == "swap" and i + 1 < len(stream):
            stream[i], stream[i + 1] = stream[i + 1], stream[i]
        elif kind == "far":  # an old message comes back much later
            stream.append(stream[i])
    truth = _Truth(snapshot, messages)
    book = OrderBook.from_snapshot(snapshot)
    errors = 0
    for msg in stream:
        before = book.sequence
        try:
            applied = book.apply(msg)
        except (SequenceGap, IntegrityError, MessageError) as exc:
            errors += 1
            if isinstance(exc, SequenceGap):
                assert exc.expected == before + 1 and exc.got > before + 1
            # Up to the error the book was right; rebuild it from the truth at this message.
            _same(book, truth.at(before))
            book = OrderBook.from_snapshot(truth.at(msg.sequence).to_snapshot())
            continue
        book.check()
        assert applied == (msg.sequence == before + 1)
        assert book.sequence == max(before, msg.sequence)
    _same(book, truth.at(book.sequence))
    if not faults:
        assert errors == 0 and book.sequence == messages[-1].sequence


#: The clean stream of the noise test lies in [_CLEAN_FROM, _CLEAN_TO].
_CLEAN_FROM, _CLEAN_TO = 1_000, 2_000


def _far(text: str) -> int | None:
    """The sequence of a data message of SYM implausibly far from the clean stream."""
    with contextlib.suppress(MessageError):
        msg = parse_message(text)
        if not isinstance(msg, Control) and msg.symbol == SYM and not (
                _CLEAN_FROM - MAX_SEQUENCE_JUMP <= msg.sequence <= _CLEAN_TO + MAX_SEQUENCE_JUMP):
            return msg.sequence
    return None


def _harmless(text: str) -> bool:
    """Whether the synchroniser must refuse ``text`` (so it cannot change the book).

    A valid message of SYM counts when its sequence is implausibly far from the
    stream's (the captured 2022 messages are): one alone is refused, never followed.
    """
    try:
        msg = parse_message(text)
    except MessageError:
        return True
    return isinstance(msg, Control) or msg.symbol != SYM or _far(text) is not None


@_stream_settings
@given(seed=st.integers(0, 2**32 - 1),
       noise=st.lists(st.tuples(st.integers(0, 299), envelopes() | mutated()
                                | st.sampled_from(VALID)), max_size=10))
def test_synchroniser_with_noise_in_the_stream(seed: int, noise: list[tuple[int, str]]) -> None:
    """Clean messages with hostile frames between them: the synchroniser never raises,
    dead-letters exactly the frames it must refuse, and refused frames never change the
    book: with only those as noise it ends synced and right."""
    # Two far messages close to each other corroborate: the stream moved (a rebase, and
    # then every clean message is far); that case has its own tests (tests/unit/test_sync.py).
    far = sorted(f for _, text in noise if (f := _far(text)) is not None)
    assume(all(b == a or b - a > CORROBORATION_WINDOW for a, b in itertools.pairwise(far)))
    gen = StreamGenerator(SYM, seed=seed, start_sequence=_CLEAN_FROM, target_orders=60,
                          levels=20)
    gen.take(200)
    gen.flush()
    snapshot = gen.snapshot()
    texts = gen.take(300)
    entries = [(text, False) for text in texts]
    for at, text in sorted(noise, key=lambda item: item[0], reverse=True):
        entries.insert(at, (text, _harmless(text)))
    sync = Synchronizer(SYM)
    sync.start()
    sync.on_snapshot(snapshot)
    for i, (text, refused) in enumerate(entries):
        outs = sync.on_entry(f"1-{i}", {"msg": text})
        assert any(isinstance(o, DeadLetter) for o in outs) == refused, text[:200]
        if sync.synced:
            assert sync.book is not None
            sync.book.check()
    if all(_harmless(text) for _, text in noise):
        assert sync.synced and sync.book is not None
        truth = _Truth(snapshot, _data_messages(texts))
        _same(sync.book, truth.at(sync.book.sequence))
        assert sync.book.sequence == json.loads(texts[-1])["data"]["sequence"]


def _expanded(outs: list[Output]) -> list[object]:
    """Outputs with each ``Applied`` run spelled out message by message."""
    flat: list[object] = []
    for o in outs:
        if isinstance(o, Applied):
            flat += [("applied", o.sequence - o.count + k + 1) for k in range(o.count)]
        else:
            flat.append(o)
    return flat


_CONTROLS: Final = [{"ctl": "connected", "connectId": "c2"},
                    {"ctl": "disconnected", "reason": "test"},
                    {"ctl": "gap", "first": "1100", "last": "1105"}]


@_stream_settings
@given(seed=st.integers(0, 2**32 - 1),
       noise=st.lists(st.tuples(st.integers(0, 299), envelopes() | mutated()
                                | st.sampled_from(VALID) | st.integers(0, 299)
                                | st.sampled_from(range(len(_CONTROLS))).map(lambda i: (i,))),
                      max_size=12),
       cuts=st.lists(st.integers(1, 320), max_size=8), as_bytes=st.booleans())
def test_entries_in_batches_are_entries_one_by_one(
        seed: int, noise: list[tuple[int, str | int | tuple[int]]], cuts: list[int],
        as_bytes: bool) -> None:
    """``on_entries`` (the book's batch path) over any batches says and does what
    ``on_entry`` says and does for each entry: same outputs (an ``Applied`` run
    counted message by message), same book, statistics, ids and ``ts`` collected."""
    gen = StreamGenerator(SYM, seed=seed, start_sequence=1_000, target_orders=60, levels=20)
    gen.take(200)
    gen.flush()
    snapshot = gen.snapshot()
    texts = gen.take(300)
    fields: list[dict[Any, Any]] = [{"msg": t} for t in texts]
    for at, item in sorted(noise, key=lambda n: n[0], reverse=True):
        if isinstance(item, int):
            fields.insert(at, {"msg": texts[item]})  # a replay, ahead of or behind its place
        elif isinstance(item, tuple):
            fields.insert(at, dict(_CONTROLS[item[0]]))
        else:
            fields.insert(at, {"msg": item})
    if as_bytes:
        fields = [{k.encode(): v.encode() for k, v in f.items()} for f in fields]
    entries = [(f"1-{i}".encode() if as_bytes else f"1-{i}", f) for i, f in enumerate(fields)]

    def synchroniser() -> Synchronizer:
        sync = Synchronizer(SYM, collect_ts=True)
        sync.start()
        sync.on_snapshot(snapshot)
        return sync

    one, many = synchroniser(), synchroniser()
    want: list[Output] = []
    for stream_id, f in entries:
        want += one.on_entry(stream_id.decode() if isinstance(stream_id, bytes) else stream_id, f)
    got: list[Output] = []
    bounds = sorted({0, len(entries), *(c for c in cuts if c < len(entries))})
    for lo, hi in itertools.pairwise(bounds):
        got += many.on_entries(entries[lo:hi])
    assert _expanded(got) == _expanded(want)
    assert many.stats == one.stats
    assert (many.state, many.stale_reason, many.max_sequence) == \
        (one.state, one.stale_reason, one.max_sequence)
    assert (many.last_stream_id, many.last_applied_id) == (one.last_stream_id, one.last_applied_id)
    assert many.applied_ts == one.applied_ts
    if one.book is not None and many.book is not None:
        assert many.book.to_state() == one.book.to_state()


# --------------------------------------------------------------------------- atheris


def test_atheris_script_runs(tmp_path: Path) -> None:
    """The coverage-guided fuzzer script still runs (a short smoke run)."""
    pytest.importorskip("atheris")
    script = Path(__file__).with_name("fuzz_parser_atheris.py")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i, frame in enumerate(corpus.malformed(SYM, 101)[:40]):
        (seeds / str(i)).write_bytes(frame.data)
    done = subprocess.run([sys.executable, str(script), f"-runs={ATHERIS_SMOKE_RUNS}",
                           str(seeds)], capture_output=True, text=True, timeout=120,
                          check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]



# --------------------------------------------------------------------------- batches


def _outcome(book: OrderBook, frame: str) -> str:
    """What ``apply(parse_message(frame))`` does: applied, stale, or the error's class."""
    try:
        return "applied" if book.apply(parse_message(frame)) else "stale"
    except (MessageError, SequenceGap, IntegrityError) as exc:
        return type(exc).__name__


@_stream_settings
@given(seed=st.integers(0, 2**32 - 1),
       noise=st.lists(st.tuples(st.integers(0, 299), envelopes() | mutated()
                                | st.sampled_from(VALID) | st.integers(0, 299)), max_size=12),
       cuts=st.lists(st.integers(1, 320), max_size=6))
def test_apply_many_is_apply_of_each_frame(seed: int, noise: list[tuple[int, str | int]],
                                           cuts: list[int]) -> None:
    """``apply_many`` over any frames (hostile ones, replays of the stream's own frames
    ahead of or behind their place), cut into any batches, ends where ``apply`` frame by
    frame ends, and stops exactly at each frame that ``apply`` refuses."""
    gen = StreamGenerator(SYM, seed=seed, start_sequence=1_000, target_orders=60, levels=20)
    gen.take(200)
    gen.flush()
    snapshot = gen.snapshot()
    texts = gen.take(300)
    frames = list(texts)
    for at, item in sorted(noise, key=lambda n: n[0], reverse=True):
        frames.insert(at, texts[item] if isinstance(item, int) else item)
    one = OrderBook.from_snapshot(snapshot)
    expected = [_outcome(one, f) for f in frames]

    many = OrderBook.from_snapshot(snapshot)
    got: list[str] = []
    bounds = sorted({0, len(frames), *(c for c in cuts if c < len(frames))})
    for lo, hi in itertools.pairwise(bounds):
        i = lo
        while i < hi:
            before = many.stats.stale
            taken = many.apply_many(frames[i:hi])
            # Each frame taken is one apply takes; which were stale is not reported,
            # their number is.
            took = expected[i:i + taken]
            assert set(took) <= {"applied", "stale"}, took
            assert took.count("stale") == many.stats.stale - before
            got += took
            i += taken
            if i < hi:
                outcome = _outcome(many, frames[i])
                assert outcome not in ("applied", "stale"), (
                    f"apply_many stopped at a frame that apply takes: {frames[i][:200]}")
                got.append(outcome)
                i += 1
    assert got == expected
    assert many.to_state() == one.to_state()
    many.check()
