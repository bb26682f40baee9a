"""The feed's Prometheus metrics, all on one registry (``GET /metrics``).

=================================================  =======================================
metric                                             what
=================================================  =======================================
``kumex_feed_messages_received_total{symbol}``     data frames read from the exchange
``kumex_feed_messages_unrouted_total{reason}``     frames with no configured symbol
                                                   (``no_topic``, ``unknown_topic``,
                                                   ``unknown_type``, ``invalid``): logged
                                                   and counted, not stored
``kumex_feed_messages_written_total{symbol}``      data messages appended to the stream
``kumex_feed_messages_dropped_total{symbol}``      lost to a full buffer (or refused by Redis)
``kumex_feed_gaps_total{symbol}``                  ``ctl=gap`` entries written
``kumex_feed_connections_total``                   connections welcomed and subscribed
``kumex_feed_reconnects_total``                    reconnect attempts after a failure
``kumex_feed_connected``                           1 while connected and subscribed
``kumex_feed_snapshots_fetched_total{symbol}``     valid snapshots fetched and queued
``kumex_feed_snapshots_refused_total{symbol,reason}``  ``rate_limited``, ``invalid``,
                                                   ``http_error``, ``error_reply``
``kumex_feed_snapshot_requests_total{symbol}``     requests read from the pub/sub channel
``kumex_feed_buffer_depth``                        entries waiting for Redis
``kumex_feed_redis_errors_total{op}``              ``write``, ``pubsub``, ``heartbeat``
``kumex_feed_capture_errors_total``                failed writes to ``FEED_CAPTURE``
=================================================  =======================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kumex_l3.metrics import make_registry

__all__ = ["FeedMetrics"]


class FeedMetrics:
    """Every metric of the feed, on ``registry`` (a fresh one when ``None``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else make_registry()
        reg = self.registry
        self.received = Counter("kumex_feed_messages_received", "Data frames read from the "
                                "exchange", ["symbol"], registry=reg)
        self.unrouted = Counter("kumex_feed_messages_unrouted", "Frames with no configured "
                                "symbol (counted and logged, not stored)", ["reason"],
                                registry=reg)
        self.written = Counter("kumex_feed_messages_written", "Data messages appended to the "
                               "symbol's stream", ["symbol"], registry=reg)
        self.dropped = Counter("kumex_feed_messages_dropped", "Messages lost to a full buffer "
                               "or refused by Redis", ["symbol"], registry=reg)
        self.gaps = Counter("kumex_feed_gaps", "ctl=gap entries written", ["symbol"],
                            registry=reg)
        self.connections = Counter("kumex_feed_connections", "Connections welcomed and "
                                   "subscribed", registry=reg)
        self.reconnects = Counter("kumex_feed_reconnects", "Reconnect attempts after a "
                                  "failure", registry=reg)
        self.connected = Gauge("kumex_feed_connected", "1 while connected and subscribed",
                               registry=reg)
        self.snapshots_fetched = Counter("kumex_feed_snapshots_fetched", "Valid L3 snapshots "
                                         "fetched", ["symbol"], registry=reg)
        self.snapshots_refused = Counter("kumex_feed_snapshots_refused", "Snapshot fetches "
                                         "that failed", ["symbol", "reason"], registry=reg)
        self.snapshot_requests = Counter("kumex_feed_snapshot_requests", "Snapshot requests "
                                         "read from the pub/sub channel", ["symbol"],
                                         registry=reg)
        self.buffer_depth = Gauge("kumex_feed_buffer_depth", "Entries waiting for Redis",
                                  registry=reg)
        self.redis_errors = Counter("kumex_feed_redis_errors", "Redis errors", ["op"],
                                    registry=reg)
        self.capture_errors = Counter("kumex_feed_capture_errors", "Failed writes to the "
                                      "capture file", registry=reg)
