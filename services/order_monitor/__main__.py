"""``python -m services.order_monitor``: settings from the environment, run until SIGTERM.

A bad setting stops the process at once with a message naming the variable
(exit status 2). On SIGTERM or SIGINT the monitor stops its consumers (entries
not yet acknowledged stay pending and are handled again by the next owner),
gives its symbol leases back, and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from kumex_l3.config import load_settings
from kumex_l3.logs import kv, secrets_of, setup_logging
from services.order_monitor.service import run_monitor
from services.order_monitor.settings import MonitorSettings

_log = logging.getLogger("services.order_monitor")


async def _main(settings: MonitorSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            _log.info("signal received", extra=kv(signal=sig.name))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return await run_monitor(settings, stop)


def main() -> None:
    """Entry point of the order monitor."""
    settings = load_settings(MonitorSettings)
    try:
        setup_logging(settings.log_level, "order_monitor", secrets=secrets_of(settings))
    except ValueError as exc:
        sys.stderr.write(f"invalid configuration for MonitorSettings:\n  LOG_LEVEL: {exc}\n")
        raise SystemExit(2) from None
    raise SystemExit(asyncio.run(_main(settings)))


if __name__ == "__main__":
    main()
