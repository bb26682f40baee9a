"""Headless Debian Chromium driven over the DevTools protocol (no downloaded browser).

``Browser()`` starts ``chromium`` (or ``chromium-browser``) headless on a free
DevTools port with an empty profile and no background networking; ``page(url)``
opens a tab and returns a :class:`Page` with ``evaluate(js)`` and
``screenshot(path)``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from kumex_l3.testing.procs import read_shared

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws_url: str) -> None:
        # Entered by hand: the page outlives any one ``with`` block of the test.
        self._ws: ClientConnection = connect(ws_url, max_size=64 << 20,
                                             open_timeout=30).__enter__()
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._ws.close()


class Browser:
    def __init__(self) -> None:
        binary = find_chromium()
        if binary is None:
            raise RuntimeError("no chromium on PATH (apt-get install chromium)")
        self._profile = tempfile.TemporaryDirectory(prefix="kumex-chromium-",
                                                    ignore_cleanup_errors=True)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, *FLAGS, "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            start_new_session=True)  # its own process group: close() ends every helper
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start:\n{self.log_text()}")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])

    def page(self, url: str) -> Page:
        target = httpx.put(f"http://127.0.0.1:{self.port}/json/new?{url}", timeout=30).json()
        page = Page(target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        return page

    def log_text(self) -> str:
        return re.sub(r"\s+\n", "\n", read_shared(self._log).decode(errors="replace"))[-5000:]

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        time.sleep(0.2)  # let the renderers, zygote and crashpad go before the profile
        self._log.close()
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
