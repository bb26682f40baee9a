"""The grid strategy service: ``python -m services.strategy``.

Trades one symbol through signed REST (:class:`kumex_l3.trading.Trader`),
decides with the pure :mod:`kumex_l3.grid`, and learns every fill from the
order-events stream the order monitor writes. Modules: :mod:`.settings`
(``STRATEGY_*``), :mod:`.state` (its persisted state in Redis), :mod:`.runner`
(the I/O shell), :mod:`.metrics`, :mod:`.web` (``/healthz``, ``/readyz``,
``/metrics``, ``/state``).
"""
