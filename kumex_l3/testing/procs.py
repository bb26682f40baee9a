"""Run a project service as a real child process, the way users run it; wait for things.

``ServiceProcess("services.book", env, port_var="BOOK_PORT")`` starts
``python -m services.book`` on a free port with the given environment over
the parent's (minus the service's own prefixes), waits for ``/healthz``, and
keeps its output in a temporary file shown when a test fails. ``kill()`` is
SIGKILL (no cleanup: crash tests), ``stop()`` is SIGTERM and a wait. The
per-service helpers of the tests (``BookProcess``, ``FeedProcess``,
``MonitorProcess``, :class:`kumex_l3.testing.sandbox_proc.SandboxProcess`) are subclasses.

:func:`wait_for` (threads) and :func:`eventually` (coroutines) poll a
condition with a ceiling against hangs: the ceiling is never an assertion
on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

import httpx
import redis
import redis.asyncio

from kumex_l3.redis_adapter import connect, connect_sync
from kumex_l3.testing.devredis import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout: services run from here

#: Upper bound of any wait in tests: a safety net against hangs, never a timing assertion.
SAFETY_S = 120.0
#: How often the waits poll.
POLL_S = 0.05
#: The end of a log shown in a failure message.
_LOG_TAIL = 20_000

_T = TypeVar("_T")


class Started:
    """A context manager over ``start()``: a start that fails half-way is closed again."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServiceProcess(Started):
    """``python -m module`` on ``host:port``, with its output kept in a temporary file.

    ``env`` goes over the parent's environment minus the variables starting
    with ``prefix`` (one or several; by default the part of ``port_var`` up
    to its first ``_``). ``port_var`` names the port variable: given in
    ``env`` it is kept, else a free port is chosen. ``start_timeout`` bounds
    the wait for ``/healthz``; ``stop_timeout`` the wait after SIGTERM, after
    which the process is killed and, with ``check_stop``, the test fails.
    """

    def __init__(self, module: str, env: Mapping[str, str], *, port_var: str,
                 prefix: str | tuple[str, ...] | None = None, name: str | None = None,
                 host: str = "127.0.0.1", start_timeout: float = SAFETY_S,
                 stop_timeout: float = 20.0, check_stop: bool = True) -> None:
        self.module = module
        self.env = dict(env)
        self.port_var = port_var
        self.prefix = prefix if prefix is not None else port_var.split("_", 1)[0] + "_"
        self.name = name or module.rsplit(".", 1)[-1]
        self.host = host
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.check_stop = check_stop
        self.port = int(self.env.get(port_var) or free_port())
        self.env[port_var] = str(self.port)
        self.process: subprocess.Popen[bytes] | None = None
        #: ``https`` for a service serving TLS; ``verify`` then trusts its CA.
        self.scheme = "http"
        self.verify: ssl.SSLContext | bool = True
        #: The exit status of the last run, once it ended.
        self.returncode: int | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, wait: bool = True) -> Self:
        """Launch; with ``wait``, until ``/healthz`` answers 200 (a failure shows the log)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.prefix)}
        env.update(self.env)
        if is_cluster_url(env.get("REDIS_URL", "")):
            env.setdefault("REDIS_CLUSTER", "true")
        env["PYTHONUNBUFFERED"] = "1"
        if self._log is None:
            self._log = tempfile.TemporaryFile(prefix=f"{self.name}-")  # noqa: SIM115
        self.returncode = None
        self.process = subprocess.Popen([sys.executable, "-m", self.module], cwd=ROOT, env=env,
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        if wait:
            wait_for(self.healthy, f"{self.name} /healthz", timeout=self.start_timeout,
                     proc=self)
        return self

    def check_running(self) -> None:
        """Fail (with the log) if the process is not running."""
        code = None if self.process is None else self.process.poll()
        if self.process is None or code is not None:
            raise AssertionError(f"{self.name} exited with status {code}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """``GET /healthz`` is 200; fails at once if the process is gone."""
        self.check_running()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/healthz", timeout=2.0,
                             verify=self.verify).status_code == 200
        return False

    def kill(self) -> None:
        """SIGKILL: no checkpoint, no lease release, no flush."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            self.returncode = process.wait()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then the exit status (SIGKILL if it does not stop in time).

        Once stopped, returns the last exit status again.
        """
        process, self.process = self.process, None
        if process is None:
            return self.returncode
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                self.returncode = process.returncode
                if self.check_stop:
                    raise AssertionError(
                        f"{self.name} ignored SIGTERM:\n{self.log_tail()}") from None
        self.returncode = process.returncode
        return self.returncode

    def close(self) -> None:
        """Stop the process and delete its log."""
        try:
            self.stop()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    # ------------------------------------------------------------------ log

    def log_text(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        if self._log is None:
            return ""
        return read_shared(self._log).decode("utf-8", errors="replace")

    def log_tail(self) -> str:
        """The end of :meth:`log_text`, for a failure message."""
        return self.log_text()[-_LOG_TAIL:]

    # ------------------------------------------------------------------ with

    def __exit__(self, exc_type: type[BaseException] | None = None,  # type: ignore[override]
                 exc: BaseException | None = None, tb: TracebackType | None = None) -> None:
        try:
            self.stop()
        finally:
            if exc_type is not None:
                sys.stderr.write(f"--- {self.name} log ({self.url}) ---\n{self.log_tail()}\n")
            self.close()


def read_shared(file: IO[bytes]) -> bytes:
    """All of ``file``, which a child process writes through the same open file.

    ``pread``: parent and child share one file offset, which ``seek`` and
    ``read`` would move under the child's writes (they would overwrite).
    """
    fd = file.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0)


def wait_for(check: Callable[[], _T], what: str, *, timeout: float = SAFETY_S,
             interval: float = POLL_S, proc: ServiceProcess | None = None) -> _T:
    """Poll ``check()`` until it is truthy and return that value.

    Fails naming ``what`` (and showing ``proc``'s log) after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            log = f"\n--- log ---\n{proc.log_tail()}" if proc is not None else ""
            raise AssertionError(f"timed out waiting for {what}{log}")
        time.sleep(interval)


async def eventually(check: Callable[[], Awaitable[_T]] | Callable[[], _T], what: str, *,
                     timeout: float = SAFETY_S, interval: float = POLL_S) -> _T:
    """:func:`wait_for` in a coroutine: ``check`` may be sync or async; never blocks the loop."""
    deadline = time.monotonic() + timeout
    while True:
        result: Any = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (with these labels) on a Prometheus ``/metrics`` page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` lists several nodes: the seeds of a Redis Cluster (the harness's
    :class:`~kumex_l3.testing.devcluster.RedisClusterServers` lists them all)."""
    return "," in url


def sync_client(url: str, name: str = "tests", **options: Any) -> redis.Redis:
    """A blocking client of ``url``: a Redis Cluster client when it lists several nodes."""
    return connect_sync(url, name, cluster=is_cluster_url(url), **options)


def async_client(url: str, name: str = "tests", **options: Any) -> redis.asyncio.Redis:
    """An asyncio client of ``url``: a Redis Cluster client when it lists several nodes."""
    return connect(url, name, cluster=is_cluster_url(url), **options)


def flush_redis(url: str) -> str:
    """Empty the Redis server at ``url`` (FLUSHALL; every master of a cluster) and return
    ``url``."""
    client = sync_client(url)
    try:
        client.flushall()
    finally:
        client.close()
    return url
