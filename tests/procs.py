"""Run a project service as a real child process, the way users run it.

``ServiceProcess("services.book", env, port_var="BOOK_PORT")`` starts
``python -m services.book`` on a free port with the given environment over
the parent's (minus the service's own prefix), waits for ``/healthz``, and
keeps its output in a temporary file shown when a test fails. ``kill()`` is
SIGKILL (no cleanup: crash tests), ``stop()`` is SIGTERM and a wait.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from kumex_l3.devredis import free_port

ROOT = Path(__file__).resolve().parent.parent

#: Upper bound of any wait in tests: a safety net against hangs, never a timing assertion.
SAFETY_S = 120.0


class ServiceProcess:
    def __init__(self, module: str, env: Mapping[str, str], *, port_var: str,
                 prefix: str | None = None, name: str | None = None) -> None:
        self.module = module
        self.env = dict(env)
        self.port_var = port_var
        self.prefix = prefix if prefix is not None else port_var.split("_", 1)[0] + "_"
        self.name = name or module.rsplit(".", 1)[-1]
        self.port = int(self.env.get(port_var) or free_port())
        self.env[port_var] = str(self.port)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] = tempfile.TemporaryFile(prefix=f"{self.name}-")  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.prefix)}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen([sys.executable, "-m", self.module], cwd=ROOT, env=env,
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        if wait:
            wait_for(self.healthy, f"{self.name} /healthz")
        return self

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"{self.name} is not running:\n{self.log_text()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200
        return False

    def kill(self) -> None:
        """SIGKILL: no checkpoint, no lease release, no flush."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then the exit code (SIGKILL if it does not stop in time)."""
        process, self.process = self.process, None
        if process is None:
            return None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.log_text()}") from None

    def log_text(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-20_000:]

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self.process is not None:
                self.stop()
        finally:
            if exc_type is not None:
                sys.stderr.write(f"--- {self.name} log ---\n{self.log_text()}\n")
            self._log.close()


def wait_for(check: object, what: str, *, timeout: float = SAFETY_S,
             interval: float = 0.1) -> None:
    """Poll ``check()`` until it is truthy; fail naming ``what`` after ``timeout``."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (with these labels) on a Prometheus ``/metrics`` page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
