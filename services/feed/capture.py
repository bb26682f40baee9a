"""``FEED_CAPTURE``: every raw data frame appended to a file, one a line.

The format is what the sandbox replays (``services/sandbox/replay.py``): UTF-8
text, one frame a line, gzip-compressed when the name ends with ``.gz``. The
file is opened for appending (a restarted feed adds a gzip member, which
gzip readers read through). A frame never holds a raw line break inside a
JSON string (JSON escapes them), so one that holds one between tokens has it
replaced by a space: the same JSON, one line.

A failing write (disk full...) is logged and counted once, and stops the
capture: the feed itself goes on.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
from pathlib import Path
from typing import IO

from kumex_l3.logs import kv
from services.feed.metrics import FeedMetrics

__all__ = ["Capture"]

_log = logging.getLogger(__name__)
_BUFFER = 1 << 16


class Capture:
    """Appends frames to ``path`` (see the module docstring)."""

    def __init__(self, path: Path, metrics: FeedMetrics | None = None) -> None:
        self.path = path
        self._metrics = metrics
        self.lines = 0
        self._file: IO[str] | None = self._open(path)

    @staticmethod
    def _open(path: Path) -> IO[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "ab"), encoding="utf-8", newline="\n")
        return path.open("a", encoding="utf-8", newline="\n", buffering=_BUFFER)

    @property
    def active(self) -> bool:
        return self._file is not None

    def write(self, text: str) -> None:
        """Append one frame as a line."""
        file = self._file
        if file is None:
            return
        if "\n" in text or "\r" in text:
            text = text.replace("\r", " ").replace("\n", " ")
        try:
            file.write(text + "\n")
        except (OSError, ValueError) as exc:
            self._fail(exc)
            return
        self.lines += 1

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except (OSError, ValueError) as exc:
                self._fail(exc)

    def close(self) -> None:
        """Flush and close (idempotent)."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                _log.error("capture file could not be closed", extra=kv(
                    path=str(self.path), error=str(exc)))

    def _fail(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.capture_errors.inc()
        _log.error("capture write failed; capture stopped",
                   extra=kv(path=str(self.path), error=f"{type(exc).__name__}: {exc}"))
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError, ValueError):
                file.close()
