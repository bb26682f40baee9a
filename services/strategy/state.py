"""The strategy's own persisted state: one Redis hash per (symbol, clientOid prefix).

Key ``kumex:{SYM}:strategy:{prefix}`` (:func:`strategy_state_key`), fields:

==================  ===================================================================
field               what
==================  ===================================================================
``lastEventId``     the last entry of ``kumex:{SYM}:order-events`` acted upon: a restart
                    reads on from there and never reacts to an event twice
``position``        contracts, + long: the sum of the fills acted upon
``nextSeq``         the next clientOid number (the ``n`` a clientOid is made from)
``salt``            the grid's secret: clientOids are ``{prefix}-{HMAC(salt, n)}``, so
                    that nobody reading the public feed can predict the next one
                    (:mod:`kumex_l3.grid`); drawn at the grid's first start
``centre``          the grid's centre price
``filled:{coid}``   the filled size of an order already acted upon (counter-orders placed)
``plan:{coid}``     ``side price size``: an order decided but maybe not yet registered or
                    sent (a write-ahead entry, removed once the order is registered)
==================  ===================================================================

Everything that follows from one event (the new ``lastEventId``, position,
``nextSeq``, the order's ``filled`` and the counter-orders' ``plan`` entries)
is written by one ``HSET`` (:func:`save_progress`) *before* any order is
registered or sent; after a crash the plans are completed (registered and sent,
or found at the exchange), and events after ``lastEventId`` are replayed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import redis.asyncio as aioredis

from kumex_l3 import keys

__all__ = [
    "PlannedOrder",
    "StoredState",
    "clear_plans",
    "load_state",
    "prune_filled",
    "save_progress",
    "strategy_state_key",
]

_FILLED: Final = "filled:"
_PLAN: Final = "plan:"


def strategy_state_key(symbol: str, prefix: str) -> str:
    """``kumex:{SYM}:strategy:{prefix}``: the grid's persisted state (see the module docstring)."""
    return keys.strategy_state(symbol, prefix)


@dataclass(frozen=True, slots=True)
class PlannedOrder:
    """An order decided and not yet known to be registered."""

    side: str
    price: Decimal
    size: int

    def encode(self) -> str:
        """``side price size``."""
        return f"{self.side} {self.price:f} {self.size}"

    @classmethod
    def decode(cls, text: str) -> PlannedOrder:
        """The inverse of :meth:`encode`; ``ValueError`` on anything else."""
        side, price, size = text.split(" ")
        if side not in ("buy", "sell"):
            raise ValueError(f"bad side {side!r}")
        return cls(side, Decimal(price), int(size))


@dataclass(slots=True)
class StoredState:
    """What :func:`load_state` read; ``exists`` False for a strategy's first start."""

    exists: bool = False
    last_event_id: str = "0-0"
    position: int = 0
    next_seq: int = 1
    salt: str = ""
    centre: Decimal | None = None
    filled: dict[str, int] = field(default_factory=dict)
    plans: dict[str, PlannedOrder] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


async def load_state(redis: aioredis.Redis, key: str) -> StoredState:
    """The stored state (defaults when there is none). ``ValueError`` on a corrupt field."""
    raw = await redis.hgetall(key)
    data = {_text(k): _text(v) for k, v in raw.items()}
    state = StoredState(exists=bool(data))
    try:
        state.last_event_id = data.get("lastEventId") or "0-0"
        state.position = int(data.get("position") or 0)
        state.next_seq = int(data.get("nextSeq") or 1)
        state.salt = data.get("salt") or ""
        centre = data.get("centre")
        state.centre = Decimal(centre) if centre else None
        for name, value in data.items():
            if name.startswith(_FILLED):
                state.filled[name[len(_FILLED):]] = int(value)
            elif name.startswith(_PLAN):
                state.plans[name[len(_PLAN):]] = PlannedOrder.decode(value)
    except (ValueError, ArithmeticError) as exc:
        raise ValueError(f"{key}: corrupt strategy state: {exc}") from exc
    return state


async def save_progress(
    redis: aioredis.Redis,
    key: str,
    *,
    last_event_id: str | None = None,
    position: int | None = None,
    next_seq: int | None = None,
    salt: str | None = None,
    centre: Decimal | None = None,
    filled: Mapping[str, int] | None = None,
    plans: Mapping[str, PlannedOrder] | None = None,
) -> None:
    """Write the given fields in one ``HSET`` (atomic: all or nothing)."""
    mapping: dict[Any, str] = {}
    if last_event_id is not None:
        mapping["lastEventId"] = last_event_id
    if position is not None:
        mapping["position"] = str(position)
    if next_seq is not None:
        mapping["nextSeq"] = str(next_seq)
    if salt is not None:
        mapping["salt"] = salt
    if centre is not None:
        mapping["centre"] = f"{centre:f}"
    for coid, size in (filled or {}).items():
        mapping[_FILLED + coid] = str(size)
    for coid, plan in (plans or {}).items():
        mapping[_PLAN + coid] = plan.encode()
    if mapping:
        await redis.hset(key, mapping=mapping)  # one command: atomic


async def clear_plans(redis: aioredis.Redis, key: str, client_oids: Iterable[str]) -> None:
    """Remove the write-ahead entries of orders now registered."""
    names = [_PLAN + coid for coid in client_oids]
    if names:
        await redis.hdel(key, *names)


async def prune_filled(redis: aioredis.Redis, key: str, client_oids: Iterable[str]) -> None:
    """Forget the ``filled`` entries of orders whose hash is gone (expired)."""
    names = [_FILLED + coid for coid in client_oids]
    if names:
        await redis.hdel(key, *names)
