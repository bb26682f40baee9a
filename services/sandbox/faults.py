"""Fault injection of the sandbox exchange: the knobs and the pure WebSocket filter.

:class:`FaultState` holds every knob the ``/sandbox/...`` control API can turn,
plus ``counts`` of the faults actually injected (so a test can name the fault
it injected and check that it happened). It is plain mutable data, shared by
the REST layer, the WebSocket hub and the control API of one process.

:class:`WsFaultFilter` is the pure part of the WebSocket faults: given one
symbol's outgoing messages it returns what is actually sent after ``drop``,
``duplicate`` and ``reorder``, with dice from a seeded :class:`random.Random`
(no clock, no I/O). The hub gives every connection its own filter, with its
own dice: faults are drawn per connection, independently, as the real venue
dropped messages for one slow connection at a time:

* drop: the message is not sent; clients see a sequence gap;
* duplicate: the message is sent twice in a row; clients see one sequence twice;
* reorder: the message is held back and sent right after the next message of
  the same symbol (possibly one of a later publish call); clients see a
  swapped neighbouring pair. A held message waits for that next message;
  :meth:`WsFaultFilter.flush` releases it.

``delay_ms``, ``delay_jitter_ms``, ``disconnect_every_s``,
``disconnect_every_max_s``, ``outage_every_s``/``outage_s`` and ``pong_disabled``
are applied by the hub (they need the clock); the REST knobs by the REST layer.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

__all__ = ["REST_ERROR_STATUSES", "FaultState", "WsFaultFilter"]

#: HTTP statuses the REST error fault can inject.
REST_ERROR_STATUSES: Final = frozenset({429, 500})

_RATES: Final = frozenset({"drop_rate", "duplicate_rate", "reorder_rate"})
_BOOLS: Final = frozenset({"refuse_snapshots", "pong_disabled"})
_NON_NEGATIVE: Final = frozenset(
    {"delay_ms", "delay_jitter_ms", "disconnect_every_s", "disconnect_every_max_s",
     "outage_every_s", "outage_s", "rest_error_until", "rest_latency_ms",
     "snapshot_rate_per_min"}
)

T = TypeVar("T")


@dataclass
class FaultState:
    """Every fault knob of the sandbox, and counts of the faults injected.

    Change knobs through :meth:`update` (validated, all or nothing); read them
    directly. ``counts`` keys in use: ``dropped``, ``duplicated``,
    ``reordered``, ``disconnects``, ``outages``, ``outage_refusals``,
    ``snapshots_refused``, ``snapshots_rate_limited``, ``snapshots_served`` (L3
    snapshots answered), ``rest_errors``, ``slow_clients_dropped``,
    ``ping_timeouts``, ``pongs_withheld``, ``injected`` (raw frames sent by ``POST
    /sandbox/inject``). Message faults are counted per connection (a message
    dropped on two connections counts twice).
    """

    #: Fraction of L3 messages not sent (the client sees a sequence gap), in [0, 1],
    #: drawn per connection.
    drop_rate: float = 0.0
    #: Fraction of L3 messages sent twice, in [0, 1], drawn per connection.
    duplicate_rate: float = 0.0
    #: Fraction of L3 messages swapped with the next one of their symbol, in [0, 1],
    #: drawn per connection.
    reorder_rate: float = 0.0
    #: Delay added before WebSocket delivery of every message, in milliseconds.
    delay_ms: float = 0.0
    #: Up to this much more delay, drawn once per connection (its own path's latency).
    delay_jitter_ms: float = 0.0
    #: Close each WebSocket connection after a lifetime of at least this many seconds,
    #: drawn per connection (0 = never).
    disconnect_every_s: float = 0.0
    #: ...and at most this many (0 = twice ``disconnect_every_s``).
    disconnect_every_max_s: float = 0.0
    #: A venue-wide outage every this many seconds: every connection closed at once (0 =
    #: never).
    outage_every_s: float = 0.0
    #: How long an outage refuses new connections, seconds.
    outage_s: float = 5.0
    #: Refuse L3 snapshot requests.
    refuse_snapshots: bool = False
    #: Do not answer WebSocket pings (the client's pong timeout must notice a dead link).
    pong_disabled: bool = False
    #: HTTP status (429 or 500) every REST call gets until ``rest_error_until``; None = off.
    rest_error_status: int | None = None
    #: ``time.monotonic()`` until which ``rest_error_status`` applies.
    rest_error_until: float = 0.0
    #: Latency added to every REST reply, in milliseconds.
    rest_latency_ms: float = 30.0
    #: L3 snapshots allowed a minute (the real venue allowed 1 per IP).
    snapshot_rate_per_min: float = 1.0
    #: Faults injected so far, by kind.
    counts: Counter[str] = field(default_factory=Counter)

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """Names :meth:`update` accepts (every field but ``counts``)."""
        return tuple(f.name for f in fields(cls) if f.name != "counts")

    def to_dict(self) -> dict[str, Any]:
        """Knobs and counts as JSON-able data: ``{knob: value, ..., "counts": {kind: n}}``."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self.knob_names()}
        out["counts"] = dict(self.counts)
        return out

    def update(self, **changes: Any) -> None:
        """Set knobs; raise ``ValueError`` naming the first bad one (nothing is changed then).

        Rates must be in [0, 1], other numbers finite and non-negative,
        ``rest_error_status`` 429, 500 or None, ``refuse_snapshots`` and
        ``pong_disabled`` bools.
        """
        known = self.knob_names()
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(
                    f"unknown fault knob {name!r}; known knobs: {', '.join(known)}"
                )
            checked[name] = _check(name, value)
        for name, value in checked.items():
            setattr(self, name, value)

    def rest_error_active(self, now: float) -> int | None:
        """The REST error status to inject at monotonic time ``now``, or None."""
        if self.rest_error_status is not None and now < self.rest_error_until:
            return self.rest_error_status
        return None


def _check(name: str, value: Any) -> Any:
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    if name == "rest_error_status":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) \
                or value not in REST_ERROR_STATUSES:
            raise ValueError(f"rest_error_status must be 429, 500 or null, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, not {value!r}")
    if name in _RATES:
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], not {value!r}")
    elif name in _NON_NEGATIVE and number < 0.0:
        raise ValueError(f"{name} must be >= 0, not {value!r}")
    return number


class WsFaultFilter:
    """Applies drop, duplicate and reorder to each symbol's outgoing messages (pure).

    The dice come from ``random.Random(seed)``, so a run is reproducible for a
    given seed and message order. Rates are read from ``faults`` at every call
    (the control API may change them at any time); each injection is counted
    in ``faults.counts``. Messages are opaque (dicts or serialised text).
    """

    def __init__(self, faults: FaultState, *, seed: int = 0) -> None:
        self.faults = faults
        self._rng = random.Random(seed)
        self._held: dict[str, Any] = {}

    def filter(self, symbol: str, messages: Sequence[T]) -> list[T]:
        """What to send, in order, for ``messages`` of ``symbol`` (see the module docstring)."""
        faults = self.faults
        drop, dup, reorder = faults.drop_rate, faults.duplicate_rate, faults.reorder_rate
        held: dict[str, T] = self._held
        if not (drop or dup or reorder or symbol in held):
            return list(messages)
        rng = self._rng
        counts = faults.counts
        out: list[T] = []
        for msg in messages:
            if drop and rng.random() < drop:
                counts["dropped"] += 1
                continue
            copies = 1
            if dup and rng.random() < dup:
                counts["duplicated"] += 1
                copies = 2
            if symbol in held:
                # Release the held message after this one: a swapped neighbouring pair.
                out.extend([msg] * copies)
                out.append(held.pop(symbol))
                counts["reordered"] += 1
            elif reorder and copies == 1 and rng.random() < reorder:
                held[symbol] = msg
            else:
                out.extend([msg] * copies)
        return out

    def held(self, symbol: str) -> bool:
        """Whether a message of ``symbol`` is held back, waiting for its swap partner."""
        return symbol in self._held

    def flush(self, symbol: str) -> list[T]:
        """Release a held message of ``symbol`` unswapped (e.g. at the end of a replay)."""
        if symbol in self._held:
            msg: T = self._held.pop(symbol)
            return [msg]
        return []
