"""The snapshot scheduler's decisions: one queue for every symbol, one budget (pure, no I/O).

The venue allows few L3 snapshots (the real one: 1 a minute per IP, for all
symbols together), and each gap a consumer cannot repair otherwise costs one.
:class:`SnapshotQueue` decides which symbol is fetched next and when:

* one pending request per symbol: requests are **coalesced** (the largest
  minimum sequence asked is kept, and the time of the first request);
* the **longest-waiting** symbol goes first; one served without success (its
  snapshot was older than asked) goes to the back;
* the budget is a :class:`TokenBucket`. A token is dated from the *reply*
  (:meth:`TokenBucket.settle`): the venue counts a request from its arrival,
  which the feed only knows to be before the reply, so counting from the send
  would ask early and draw a 429;
* a ``429`` is not a spent token: it is refunded, and the next fetch waits for
  the venue's own ``Retry-After`` (:meth:`SnapshotQueue.rate_limited`), not a
  whole budget period;
* :meth:`SnapshotQueue.due` estimates when each queued symbol will be served
  (its place in the queue times the budget period after the next token), for
  ``/metrics`` and for the book's 503 ``detail``.

Time comes in as ``now`` (monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_ATTEMPTS", "Request", "SnapshotQueue", "TokenBucket"]

#: Fetches for one request whose snapshots stay below its minimum sequence.
MAX_ATTEMPTS: Final = 3


class TokenBucket:
    """``per_min`` tokens a minute, at most ``burst`` saved up (pure: time is an argument).

    ``per_min == 0`` means unlimited. Starts full.
    """

    def __init__(self, per_min: float, now: float, burst: float | None = None) -> None:
        if per_min < 0:
            raise ValueError("per_min must be >= 0")
        self.per_min = per_min
        self.capacity = burst if burst is not None else max(1.0, per_min)
        self._tokens = self.capacity
        self._at = now

    @property
    def unlimited(self) -> bool:
        return self.per_min == 0

    @property
    def period(self) -> float:
        """Seconds per token (0 when unlimited)."""
        return 0.0 if self.unlimited else 60.0 / self.per_min

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.capacity,
                               self._tokens + (now - self._at) * self.per_min / 60.0)
        self._at = max(self._at, now)

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0 when one is)."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) * 60.0 / self.per_min

    def take(self, now: float) -> float:
        """Take a token: ``0.0`` when taken, else the seconds until one is available."""
        wait = self.wait(now)
        if wait == 0.0 and not self.unlimited:
            self._tokens -= 1.0
        return wait

    def settle(self, now: float) -> None:
        """The request that took the last token got its reply at ``now``: date the token then.

        Nothing refills for the time the request was in flight.
        """
        if not self.unlimited:
            self._at = max(self._at, now)

    def refund(self, now: float) -> None:
        """Give back the last token: the venue did not serve the request (429)."""
        if not self.unlimited:
            self._refill(now)
            self._tokens = min(self.capacity, self._tokens + 1.0)

    def empty(self, now: float) -> None:
        """Spend every saved token."""
        self._refill(now)
        self._tokens = 0.0


@dataclass(slots=True)
class Request:
    """A symbol's pending request: what it needs, why, since when, fetches so far."""

    symbol: str
    min_sequence: int
    reason: str
    since: float
    attempts: int = 0


class SnapshotQueue:
    """Pending snapshot requests of every symbol and the shared budget (module doc)."""

    def __init__(self, per_min: float, now: float, burst: float | None = None) -> None:
        self.bucket = TokenBucket(per_min, now, burst)
        self._requests: dict[str, Request] = {}
        #: No fetch before this time (the venue's ``Retry-After``, or a backoff).
        self.not_before = now

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._requests

    @property
    def requests(self) -> list[Request]:
        """Pending requests, the next to be served first."""
        return sorted(self._requests.values(), key=lambda r: r.since)

    def get(self, symbol: str) -> Request | None:
        return self._requests.get(symbol)

    def request(self, symbol: str, min_sequence: int, reason: str, now: float) -> Request:
        """Queue (or coalesce) a request for ``symbol``: the returned one is pending."""
        pending = self._requests.get(symbol)
        if pending is None:
            pending = self._requests[symbol] = Request(symbol, min_sequence, reason, now)
        elif min_sequence > pending.min_sequence:
            pending.min_sequence = min_sequence
            pending.reason = reason
            pending.attempts = 0
        return pending

    def drop(self, symbol: str) -> Request | None:
        """Forget ``symbol``'s request (served, or not worth asking again)."""
        return self._requests.pop(symbol, None)

    def requeue(self, symbol: str, now: float) -> None:
        """Served without success: to the back of the queue."""
        pending = self._requests.get(symbol)
        if pending is not None:
            pending.since = now

    def next(self, now: float) -> tuple[Request | None, float]:
        """The request to serve and the seconds to wait first (0: fetch now, token taken).

        ``(None, 0)`` when nothing is pending.
        """
        if not self._requests:
            return None, 0.0
        first = min(self._requests.values(), key=lambda r: r.since)
        if now < self.not_before:
            return first, self.not_before - now
        wait = self.bucket.take(now)
        if wait > 0:
            return first, wait
        first.attempts += 1
        return first, 0.0

    def rate_limited(self, now: float, retry_after: float) -> None:
        """The venue said 429: the token is given back; wait what it asked, no more."""
        self.bucket.refund(now)
        self.not_before = max(self.not_before, now + retry_after)

    def back_off(self, now: float, delay: float) -> None:
        """A failed fetch (not a 429): nothing before ``now + delay``."""
        self.not_before = max(self.not_before, now + delay)

    def due(self, now: float) -> dict[str, float]:
        """Each pending symbol -> estimated seconds until it is fetched."""
        start = max(self.not_before - now, self.bucket.wait(now), 0.0)
        period = self.bucket.period
        return {r.symbol: start + i * period for i, r in enumerate(self.requests)}
