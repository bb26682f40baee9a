"""``python -m services.sandbox``: run the sandbox exchange (settings: ``SANDBOX_*``)."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

import uvicorn

from services.sandbox.app import create_app
from services.sandbox.settings import SandboxSettings, SettingsError, load_settings

_log = logging.getLogger("services.sandbox")


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT ends in a normal exit (status 0).

    uvicorn shuts down gracefully on those signals (lifespan shutdown included)
    and then raises the signal again, so the process dies of it; a service
    that stopped cleanly should say so with its exit status instead.
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


def _url(settings: SandboxSettings) -> str:
    host = settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


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
    )
    server = _Server(config)
    mode = f"replaying {settings.replay}" if settings.replay else f"flow {settings.flow_rate}/s"
    _log.info(
        "sandbox exchange on %s (ws %s), symbols %s, %s",
        _url(settings),
        settings.ws_endpoint,
        settings.symbols,
        mode,
    )
    # SIGINT/SIGTERM: stop accepting, close the sockets, run the lifespan shutdown.
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
