"""``python -m kumex_l3 COMMAND``: the SDK's command-line tools.

Commands:

* ``watch SYMBOL [--url URL] [--depth N] [--l3] [--redis-url URL] [--once]``:
  the book, live in the terminal (see :mod:`kumex_l3.viewer`).
* ``replay CAPTURE [--snapshot FILE] [--symbol SYM] [--every N --samples CSV
  --depth K | --order ID] [--out JSON]``: rebuild a book from a capture, as fast
  as it goes (see :mod:`kumex_l3.replay`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kumex_l3 import replay, viewer

__all__ = ["main"]

_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "watch": (viewer.main, "watch a book of the book service live in the terminal"),
    "replay": (replay.main, "rebuild a book from a capture (FEED_CAPTURE) and a snapshot"),
}


def _usage() -> str:
    lines = ["usage: python -m kumex_l3 COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in _COMMANDS.items()]
    lines += ["", "python -m kumex_l3 COMMAND --help: the command's own options"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a command; the exit status (2 on a usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command = _COMMANDS.get(args[0])
    if command is None:
        print(f"unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return command[0](args[1:])


if __name__ == "__main__":
    sys.exit(main())
