"""``python -m services.feed``: settings from the environment, then run until SIGTERM/Ctrl-C.

A bad setting stops the process at once with a message naming the variable
(exit status 2). On SIGTERM or SIGINT the feed stops reading, flushes its
buffer to Redis (up to ``FEED_SHUTDOWN_TIMEOUT``) and exits 0.
"""

from __future__ import annotations

import logging

from kumex_l3.service import run_service
from services.feed.run import run_feed
from services.feed.settings import FeedSettings

_log = logging.getLogger("services.feed")


def main() -> None:
    """Entry point of the feed service."""
    run_service(FeedSettings, "feed", run_feed, log=_log)


if __name__ == "__main__":
    main()
