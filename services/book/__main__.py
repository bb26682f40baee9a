"""``python -m services.book``: settings, logging, then the HTTP server (wiring only).

Stops cleanly on SIGTERM or SIGINT, with exit status 0: uvicorn stops
accepting, the lifespan checkpoints every owned book and releases its leases
so that other replicas take the symbols over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

from kumex_l3.config import load_settings, redact_url
from kumex_l3.logs import kv, secrets_of, setup_logging
from services.book.app import create_app
from services.book.settings import BookSettings


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT ends in a normal exit (status 0).

    uvicorn shuts down gracefully on those signals and then raises the signal
    again, so the process would die of it; a clean stop should say so.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def main() -> None:
    """Run one book replica until SIGTERM."""
    settings = load_settings(BookSettings)
    setup_logging(settings.log_level, "book", secrets=secrets_of(settings))
    logging.getLogger("services.book").info(
        "starting", extra=kv(redis=redact_url(settings.redis_url), host=settings.host,
                             port=settings.port, replica=settings.replica))
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    asyncio.run(_Server(config).serve())


if __name__ == "__main__":
    main()
