"""``python -m kumex_l3 COMMAND``: the SDK's command-line tools.

Commands:

* ``watch SYMBOL [--url URL] [--depth N] [--l3] [--redis-url URL] [--once]``:
  the book, live in the terminal (see :mod:`kumex_l3.viewer`).
* ``replay CAPTURE [--snapshot FILE] [--symbol SYM] [--every N --samples CSV
  --depth K | --order ID] [--out JSON]``: rebuild a book from a capture, as fast
  as it goes (see :mod:`kumex_l3.replay`).

The viewer needs ``rich`` (``pip install 'kumex-l3[tools]'``), which no service
needs; the replay shows a progress bar with it and goes without it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "watch"]

#: command -> (module, what it does); a module is imported when its command runs.
_COMMANDS: dict[str, tuple[str, str]] = {
    "watch": ("kumex_l3.viewer", "watch a book of the book service live in the terminal"),
    "replay": ("kumex_l3.replay",
               "rebuild a book from a capture (FEED_CAPTURE) and a snapshot"),
}


def _run(command: str, argv: Sequence[str]) -> int:
    try:
        module = importlib.import_module(_COMMANDS[command][0])
    except ModuleNotFoundError as exc:
        if exc.name != "rich":
            raise
        print(f"{command} needs the 'rich' package: pip install 'kumex-l3[tools]'",
              file=sys.stderr)
        return 2
    status: int = module.main(argv)
    return status


def watch() -> int:
    """The ``kumex-watch`` script: ``python -m kumex_l3 watch``."""
    return _run("watch", sys.argv[1:])


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
    if args[0] not in _COMMANDS:
        print(f"unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _run(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
