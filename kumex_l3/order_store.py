"""Own orders in Redis (redis.asyncio): the keys DESIGN.md documents, written atomically.

* ``kumex:{SYM}:order:{clientOid}`` hash: :meth:`OwnOrder.to_hash` (plus the
  caller's extra fields);
* ``kumex:{SYM}:orderid:{orderId}`` string -> clientOid, once the orderId is known;
* ``kumex:{SYM}:orders:active`` set: clientOids not yet finished;
* ``kumex:{SYM}:order-events`` stream: one entry per state change, fields
  ``clientOid``, ``orderId``, ``status``, ``filledSize``, ``sequence``,
  ``reason``, ``change`` (and ``prevStatus``, ``remaining``, ``size``,
  ``side``, ``price``, ``corrected``, ``updatedAt``, ``streamId``; for a fill
  ``fillSize``, ``fillPrice``, ``tradeId``, ``liquidity``).

:func:`register` is called by the strategy *before* it sends an order: the
clientOid is the idempotency key (a second registration of the same clientOid
changes nothing and returns False). The order monitor then moves the order
along with :func:`save_change` / :func:`save_many`, each one Lua script per
order: hash, orderId index, active set, events and, once finished, the TTL of
the hash and of the orderId key, all or nothing. Every write checks the hash's
``rev`` (the revision the caller loaded) so that two writers never overwrite
each other: a stale write returns False and the caller reloads.

Scripts keep every key of one symbol in the ``{SYM}`` hash slot (Redis Cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import redis.asyncio as aioredis

from kumex_l3 import keys
from kumex_l3.errors import Fenced
from kumex_l3.messages import OrderChange, Qty, format_qty
from kumex_l3.orders import Change, OwnOrder, Transition, apply_change, confirm, rest_refused
from kumex_l3.redis_adapter import LuaScript

__all__ = [
    "DEFAULT_EVENTS_MAXLEN",
    "DEFAULT_FINISHED_TTL_S",
    "Fence",
    "Fenced",
    "active",
    "apply_order_change",
    "confirm_order_id",
    "event_fields",
    "load",
    "load_many",
    "mark_rejected",
    "register",
    "resolve",
    "save_change",
    "save_changes",
    "save_many",
]

#: Seconds a finished order's hash and orderId key stay readable.
DEFAULT_FINISHED_TTL_S: Final = 86_400
#: Approximate cap of the order-events stream (``XADD MAXLEN ~``).
DEFAULT_EVENTS_MAXLEN: Final = 100_000

# KEYS: hash, active set, the stream head (kumex:{SYM}:l3:last)
# The stream's head at registration is kept (afterSequence): a received at or below
# it happened before we registered the clientOid, so it cannot be ours.
_REGISTER_LUA: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('HSET', KEYS[1], 'afterSequence', redis.call('GET', KEYS[3]) or '0')
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: hash, active set, events stream[, orderId key][, previous orderId key][, lease]
# ARGV: expected rev, clientOid, finished (1/0), ttl s, events maxlen (0: none),
#       hash item count, event count, has orderId key (1/0), has previous (1/0),
#       lease value ('' : not fenced), hash field/values..., then per event: count, items...
# Returns 1 written, 0 stale revision, -1 no such order, -2 the lease is not ours.
_SAVE_LUA: Final = """
local k = 4
local oid_key, old_key, lease_key
if ARGV[8] == '1' then oid_key = KEYS[k]; k = k + 1 end
if ARGV[9] == '1' then old_key = KEYS[k]; k = k + 1 end
if ARGV[10] ~= '' then
  lease_key = KEYS[k]
  if redis.call('GET', lease_key) ~= ARGV[10] then return -2 end
end
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then return -1 end
if rev ~= ARGV[1] then return 0 end
local i = 11
local nh = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], unpack(ARGV, i, i + nh - 1))
i = i + nh
local finished = ARGV[3] == '1'
local ttl = tonumber(ARGV[4])
if old_key then redis.call('DEL', old_key) end
if oid_key then
  if finished then
    redis.call('SET', oid_key, ARGV[2], 'EX', ttl)
  else
    redis.call('SET', oid_key, ARGV[2])
  end
end
if finished then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ttl)
else
  redis.call('SADD', KEYS[2], ARGV[2])
end
for _ = 1, tonumber(ARGV[7]) do
  local n = tonumber(ARGV[i])
  i = i + 1
  if ARGV[5] ~= '0' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, i, i + n - 1))
  else
    redis.call('XADD', KEYS[3], '*', unpack(ARGV, i, i + n - 1))
  end
  i = i + n
end
return 1
"""

_SAVE: Final = LuaScript(_SAVE_LUA)
_REGISTER: Final = LuaScript(_REGISTER_LUA)

#: A transition with the id of the stream entry that caused it (None: not the stream).
Step = tuple[Transition, str | None]
#: ``(lease key, lease value)``: write only while that lease holds that value.
Fence = tuple[str, str]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


async def register(
    redis: aioredis.Redis,
    symbol: str,
    client_oid: str,
    *,
    side: str,
    price: str,
    size: Qty | str,
    now_ms: int,
    extra: Mapping[str, str] | None = None,
) -> bool:
    """Register an order about to be sent: a ``pending`` hash and active-set membership.

    Atomic. Returns False, touching nothing, when an order with this clientOid
    exists already (the clientOid is the idempotency key; a finished order
    stays until its TTL runs out). Raises ``ValueError`` on a bad clientOid
    (1 to 40 of ``[A-Za-z0-9_-]``), side, size, or an ``extra`` field that
    clashes with the order's own.
    """
    order = OwnOrder.new(symbol, client_oid, side=side, price=price, size=size,
                         now_ms=now_ms, extra=extra)
    order.rev = 1
    args = [client_oid]
    for field, value in order.to_hash().items():
        args += (field, value)
    done = await _REGISTER.run(redis, (keys.order(symbol, client_oid),
                                       keys.orders_active(symbol), keys.stream_head(symbol)),
                               args)
    return int(done) == 1


async def load(redis: aioredis.Redis, symbol: str, client_oid: str) -> OwnOrder | None:
    """The order registered as ``client_oid``, or None (never registered, or expired)."""
    data = await redis.hgetall(keys.order(symbol, client_oid))
    return OwnOrder.from_hash(data) if data else None


async def load_many(
    redis: aioredis.Redis, symbol: str, client_oids: Sequence[str]
) -> dict[str, OwnOrder]:
    """The orders among ``client_oids`` that exist, by clientOid (one round trip)."""
    if not client_oids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for coid in client_oids:
        pipe.hgetall(keys.order(symbol, coid))
    results = await pipe.execute()
    return {coid: OwnOrder.from_hash(data)
            for coid, data in zip(client_oids, results, strict=True) if data}


async def active(redis: aioredis.Redis, symbol: str) -> list[str]:
    """ClientOids of the symbol's orders not yet finished, sorted."""
    members = await redis.smembers(keys.orders_active(symbol))
    return sorted(_text(m) for m in members)


async def resolve(redis: aioredis.Redis, symbol: str, order_id: str) -> str | None:
    """The clientOid of the own order with exchange id ``order_id``, or None."""
    value = await redis.get(keys.order_id(symbol, order_id))
    return None if value is None else _text(value)


def event_fields(order: OwnOrder, transition: Transition,
                 stream_id: str | None = None, writer: str | None = None) -> dict[str, str]:
    """The fields of the order-event entry of ``transition``: the order's state right after
    it (``transition.after``; ``order`` as it is now when the transition has none)."""
    order_id, _, filled, remaining, reason, corrected, conflicts = (
        transition.after if transition.after is not None
        else (order.order_id, order.status, order.filled_size, order.remaining, order.reason,
              order.corrected, order.conflicts))
    out = {
        "clientOid": order.client_oid,
        "orderId": order_id or "",
        "status": transition.new_status.value,
        "filledSize": format_qty(filled),
        "sequence": str(transition.sequence or order.last_sequence),
        "reason": reason,
        "change": transition.change.value if transition.change is not None else "",
        "prevStatus": transition.old_status.value,
        "remaining": format_qty(remaining),
        "size": format_qty(order.size),
        "side": order.side,
        "price": order.price,
        "corrected": str(corrected),
        "updatedAt": str(order.updated_at),
    }
    if stream_id is not None:
        out["streamId"] = stream_id
    if writer is not None:
        out["by"] = writer
    if transition.change is Change.CONFLICT:
        out["conflictOrderId"] = transition.other_order_id
        out["conflicts"] = str(conflicts)
    elif transition.change is Change.RELINKED:
        out["previousOrderId"] = transition.other_order_id
    if transition.trade_id:
        out["fillSize"] = format_qty(transition.fill_qty)
        out["fillPrice"] = transition.fill_price
        out["tradeId"] = transition.trade_id
        out["liquidity"] = transition.liquidity
    return out


def _save_call(order: OwnOrder, steps: Sequence[Step], finished_ttl_s: int,
               events_maxlen: int, fence: Fence | None,
               writer: str | None) -> tuple[list[str], list[str]]:
    """Keys and args of the save script; ``order.rev`` must already be the new revision."""
    sym, coid = order.symbol, order.client_oid
    key_list = [keys.order(sym, coid), keys.orders_active(sym), keys.order_events(sym)]
    if order.order_id:
        key_list.append(keys.order_id(sym, order.order_id))
    # Relinked: the orderId it was linked to before is someone else's, not an index of ours.
    previous = next((t.other_order_id for t, _ in steps
                     if t.change is Change.RELINKED and t.other_order_id), "")
    if previous:
        key_list.append(keys.order_id(sym, previous))
    if fence is not None:
        key_list.append(fence[0])
    items: list[str] = []
    for field, value in order.to_hash().items():
        items += (field, value)
    events: list[str] = []
    count = 0
    for transition, stream_id in steps:
        if not transition.changed:
            continue
        fields = event_fields(order, transition, stream_id, writer)
        events.append(str(2 * len(fields)))
        for field, value in fields.items():
            events += (field, value)
        count += 1
    args = [str(order.rev - 1), coid, "1" if order.finished else "0", str(int(finished_ttl_s)),
            str(int(events_maxlen)), str(len(items)), str(count),
            "1" if order.order_id else "0", "1" if previous else "0",
            fence[1] if fence is not None else "", *items, *events]
    return key_list, args


async def save_changes(
    redis: aioredis.Redis,
    order: OwnOrder,
    steps: Sequence[Step],
    *,
    finished_ttl_s: int = DEFAULT_FINISHED_TTL_S,
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
) -> bool:
    """Write ``order`` and one event per changed step, in one atomic script.

    The hash, the orderId key (when known), active-set membership (removed when
    finished), the events and, when finished, the TTL (``finished_ttl_s``) of
    the hash and of the orderId key. Returns False, writing nothing, when the
    stored hash is not the revision ``order`` was loaded at (someone else wrote
    it: reload and apply again) or no longer exists. On success ``order.rev``
    is the new revision.
    """
    return (await save_many(redis, [(order, steps)], finished_ttl_s=finished_ttl_s,
                            events_maxlen=events_maxlen))[0]


async def save_change(
    redis: aioredis.Redis,
    order: OwnOrder,
    transition: Transition,
    *,
    stream_id: str | None,
    finished_ttl_s: int = DEFAULT_FINISHED_TTL_S,
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
) -> bool:
    """:func:`save_changes` of one transition (caused by stream entry ``stream_id``)."""
    return await save_changes(redis, order, [(transition, stream_id)],
                              finished_ttl_s=finished_ttl_s, events_maxlen=events_maxlen)


async def save_many(
    redis: aioredis.Redis,
    items: Sequence[tuple[OwnOrder, Sequence[Step]]],
    *,
    finished_ttl_s: int = DEFAULT_FINISHED_TTL_S,
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
    fence: Fence | None = None,
    writer: str | None = None,
) -> list[bool]:
    """:func:`save_changes` for several orders in one round trip (each one atomic).

    Returns, per item, whether it was written (False: stale revision, see
    :func:`save_changes`). With ``fence`` (the order monitor's lease), each
    script first checks that the lease still holds this value, on the server:
    a monitor paused past its lease writes nothing, and :class:`Fenced` is
    raised. ``writer`` (the monitor's consumer name) goes into each event as
    ``by``.
    """
    if not items:
        return []
    calls = []
    for order, steps in items:
        order.rev += 1
        calls.append(_save_call(order, steps, finished_ttl_s, events_maxlen, fence, writer))
    try:
        results = await _SAVE.run_many(redis, calls, raise_on_error=True)
    except BaseException:
        for order, _ in items:
            order.rev -= 1
        raise
    written = []
    fenced = False
    for (order, _), result in zip(items, results, strict=True):
        ok = int(result) == 1
        fenced = fenced or int(result) == -2
        if not ok:
            order.rev -= 1
        written.append(ok)
    if fenced:
        raise Fenced(f"{items[0][0].symbol}: the lease is not ours: nothing written")
    return written


#: Attempts of a load-change-save against writers that keep changing the same order.
_UPDATE_ATTEMPTS: Final = 5


async def _update(redis: aioredis.Redis, symbol: str, client_oid: str,
                  change: Callable[[OwnOrder], tuple[Transition, bool]], what: str, *,
                  finished_ttl_s: int, events_maxlen: int, fence: Fence | None = None,
                  writer: str | None = None) -> tuple[OwnOrder, Transition] | None:
    """Load ``client_oid``, ``change`` it (the transition, and whether to write), save it at
    the revision loaded; again on a stale revision. The order as saved (or left) and the
    transition; None when no such order is registered."""
    for _ in range(_UPDATE_ATTEMPTS):
        order = await load(redis, symbol, client_oid)
        if order is None:
            return None
        transition, write = change(order)
        if not write:
            return order, transition
        written = await save_many(redis, [(order, [(transition, None)])],
                                  finished_ttl_s=finished_ttl_s, events_maxlen=events_maxlen,
                                  fence=fence, writer=writer)
        if written[0]:
            return order, transition
    raise RuntimeError(f"order {client_oid} kept changing while {what}")


async def confirm_order_id(
    redis: aioredis.Redis,
    symbol: str,
    client_oid: str,
    order_id: str,
    *,
    now_ms: int,
    finished_ttl_s: int = DEFAULT_FINISHED_TTL_S,
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
) -> Transition | None:
    """Our REST reply named ``order_id`` for ``client_oid`` (:func:`kumex_l3.orders.confirm`):
    linked, confirmed, or a conflict (then ask the exchange: :func:`adopt_record`).
    None when no such order is registered."""
    def change(order: OwnOrder) -> tuple[Transition, bool]:
        before = order.confirmed_by
        transition = confirm(order, order_id, now_ms)
        return transition, transition.changed or order.confirmed_by != before

    done = await _update(redis, symbol, client_oid, change, "being confirmed",
                         finished_ttl_s=finished_ttl_s, events_maxlen=events_maxlen)
    return None if done is None else done[1]


async def mark_rejected(
    redis: aioredis.Redis,
    symbol: str,
    client_oid: str,
    *,
    code: str,
    msg: str,
    now_ms: int,
    finished_ttl_s: int = DEFAULT_FINISHED_TTL_S,
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
) -> Transition | None:
    """The REST call placing ``client_oid`` was refused (``code``, ``msg``): ``rejected``.

    For the strategy, after an answered error code (the exchange certainly did
    not act). A no-op transition when the order is no longer ``pending`` (the
    stream already showed it); None when no such order is registered.
    """
    def change(order: OwnOrder) -> tuple[Transition, bool]:
        transition = rest_refused(order, code, msg, now_ms)
        return transition, transition.changed

    done = await _update(redis, symbol, client_oid, change, "being marked rejected",
                         finished_ttl_s=finished_ttl_s, events_maxlen=events_maxlen)
    return None if done is None else done[1]


async def apply_order_change(
    redis: aioredis.Redis,
    change: OrderChange,
    *,
    now_ms: int,
    finished_ttl_s: int = DEFAULT_FINISHED_TTL_S,
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
    fence: Fence | None = None,
    writer: str | None = None,
) -> tuple[OwnOrder, Transition] | None:
    """Apply one change of the private channel (:func:`kumex_l3.orders.apply_change`) to
    the order registered under its clientOid, and save it (fenced by ``fence``, as the
    monitor's writes are): the order and the transition. None when no order of ours has
    that clientOid."""
    def step(order: OwnOrder) -> tuple[Transition, bool]:
        before = (order.confirmed_by, order.private_ts)
        transition = apply_change(order, change, now_ms)
        return transition, transition.changed or (order.confirmed_by, order.private_ts) != before

    if not change.client_oid:
        return None
    return await _update(redis, change.symbol, change.client_oid, step,
                         "applying a private change", finished_ttl_s=finished_ttl_s,
                         events_maxlen=events_maxlen, fence=fence, writer=writer)
