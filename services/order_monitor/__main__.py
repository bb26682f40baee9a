"""``python -m services.order_monitor``: settings from the environment, run until SIGTERM.

A bad setting stops the process at once with a message naming the variable
(exit status 2). On SIGTERM or SIGINT the monitor stops its consumers (entries
not yet acknowledged stay pending and are handled again by the next owner),
gives its symbol leases back, and exits 0.
"""

from __future__ import annotations

import logging

from kumex_l3.service import run_service
from services.order_monitor.service import run_monitor
from services.order_monitor.settings import MonitorSettings

_log = logging.getLogger("services.order_monitor")


def main() -> None:
    """Entry point of the order monitor."""
    run_service(MonitorSettings, "order_monitor", run_monitor, log=_log)


if __name__ == "__main__":
    main()
