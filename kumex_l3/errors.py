"""The one exception tree of kumex_l3.

::

    KumexError
    ├── MessageError        a raw message or snapshot could not be parsed (``reason``)
    └── BookError
        ├── SequenceGap     a message skipped sequences (``expected``, ``got``)
        └── IntegrityError  the message contradicts the book (crossed book,
                            over-fill, remainSize disagreement, duplicate order)

Third-party errors (JSON decoding, validation) are translated at the boundary with
``raise MessageError(...) from exc``. A caller that gets a ``MessageError``
refuses the input (dead-letter queue, metric, log) and keeps going; a
``BookError`` means the book is no longer known and must be rebuilt from a
snapshot.
"""

from __future__ import annotations

__all__ = ["BookError", "IntegrityError", "KumexError", "MessageError", "SequenceGap"]


class KumexError(Exception):
    """Base of every error raised by kumex_l3."""


class MessageError(KumexError, ValueError):
    """Input that is not a valid exchange message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BookError(KumexError):
    """The local book can no longer be trusted; resync from a snapshot."""


class SequenceGap(BookError):
    """A message arrived with ``got`` while the book expected ``expected``."""

    def __init__(self, symbol: str, expected: int, got: int) -> None:
        super().__init__(f"{symbol}: sequence gap, expected {expected}, got {got}")
        self.symbol = symbol
        self.expected = expected
        self.got = got


class IntegrityError(BookError):
    """A message that contradicts the book (over-fill, crossed book, ...)."""

    def __init__(self, symbol: str, sequence: int, reason: str) -> None:
        super().__init__(f"{symbol}: integrity error at sequence {sequence}: {reason}")
        self.symbol = symbol
        self.sequence = sequence
        self.reason = reason
