"""``python -m services.book``: settings, logging, then the HTTP server (wiring only).

Stops cleanly on SIGTERM or SIGINT, with exit status 0: while it still
answers (proxying), the replica hands every owned book off (a last checkpoint,
then its lease released, so that another replica takes it over at once); then
uvicorn stops accepting and the lifespan closes the rest
(:func:`kumex_l3.service.serve_app`).
"""

from __future__ import annotations

import logging

import uvicorn

from kumex_l3.config import load_settings, redact_url
from kumex_l3.logs import kv, secrets_of, setup_logging
from kumex_l3.service import http_protocol, loop_name, serve_app
from services.book.app import create_app
from services.book.settings import BookSettings


def main() -> None:
    """Run one book replica until SIGTERM."""
    settings = load_settings(BookSettings)
    setup_logging(settings.log_level, "book", secrets=secrets_of(settings))
    logging.getLogger("services.book").info(
        "starting", extra=kv(redis=redact_url(settings.redis_url), host=settings.host,
                             port=settings.port, replica=settings.replica))
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, loop=loop_name(settings.event_loop),
                            http=http_protocol(fast=app.state.fast_route))
    serve_app(config, before_shutdown=app.state.drain)


if __name__ == "__main__":
    main()
