"""Coverage-guided fuzzing of the frame parsers with atheris (libFuzzer), run as a script.

::

    .venv/bin/python tests/chaos/fuzz_parser_atheris.py                  # 60 s
    .venv/bin/python tests/chaos/fuzz_parser_atheris.py -max_total_time=600 CORPUS_DIR
    .venv/bin/python tests/chaos/fuzz_parser_atheris.py -runs=2000       # a smoke run

Each input goes, as bytes and as text, through everything that reads raw
frames: :func:`kumex_l3.parse_message`, :func:`kumex_l3.parse_snapshot`, the
feed's :func:`kumex_l3.wsclient.classify` and its session, and the book's
:class:`kumex_l3.sync.Synchronizer`. Allowed: ``MessageError`` from the
parsers, a ``WsError`` from the session; any other exception is a finding
(libFuzzer stops and writes the input to ``crash-*``). libFuzzer flags pass
through; without ``-max_total_time`` or ``-runs`` the run lasts
:data:`DEFAULT_SECONDS`. Seeds: the chaos corpus and the real 2022 capture,
written to a new temporary directory (its path is printed) when no corpus
directory is given; libFuzzer adds the inputs it finds to that directory.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

with atheris.instrument_imports(include=["kumex_l3"]):
    from kumex_l3.book import OrderBook
    from kumex_l3.errors import IntegrityError, MessageError
    from kumex_l3.messages import parse_message, parse_snapshot
    from kumex_l3.sync import Synchronizer
    from kumex_l3.wsclient import Session, WsError, classify

from tests.chaos import corpus  # noqa: E402  (after the instrumented imports)

#: Default length of a run, in seconds.
DEFAULT_SECONDS = 60
SYM = "XBTUSDM"
_FIXTURE = _ROOT / "tests" / "fixtures" / "real_l3_2022.jsonl"


def one_input(data: bytes) -> None:
    """The fuzz target: one frame, as bytes and as text."""
    text = data.decode("utf-8", "replace")
    for raw in (data, text):
        with contextlib.suppress(MessageError):
            parse_message(raw)
        with contextlib.suppress(MessageError):
            parse_snapshot(raw)
        with contextlib.suppress(MessageError, IntegrityError):
            OrderBook.from_snapshot(raw)
        classify(raw)
    session = Session("fuzz", 10.0, 10.0)
    session.receive('{"id":"fuzz","type":"welcome"}', 0.0)
    with contextlib.suppress(WsError):
        session.receive(text, 0.0)
    sync = Synchronizer(SYM)
    sync.start()
    sync.on_snapshot({"symbol": SYM, "sequence": 100, "ts": 1, "bids": [], "asks": []})
    sync.on_entry("1-1", {b"msg": data})
    sync.on_entry("1-2", {"msg": text})


def _seed_dir() -> str:
    seeds = Path(tempfile.mkdtemp(prefix="kumex-atheris-"))
    frames = [*corpus.malformed(SYM, 101), *corpus.forged_stale(SYM, 100)]
    for i, frame in enumerate(frames):
        if len(frame.data) <= 65_536:
            (seeds / f"corpus-{i:03d}").write_bytes(frame.data)
    for i, line in enumerate(_FIXTURE.read_bytes().splitlines()):
        (seeds / f"real-{i}").write_bytes(line)
    print(f"seed corpus: {seeds}", file=sys.stderr)
    return str(seeds)


def main(argv: list[str]) -> None:
    args = list(argv)
    if not any(a.startswith(("-max_total_time=", "-runs=")) for a in args[1:]):
        args.append(f"-max_total_time={DEFAULT_SECONDS}")
    if not any(not a.startswith("-") for a in args[1:]):
        args.append(_seed_dir())
    args.append("-max_len=70000")
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
