"""Chaos scenarios: the whole set of services against the sandbox, with faults injected.

:mod:`chaos.stack` runs the set (sandbox, Redis, feed, book, order monitor,
grid strategy) as real processes and checks the invariants that must survive
any fault; :mod:`chaos.scenarios` injects the faults (kill -9, Redis restarts
and outages, WebSocket disconnects and silences, snapshot refusals, REST
errors, load); :mod:`chaos.run` (``make chaos``) runs them all and prints
what was injected and checked.
"""

__all__: list[str] = []
