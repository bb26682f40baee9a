"""The strategy's Prometheus metrics, all on one registry (``GET /metrics``).

==============================================  ==========================================
metric                                          what
==============================================  ==========================================
``kumex_strategy_orders_placed_total``          orders the exchange accepted (REST 200)
``kumex_strategy_orders_refused_total{code}``   orders the exchange refused (marked rejected)
``kumex_strategy_orders_retried_total``         refused for now (rate limited): the same
                                                order sent again under a new clientOid
``kumex_strategy_order_timeouts_total``         orders whose outcome was unknown (timeout,
                                                broken connection, server error)
``kumex_strategy_fills_total``                  own-order events with new filled size
``kumex_strategy_filled_contracts_total{side}`` contracts filled
``kumex_strategy_counter_orders_total``         counter-orders decided after a fill
``kumex_strategy_decisions_skipped_total``      orders not placed (limits, level held...)
``kumex_strategy_open_orders``                  own orders that may still fill
``kumex_strategy_position``                     position in contracts (+ long)
``kumex_strategy_exchange_position``            the account's position at the exchange
``kumex_strategy_position_mismatches_total``    reads of it that differed from the grid's
``kumex_strategy_events_total``                 order-events stream entries read
==============================================  ==========================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kumex_l3.metrics import make_registry

__all__ = ["StrategyMetrics"]


class StrategyMetrics:
    """Every metric of the strategy, on ``registry`` (a fresh one when ``None``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else make_registry()
        reg = self.registry
        self.placed = Counter("kumex_strategy_orders_placed", "Orders the exchange accepted",
                              registry=reg)
        self.refused = Counter("kumex_strategy_orders_refused", "Orders the exchange refused",
                               ["code"], registry=reg)
        self.retried = Counter("kumex_strategy_orders_retried", "Orders refused for now (rate "
                               "limited) and decided again under a new clientOid",
                               registry=reg)
        self.timeouts = Counter("kumex_strategy_order_timeouts", "Orders whose outcome was "
                                "unknown (timeout, broken connection, server error)",
                                registry=reg)
        self.fills = Counter("kumex_strategy_fills", "Own-order events with new filled size",
                             registry=reg)
        self.filled_contracts = Counter("kumex_strategy_filled_contracts", "Contracts filled",
                                        ["side"], registry=reg)
        self.counter_orders = Counter("kumex_strategy_counter_orders", "Counter-orders "
                                      "decided after a fill", registry=reg)
        self.skipped = Counter("kumex_strategy_decisions_skipped", "Orders not placed",
                               registry=reg)
        self.open_orders = Gauge("kumex_strategy_open_orders", "Own orders that may still "
                                 "fill", registry=reg)
        self.position = Gauge("kumex_strategy_position", "Position in contracts (+ long)",
                              registry=reg)
        self.exchange_position = Gauge("kumex_strategy_exchange_position", "The account's "
                                       "position at the exchange, as last read",
                                       registry=reg)
        self.position_mismatches = Counter("kumex_strategy_position_mismatches", "Reads of "
                                           "the exchange's position that differed from the "
                                           "grid's own count", registry=reg)
        self.events = Counter("kumex_strategy_events", "Order-events stream entries read",
                              registry=reg)
