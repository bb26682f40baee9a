"""The order monitor's Prometheus metrics, all on one registry (``GET /metrics``).

======================================================  ========================================
metric                                                  what
======================================================  ========================================
``kumex_order_monitor_messages_read_total{symbol}``     stream entries read (data and control)
``kumex_order_monitor_own_messages_total{symbol}``      messages about own orders, applied
``kumex_order_monitor_invalid_messages_total{symbol}``  entries that could not be read
``kumex_order_monitor_clientoid_conflicts_total{symbol}``  another order claimed one of our
                                                        clientOids (never linked; the
                                                        exchange is asked)
``kumex_order_monitor_relinked_total{symbol}``          orders linked to someone else's,
                                                        relinked from our account's record
``kumex_order_monitor_fenced_total{symbol}``            saves refused: the lease was not
                                                        ours any more (nothing written)
``kumex_order_monitor_implausible_total{symbol}``       messages skipped: a sequence
                                                        implausibly far from the stream's
                                                        (the book dead-letters them)
``kumex_order_monitor_changes_written_total{symbol,change}``  order state changes written
``kumex_order_monitor_conflicts_total{symbol}``         saves retried: the hash changed meanwhile
``kumex_order_monitor_gaps_total{symbol,cause}``        ``gap``, ``connected``, ``sequence``
``kumex_order_monitor_reconciliations_total{symbol}``   orders checked against the exchange
``kumex_order_monitor_corrections_total{symbol}``       ...that differed from it
``kumex_order_monitor_reconcile_errors_total{symbol}``  reconciliations that failed (retried)
``kumex_order_monitor_rejected_unseen_total{symbol}``   pending orders never seen: rejected
``kumex_order_monitor_errors_total{symbol}``            worker restarts after an error
``kumex_order_monitor_lag_entries{symbol}``             entries of the stream not yet read
``kumex_order_monitor_active_orders{symbol}``           own orders not finished
``kumex_order_monitor_owned{symbol}``                   1 while this replica holds the lease
``kumex_order_monitor_batch_seconds{symbol}``           time to handle one batch
``kumex_order_monitor_private_changes_total{symbol,     private-channel frames: ``applied``,
result}``                                               ``known``, ``not_ours``, ``not_held``,
                                                        ``fenced``, ``malformed``, ``error``
                                                        (not written), ``other``
``kumex_order_monitor_private_connected``               1 while subscribed to the channel
``kumex_order_monitor_private_connections_total``       subscriptions made (reconnects + 1)
======================================================  ========================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kumex_l3.metrics import make_registry

__all__ = ["MonitorMetrics"]


class MonitorMetrics:
    """Every metric of the order monitor, on ``registry`` (a fresh one when ``None``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else make_registry()
        reg = self.registry
        p = "kumex_order_monitor_"
        self.read = Counter(p + "messages_read", "Stream entries read", ["symbol"],
                            registry=reg)
        self.own = Counter(p + "own_messages", "Messages about own orders, applied",
                           ["symbol"], registry=reg)
        self.invalid = Counter(p + "invalid_messages", "Entries that could not be read",
                               ["symbol"], registry=reg)
        self.clientoid_conflicts = Counter(p + "clientoid_conflicts", "Other orders that "
                                           "claimed one of our clientOids", ["symbol"],
                                           registry=reg)
        self.relinked = Counter(p + "relinked", "Orders relinked from our account's record",
                                ["symbol"], registry=reg)
        self.fenced = Counter(p + "fenced", "Saves refused: the lease was not ours any more",
                              ["symbol"], registry=reg)
        self.implausible = Counter(p + "implausible", "Messages skipped: a sequence "
                                   "implausibly far from the stream's", ["symbol"],
                                   registry=reg)
        self.changes = Counter(p + "changes_written", "Own-order state changes written",
                               ["symbol", "change"], registry=reg)
        self.conflicts = Counter(p + "conflicts", "Saves retried after a concurrent write",
                                 ["symbol"], registry=reg)
        self.gaps = Counter(p + "gaps", "Possible message loss seen on the stream",
                            ["symbol", "cause"], registry=reg)
        self.reconciliations = Counter(p + "reconciliations", "Orders checked against the "
                                       "exchange", ["symbol"], registry=reg)
        self.corrections = Counter(p + "corrections", "Reconciled orders that differed",
                                   ["symbol"], registry=reg)
        self.reconcile_errors = Counter(p + "reconcile_errors", "Failed reconciliations",
                                        ["symbol"], registry=reg)
        self.rejected_unseen = Counter(p + "rejected_unseen", "Pending orders never seen on "
                                       "the stream, rejected", ["symbol"], registry=reg)
        self.errors = Counter(p + "errors", "Worker restarts after an error", ["symbol"],
                              registry=reg)
        self.lag = Gauge(p + "lag_entries", "Stream entries not yet read by the group",
                         ["symbol"], registry=reg)
        self.active = Gauge(p + "active_orders", "Own orders not finished", ["symbol"],
                            registry=reg)
        self.owned = Gauge(p + "owned", "1 while this replica holds the symbol's lease",
                           ["symbol"], registry=reg)
        self.private_changes = Counter(p + "private_changes", "Frames of the private "
                                       "order channel, by what became of them",
                                       ["symbol", "result"], registry=reg)
        self.private_connected = Gauge(p + "private_connected", "1 while subscribed to the "
                                       "private order channel", registry=reg)
        self.private_connections = Counter(p + "private_connections", "Subscriptions to the "
                                           "private order channel made", registry=reg)
        self.batch_seconds = Histogram(p + "batch_seconds", "Time to handle one batch",
                                       ["symbol"], registry=reg,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                0.25, 0.5, 1.0, 2.5))
