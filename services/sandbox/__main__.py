"""``python -m services.sandbox``: run the sandbox exchange (settings: ``SANDBOX_*``)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from kumex_l3.logs import RedactFilter
from kumex_l3.service import http_protocol, loop_name, serve_app
from services.sandbox.app import create_app
from services.sandbox.settings import SandboxSettings, SettingsError, load_settings

_log = logging.getLogger("services.sandbox")


def _url(settings: SandboxSettings) -> str:
    host = settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if settings.tls else 'http'}://{host}:{settings.port}"


def main() -> int:
    """Build the settings, serve until SIGTERM or Ctrl-C; the exit status."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # WebSocket tokens (bearer credentials: a private one reads an account's orders) out
    # of every line, uvicorn's access lines of /endpoint?token=... included.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())
    # Our one start-up line says where we listen; uvicorn's own lines only when asked
    # (debug, or access logs on).
    quiet = settings.log_level == "info" and not settings.access_log
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level="warning" if quiet else settings.log_level,
        access_log=settings.access_log,
        log_config=None,
        lifespan="on",
        ws_ping_interval=None,
        ws_ping_timeout=None,
        loop=loop_name(settings.event_loop),
        http=http_protocol(),
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )
    mode = f"replaying {settings.replay}" if settings.replay else f"flow {settings.flow_rate}/s"
    _log.info(
        "sandbox exchange on %s (ws %s), symbols %s, %s",
        _url(settings),
        settings.ws_endpoint,
        settings.symbols,
        mode,
    )
    # SIGINT/SIGTERM: stop accepting, close the sockets, run the lifespan shutdown.
    return 0 if serve_app(config) else 1


if __name__ == "__main__":
    sys.exit(main())
