"""Every Redis key of the project, made by one function each (see DESIGN.md).

The ``{SYM}`` hash tag keeps all of a symbol's keys in one Redis Cluster slot.
Services never build a key with an f-string of their own: they call these.
"""

from __future__ import annotations

__all__ = [
    "FIELD_CTL",
    "FIELD_MSG",
    "checkpoint",
    "dlq",
    "feed_alive",
    "feed_scheduler",
    "l3_stream",
    "members",
    "moves",
    "order",
    "order_events",
    "order_id",
    "orders_active",
    "owner",
    "snapshot",
    "snapshot_due",
    "snapshot_requests",
    "strategy_state",
    "stream_head",
    "symbol_prefix",
    "top",
]

#: Stream field holding a raw exchange message, exactly as received.
FIELD_MSG = "msg"
#: Stream field of a feed control entry (``connected``, ``snapshot``, ``gap``...).
FIELD_CTL = "ctl"


def symbol_prefix(symbol: str) -> str:
    """``kumex:{SYM}``: the prefix of every key of one symbol."""
    return f"kumex:{{{symbol}}}"


def l3_stream(symbol: str) -> str:
    """Stream of raw level3v2 messages (field ``msg``) and feed control entries (``ctl``)."""
    return f"kumex:{{{symbol}}}:l3"


def stream_head(symbol: str) -> str:
    """String: the sequence of the last message the feed appended to :func:`l3_stream`.

    Kept by the feed's write script in the same step as each append: a feed
    taking over a symbol starts right after it, and no sequence is written twice.
    """
    return f"kumex:{{{symbol}}}:l3:last"


def snapshot(symbol: str) -> str:
    """String: the latest exchange L3 snapshot (its ``data`` JSON, with ``sequence``)."""
    return f"kumex:{{{symbol}}}:snapshot"


def snapshot_requests(symbol: str) -> str:
    """Pub/Sub channel (not a key): consumers ask the feed for a fresh snapshot here.

    The payload is the smallest sequence the requester can use (``0`` for any).
    The feed answers within its snapshot budget by refreshing :func:`snapshot` and
    appending a ``ctl=snapshot`` entry to the stream.
    """
    return f"kumex:{{{symbol}}}:snapshot:requests"


def snapshot_due(symbol: str) -> str:
    """String with a TTL: when the feed's snapshot scheduler expects to fetch this symbol.

    ``{"dueInMs": ..., "at": ms, "position": n, "queued": n, "perMin": r}`` while a
    request for the symbol waits in the scheduler's queue (refreshed every second,
    deleted once served); the book quotes it in its 503 ``detail``.
    """
    return f"kumex:{{{symbol}}}:snapshot:due"


def feed_scheduler() -> str:
    """String with a TTL: the lease of the feed process that fetches every snapshot.

    One queue for the venue's snapshot budget, which is per client IP for all
    symbols together: one feed holds this lease and serves every symbol's requests.
    Not a per-symbol key (it touches no symbol's slot).
    """
    return "kumex:feed:snapshots:owner"


def feed_alive(symbol: str) -> str:
    """String with a TTL: the feed's heartbeat while it is connected to the exchange.

    The feed sets it (``{"connectId": ..., "at": ms}``, expiring after
    ``FEED_HEARTBEAT_TTL_SECONDS``) again and again while it is subscribed; its
    absence means the feed is gone, cut off from the exchange or from Redis,
    even when it died without a word (``kill -9``), and the book stops serving
    the symbol as fresh.
    """
    return f"kumex:{{{symbol}}}:feed"


def checkpoint(symbol: str) -> str:
    """The book service's own checkpoint: state, sequence, stream id."""
    return f"kumex:{{{symbol}}}:checkpoint"


def top(symbol: str) -> str:
    """Hash: ``sequence``, ``bestBid``, ``bestAsk``, ``synced``, ``updatedAt``."""
    return f"kumex:{{{symbol}}}:top"


def order(symbol: str, client_oid: str) -> str:
    """Hash: one own order, keyed by the ``clientOid`` chosen before sending it."""
    return f"kumex:{{{symbol}}}:order:{client_oid}"


def order_id(symbol: str, exchange_order_id: str) -> str:
    """String: exchange ``orderId`` -> ``clientOid``."""
    return f"kumex:{{{symbol}}}:orderid:{exchange_order_id}"


def orders_active(symbol: str) -> str:
    """Set: clientOids of own orders not yet done."""
    return f"kumex:{{{symbol}}}:orders:active"


def order_events(symbol: str) -> str:
    """Stream: one entry per own-order state change."""
    return f"kumex:{{{symbol}}}:order-events"


def owner(symbol: str, role: str) -> str:
    """String with a TTL: the lease naming which replica of ``role`` serves the symbol."""
    return f"kumex:{{{symbol}}}:owner:{role}"


def members(role: str) -> str:
    """Sorted set: the live replicas of ``role`` (score: the Redis-clock ms their entry
    lapses at), from which each replica works out its even share of the symbols."""
    return f"kumex:{{{role}}}:members"


def moves(role: str) -> str:
    """String counter: bumped when a replica of ``role`` joins, leaves or hands a symbol
    off, so that the others look again at once instead of at their next period."""
    return f"kumex:{{{role}}}:moves"


def dlq(symbol: str) -> str:
    """Stream: input that was refused, with the reason."""
    return f"kumex:{{{symbol}}}:dlq"


def strategy_state(symbol: str, prefix: str) -> str:
    """Hash: the grid strategy's persisted state for its clientOid ``prefix``.

    Fields ``lastEventId``, ``position``, ``nextSeq``, ``centre``, ``filled:{clientOid}``,
    ``plan:{clientOid}`` (a write-ahead log of decided orders); see services/strategy.
    """
    return f"kumex:{{{symbol}}}:strategy:{prefix}"
