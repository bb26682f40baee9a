"""Run the sandbox exchange as a separate process, for tests and benchmarks.

::

    with SandboxProcess({"SANDBOX_FLOW_RATE": "0"}) as sandbox:
        httpx.get(f"{sandbox.base_url}/api/v1/timestamp")

:class:`SandboxProcess` picks a free port on 127.0.0.1, launches
``python -m services.sandbox`` (the interpreter running the tests) with
``SANDBOX_*`` variables of its own (the parent's ``SANDBOX_*`` are not
inherited), waits until ``/healthz`` answers, and on exit sends SIGTERM (then
SIGKILL if it hangs). Its output goes to a temporary log file; when the
``with`` block fails, or the process dies at start, the log is printed to
stderr so that pytest shows it with the failure.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

__all__ = [
    "DEMO_KEY_1",
    "DEMO_KEY_2",
    "DemoKey",
    "KcAuth",
    "SandboxProcess",
    "SandboxStartError",
    "free_port",
]

_ROOT = Path(__file__).resolve().parent.parent
_POLL_S = 0.05


@dataclass(frozen=True)
class DemoKey:
    """An API key of the sandbox (the demo keys it accepts by default)."""

    key: str
    secret: str
    passphrase: str


#: The sandbox's documented demo keys (two users).
DEMO_KEY_1 = DemoKey("demo-key-1", "demo-secret-1", "demo-passphrase-1")
DEMO_KEY_2 = DemoKey("demo-key-2", "demo-secret-2", "demo-passphrase-2")


class KcAuth(httpx.Auth):
    """httpx auth that signs requests as KuCoin Futures wants (kumex-api.md §2).

    Written from the protocol document alone (it imports nothing of the
    project), so it checks the sandbox's verifier independently. ``skew_ms``
    shifts the timestamp; ``key_version`` 1 sends the passphrase in clear.
    """

    requires_request_body = True

    def __init__(self, key: DemoKey, *, key_version: int = 2, skew_ms: int = 0) -> None:
        self.key = key
        self.key_version = key_version
        self.skew_ms = skew_ms

    @staticmethod
    def hmac_b64(secret: str, text: bytes) -> str:
        digest = hmac.new(secret.encode(), text, hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    def headers(self, method: str, path_with_query: str, body: bytes) -> dict[str, str]:
        """The ``KC-API-*`` headers for one request."""
        timestamp = str(time.time_ns() // 1_000_000 + self.skew_ms)
        prefix = (timestamp + method.upper() + path_with_query).encode()
        passphrase = (
            self.key.passphrase
            if self.key_version == 1
            else self.hmac_b64(self.key.secret, self.key.passphrase.encode())
        )
        return {
            "KC-API-KEY": self.key.key,
            "KC-API-SIGN": self.hmac_b64(self.key.secret, prefix + body),
            "KC-API-TIMESTAMP": timestamp,
            "KC-API-PASSPHRASE": passphrase,
            "KC-API-KEY-VERSION": str(self.key_version),
        }

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path = request.url.raw_path.decode("ascii")
        request.headers.update(self.headers(request.method, path, request.content))
        yield request


class SandboxStartError(RuntimeError):
    """The sandbox process did not become ready; the message holds its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class SandboxProcess:
    """``python -m services.sandbox`` on a free port, as a context manager.

    ``env``: ``SANDBOX_*`` settings (and anything else) for the child, over
    the parent's environment minus its ``SANDBOX_*``. ``SANDBOX_HOST`` and
    ``SANDBOX_PORT`` are chosen here unless given.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.host = self.env.get("SANDBOX_HOST", "127.0.0.1")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the REST API (the ``KUMEX_BASE_URL`` to give clients)."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint (clients should take it from bullet-public instead)."""
        return f"ws://{self.host}:{self.port}/endpoint"

    # ------------------------------------------------------------------ log

    def log_text(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace")
        self._log.seek(0, os.SEEK_END)
        return text

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SandboxProcess:
        """Launch and wait until ready; a port taken meanwhile is retried."""
        fixed_port = "SANDBOX_PORT" in self.env
        last_error: SandboxStartError | None = None
        for _ in range(1 if fixed_port else 3):
            self.port = int(self.env["SANDBOX_PORT"]) if fixed_port else free_port(self.host)
            try:
                self._launch()
                self._wait_ready()
                return self
            except SandboxStartError as exc:
                last_error = exc
                self.stop()
                if "address already in use" not in str(exc).lower():
                    break
        assert last_error is not None
        raise last_error

    def _launch(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
        env.update(self.env)
        env["SANDBOX_HOST"] = self.host
        env["SANDBOX_PORT"] = str(self.port)
        env["PYTHONUNBUFFERED"] = "1"
        if self._log is not None:
            self._log.close()
        self._log = tempfile.TemporaryFile(prefix="sandbox-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.sandbox"],
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise SandboxStartError(
                        f"sandbox exited with status {code} at start:\n{self.log_text()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/healthz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise SandboxStartError(
                        f"sandbox not ready after {self.startup_timeout_s} s:\n{self.log_text()}"
                    )
                time.sleep(_POLL_S)

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        process, self.process = self.process, None
        if process is None:
            return self.returncode
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.returncode = process.returncode
        return self.returncode

    def close(self) -> None:
        """Stop the process and delete its log."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SandboxProcess:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is not None:
            sys.stderr.write(f"--- sandbox log ({self.base_url}) ---\n{self.log_text()}\n")
        self.close()
