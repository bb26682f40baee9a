"""order_monitor service: own orders' state from the L3 stream, kept in Redis.

``python -m services.order_monitor``. Reads ``kumex:{SYM}:l3`` through a
consumer group while holding the symbol's lease (role ``order_monitor``),
applies every message about a registered clientOid to its hash
``kumex:{SYM}:order:{clientOid}`` (:mod:`kumex_l3.orders`,
:mod:`kumex_l3.order_store`) and appends each change to
``kumex:{SYM}:order-events``. See :mod:`services.order_monitor.monitor` for the
loop and :mod:`services.order_monitor.settings` for the ``MONITOR_*`` variables.
"""
