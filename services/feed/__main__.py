"""``python -m services.feed``: settings from the environment, then run until SIGTERM/Ctrl-C.

A bad setting stops the process at once with a message naming the variable
(exit status 2). On SIGTERM or SIGINT the feed stops reading, flushes its
buffer to Redis (up to ``FEED_SHUTDOWN_TIMEOUT``) and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from kumex_l3.config import load_settings
from kumex_l3.logs import kv, secrets_of, setup_logging
from services.feed.feed import run_feed
from services.feed.settings import FeedSettings

_log = logging.getLogger("services.feed")


async def _main(settings: FeedSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            _log.info("signal received", extra=kv(signal=sig.name))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return await run_feed(settings, stop)


def main() -> None:
    """Entry point of the feed service."""
    settings = load_settings(FeedSettings)
    try:
        setup_logging(settings.log_level, "feed", secrets=secrets_of(settings))
    except ValueError as exc:
        sys.stderr.write(f"invalid configuration for FeedSettings:\n  LOG_LEVEL: {exc}\n")
        raise SystemExit(2) from None
    raise SystemExit(asyncio.run(_main(settings)))


if __name__ == "__main__":
    main()
