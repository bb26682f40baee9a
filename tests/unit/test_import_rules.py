"""The walls of the house, read from the imports (run by ``make lint`` too).

* The pure core of ``kumex_l3`` imports no I/O library (no asyncio, Redis, HTTP,
  WebSocket, web framework, terminal or process library) and no other part of
  ``kumex_l3`` than the core.
* ``kumex_l3`` imports no service, and no test, benchmark or chaos tool; only the
  development tools (``kumex_l3.testing``) import one another.
* A service imports no other service, no test, benchmark or chaos tool, and no
  development tool (``services/demo.py``, the demo runner, may).
* Only the viewer and the replay import ``rich`` (an optional extra): no service
  needs it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The pure core: plain Python, no I/O (see kumex_l3/__init__.py).
CORE = frozenset({"access", "backoff", "book", "errors", "grid", "keys", "messages", "orders",
                  "sequence", "signing", "sync"})
#: The development tools' package.
TESTING = "kumex_l3.testing"
#: Libraries that do I/O (or run it): never imported by the core.
IO = frozenset({"asyncio", "redis", "httpx", "websockets", "fastapi", "starlette", "uvicorn",
                "uvloop", "socket", "subprocess", "rich", "prometheus_client",
                "pydantic_settings", "selectors", "threading", "multiprocessing"})
#: The only modules that may import ``rich`` (an optional extra, for people).
RICH_USERS = frozenset({"viewer", "replay"})
#: Folders of development tools: nothing shipped imports them.
TOOLS = frozenset({"tests", "bench", "chaos", "scripts"})


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every absolute import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import")
            if node.module:
                yield node.lineno, node.module


def broken_walls(root: Path = ROOT) -> list[str]:
    """Every import of the tree at ``root`` that crosses a wall, as ``path:line: why``."""
    def _where(path: Path, line: int) -> str:
        return f"{path.relative_to(root)}:{line}"

    broken: list[str] = []
    for path in sorted((root / "kumex_l3").rglob("*.py")):
        core = path.parent.name == "kumex_l3" and path.stem in CORE
        tool = path.parent.name == "testing"
        for line, module in _imports(path):
            top, _, rest = module.partition(".")
            if top in TOOLS or top == "services":
                broken.append(f"{_where(path, line)}: the SDK imports {module}")
            if not tool and (module == TESTING or module.startswith(TESTING + ".")):
                broken.append(f"{_where(path, line)}: the SDK imports {module}")
            if top == "rich" and path.stem not in RICH_USERS:
                broken.append(f"{_where(path, line)}: {path.stem} needs rich ({module})")
            if core and top in IO:
                broken.append(f"{_where(path, line)}: the pure core imports {module}")
            if core and top == "kumex_l3" and rest.split(".")[0] not in CORE:
                broken.append(f"{_where(path, line)}: the pure core imports {module}")
    for path in sorted((root / "services").rglob("*.py")):
        parts = path.relative_to(root / "services").parts
        own = parts[0] if len(parts) > 1 else None  # services/demo.py runs them all
        for line, module in _imports(path):
            top, _, rest = module.partition(".")
            if top in TOOLS or top == "rich" or (own is not None and module.startswith(TESTING)):
                broken.append(f"{_where(path, line)}: a service imports {module}")
            other = rest.split(".")[0]
            if top == "services" and own is not None and other != own:
                broken.append(f"{_where(path, line)}: service {own} imports service {other}")
    return broken


def test_the_walls_hold() -> None:
    assert broken_walls() == []


@pytest.mark.parametrize(("folder", "name", "text", "why"), [
    ("kumex_l3", "book.py", "import redis\n", "the pure core imports redis"),
    ("kumex_l3", "grid.py", "from kumex_l3.rest import ApiError\n",
     "the pure core imports kumex_l3.rest"),
    ("kumex_l3", "rest.py", "from kumex_l3.testing.procs import eventually\n",
     "the SDK imports kumex_l3.testing.procs"),
    ("services/book", "app.py", "from services.feed.writer import ROLE\n",
     "service book imports service feed"),
    ("services/feed", "feed.py", "import chaos.stack\n", "a service imports chaos.stack"),
    ("services/feed", "feed.py", "from kumex_l3.testing.procs import eventually\n",
     "a service imports kumex_l3.testing.procs"),
    ("kumex_l3", "lease.py", "from kumex_l3.testing.devredis import free_port\n",
     "the SDK imports kumex_l3.testing.devredis"),
    ("kumex_l3", "rest.py", "import rich\n", "rest needs rich"),
    ("services/book", "app.py", "from rich.text import Text\n", "a service imports rich.text"),
])
def test_each_wall_is_seen(tmp_path: Path, folder: str, name: str, text: str,
                           why: str) -> None:
    """The rule fails on a tree where one wall is broken (the tree's layout, one file)."""
    for part in ("kumex_l3", "services/book", "services/feed"):
        (tmp_path / part).mkdir(parents=True, exist_ok=True)
    (tmp_path / folder / name).write_text(text)
    found = broken_walls(tmp_path)
    assert len(found) == 1 and why in found[0], found
