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
import hashlib
import hmac
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Self

import httpx

from kumex_l3.config import tls_context
from kumex_l3.errors import SandboxStartError
from kumex_l3.testing.devredis import free_port
from kumex_l3.testing.procs import ServiceProcess
from kumex_l3.testing.tls import TlsFiles

__all__ = [
    "DEMO_KEY_1",
    "DEMO_KEY_2",
    "SANDBOX_TEST_ENV",
    "DemoKey",
    "KcAuth",
    "SandboxProcess",
    "SandboxStartError",
    "free_port",
    "queue_ahead",
    "sweep_through",
]

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


#: Start-up settings of the integration tests' sandboxes: no background flow (tests
#: step it), no snapshot limit (tests that need one turn it on), a short REST latency.
SANDBOX_TEST_ENV = {
    "SANDBOX_FLOW_RATE": "0",
    "SANDBOX_SEED": "7",
    "SANDBOX_START_SEQUENCE": "1000000",
    "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0",
    "SANDBOX_REST_LATENCY_MS": "5",
}


class SandboxProcess(ServiceProcess):
    """``python -m services.sandbox`` on a free port, as a context manager.

    ``env``: ``SANDBOX_*`` settings (and anything else) for the child, over
    the parent's environment minus its ``SANDBOX_*``. ``SANDBOX_HOST`` and
    ``SANDBOX_PORT`` are chosen here unless given. Start-up failures raise
    :class:`SandboxStartError`; a port taken meanwhile is retried. ``tls``: serve
    HTTPS and WSS with these files (:func:`kumex_l3.testing.tls.make_tls`).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
        tls: TlsFiles | None = None,
    ) -> None:
        given = dict(env or {})
        if tls is not None:
            given.update(SANDBOX_TLS_CERT=str(tls.cert), SANDBOX_TLS_KEY=str(tls.key))
        self._fixed_port = "SANDBOX_PORT" in given
        host = given.setdefault("SANDBOX_HOST", "127.0.0.1")
        given.setdefault("SANDBOX_PORT", "0")
        super().__init__("services.sandbox", given, port_var="SANDBOX_PORT", prefix="SANDBOX_",
                         host=host, start_timeout=startup_timeout_s,
                         stop_timeout=stop_timeout_s, check_stop=False)
        if tls is not None:
            self.scheme, self.verify = "https", tls_context(tls.ca)

    @property
    def base_url(self) -> str:
        """``http(s)://host:port`` of the REST API (the ``KUMEX_BASE_URL`` to give clients)."""
        return self.url

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint (clients should take it from bullet-public instead)."""
        scheme = "wss" if self.scheme == "https" else "ws"
        return f"{scheme}://{self.host}:{self.port}/endpoint"

    def start(self, *, wait: bool = True) -> Self:
        """Launch and wait until ready; a port taken meanwhile is retried."""
        last_error: SandboxStartError | None = None
        for _ in range(1 if self._fixed_port else 3):
            if not self._fixed_port:
                self.port = free_port(self.host)
                self.env["SANDBOX_PORT"] = str(self.port)
            try:
                return super().start(wait=wait)
            except AssertionError as exc:
                last_error = SandboxStartError(str(exc))
                self.stop()
                if "address already in use" not in str(exc).lower():
                    break
                self.close()  # a fresh log for the next attempt
        assert last_error is not None
        raise last_error


def queue_ahead(book: Mapping[str, Any], side: str, price: Decimal, order_id: str) -> int:
    """Visible size ahead of ``order_id`` in ``book`` (``GET /sandbox/book/{symbol}``):
    every better level of its ``side``, and the orders before it in its own queue."""
    ahead = 0
    for level in book["bids" if side == "buy" else "asks"]:
        level_price = Decimal(level["price"])
        if (level_price > price) if side == "buy" else (level_price < price):
            ahead += int(level["size"])
        elif level_price == price:
            for resting in level["orders"]:
                if resting["orderId"] == order_id:
                    break
                ahead += int(resting["size"])
    return ahead


def sweep_through(control: httpx.Client, taker: httpx.Client, symbol: str, *, side: str,
                  price: Decimal, order_id: str, take: int, client_oid: str,
                  leverage: str = "5") -> httpx.Response:
    """Another user (``taker``, signed) sends an IOC at ``price`` against the order
    ``order_id`` resting on ``side``: everything visible ahead of it and ``take`` of it
    (hidden orders at better prices, which no book shows, take their share first)."""
    book = control.get(f"/sandbox/book/{symbol}").json()
    size = queue_ahead(book, side, price, order_id) + take
    return taker.post("/api/v1/orders", json={
        "clientOid": client_oid, "symbol": symbol, "side": "sell" if side == "buy" else "buy",
        "price": f"{price:f}", "size": size, "leverage": leverage, "type": "limit",
        "timeInForce": "IOC"})
