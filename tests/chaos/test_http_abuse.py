"""HTTP and WebSocket abuse of the book service (a real process on a synced book).

The book is built from :class:`~kumex_l3.testing.synthetic.StreamGenerator` messages
written into Redis by the test (a stored snapshot, then the stream after it):
no exchange, no feed.

* schemathesis generates requests from the service's own OpenAPI schema
  (valid and invalid parameters) for every operation: no answer is a 5xx;
* hand-made hostile requests (overlong paths and headers, bad encodings,
  absurd numbers, every method on every path): no 5xx, and no path accepts
  anything but GET: the service has no write endpoint;
* 200 WebSocket clients that never read, plus clients that connect and drop
  at once, while messages flow: the book keeps applying (its sequence reaches
  the end of what was written), every session ends once its client is gone,
  and the process's RSS stays bounded.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings

from kumex_l3 import keys
from kumex_l3.testing.devredis import RedisServer
from kumex_l3.testing.procs import flush_redis, metric, wait_for
from kumex_l3.testing.synthetic import StreamGenerator
from tests.chaos.conftest import SYM, book_process

#: Examples schemathesis generates per operation and mode (positive, negative): 40 in CI,
#: a tenth of ``KUMEX_FUZZ_EXAMPLES`` when that is set higher (``make chaos``).
SCHEMA_EXAMPLES: Final = max(40, int(os.environ.get("KUMEX_FUZZ_EXAMPLES", "0")) // 10)
#: WebSocket clients that connect and never read.
SILENT_CLIENTS: Final = 200
#: Connect-and-drop cycles.
CHURN: Final = 300
#: Messages written while the clients abuse the socket.
FLOW_MESSAGES: Final = 30_000
#: Allowed RSS growth of the book process over the abuse (generous: a bound, not a speed).
RSS_BOUND_MB: Final = 200

_METHODS: Final = ("POST", "PUT", "PATCH", "DELETE")


class BookUnderTest:
    """A book process fed by the test through Redis."""

    def __init__(self, redis_url: str) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.gen = StreamGenerator(SYM, seed=11, start_sequence=3_000_000, target_orders=400,
                                   levels=80)
        self.gen.take(4000)
        self.gen.flush()
        self.redis.set(keys.snapshot(SYM), _json(self.gen.snapshot()))
        self.write(2000)
        # The stream is written here, not by the feed: no heartbeat to watch.
        self.proc = book_process(redis_url, "chaos-http-book", BOOK_WS_THROTTLE_SECONDS="0.05",
                                 BOOK_FEED_CHECK_SECONDS="0")

    def write(self, n: int) -> int:
        """Append ``n`` generated messages to the stream; the last sequence written."""
        texts = self.gen.take(n) + self.gen.flush()
        with self.redis.pipeline(transaction=False) as pipe:
            for text in texts:
                pipe.xadd(keys.l3_stream(SYM), {keys.FIELD_MSG: text})
            pipe.execute()
        return self.gen.sequence

    @property
    def url(self) -> str:
        return self.proc.url

    def sequence(self) -> int | None:
        r = httpx.get(f"{self.url}/book/{SYM}", params={"depth": 1}, timeout=10)
        return int(r.json()["sequence"]) if r.status_code == 200 else None

    def wait_sequence(self, target: int) -> None:
        wait_for(lambda: self.sequence() == target, f"the book at sequence {target}",
                 proc=self.proc)

    def rss_mb(self) -> float:
        assert self.proc.process is not None
        status = Path(f"/proc/{self.proc.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


@pytest.fixture(scope="module")
def book(redis_server: RedisServer) -> Iterator[BookUnderTest]:
    flush_redis(redis_server.url)
    under_test = BookUnderTest(redis_server.url)
    try:
        with under_test.proc:
            under_test.wait_sequence(under_test.gen.sequence)
            yield under_test
    finally:
        under_test.redis.close()


# --------------------------------------------------------------------------- HTTP


def test_schemathesis_finds_no_server_error(book: BookUnderTest) -> None:
    schema = schemathesis.openapi.from_url(f"{book.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /book/{symbol}", "GET /book/{symbol}/l3",
        "GET /book/{symbol}/orders/{order_id}", "GET /books", "GET /healthz", "GET /readyz"}
    failures: list[str] = []
    calls = 0
    for op in operations:
        modes = [schemathesis.GenerationMode.POSITIVE]
        if list(op.iter_parameters()):  # nothing to get wrong without parameters
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=SCHEMA_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(mode))
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                response = case.call(base_url=book.url, timeout=10)
                calls += 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {response.request.url} -> "
                                    f"{response.status_code} {response.text[:200]}")

            run()
    assert not failures, "\n".join(failures[:20])
    assert calls >= len(operations) * 2
    print(f"\nschemathesis {schemathesis.SCHEMATHESIS_VERSION}: {calls} requests over "
          f"{len(operations)} operations, no 5xx")


#: The one call of the book that changes something: off without BOOK_API_TOKEN.
_DRAIN: Final = ("/admin/drain", "post")


def test_no_write_endpoint(book: BookUnderTest) -> None:
    """Every operation reads, but the drain, which is refused without the token (and off
    while none is set, as here): whatever is sent to any path, nothing changes."""
    spec = httpx.get(f"{book.url}/openapi.json", timeout=10).json()
    methods = {(path, method) for path, item in spec["paths"].items() for method in item
               if method in {"get", "put", "post", "delete", "patch", "options", "head",
                             "trace"}}
    assert methods and all(method == "get" for _, method in methods - {_DRAIN}), methods
    with httpx.Client(base_url=book.url, timeout=10) as http:
        for path in [*spec["paths"], "/ws/book/{symbol}"]:
            concrete = path.replace("{symbol}", SYM).replace("{order_id}", "x")
            for method in _METHODS:
                r = http.request(method, concrete, content=b'{"bids":[]}',
                                 headers={"Authorization": "Bearer guess"})
                allowed = (403,) if (path, method.lower()) == _DRAIN else (404, 405)
                assert r.status_code in allowed, (method, concrete, r.status_code)
    assert book.sequence() == book.gen.sequence  # nothing changed
    assert httpx.get(f"{book.url}/book/{SYM}", timeout=10).status_code == 200


_HOSTILE_TARGETS: Final = [
    f"/book/{SYM}?depth=" + "9" * 5000,
    f"/book/{SYM}?depth=1e999999999",
    f"/book/{SYM}?depth=NaN",
    f"/book/{SYM}?depth=-0",
    f"/book/{SYM}?depth=%00",
    f"/book/{SYM}?depth=1&depth=2",
    f"/book/{SYM}/l3?depth=" + "1" * 100,
    f"/book/{SYM}/orders/" + "a" * 100,
    f"/book/{SYM}/orders/" + "a" * 101,
    f"/book/{SYM}/orders/%ff%fe",
    f"/book/{SYM}/orders/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    f"/book/{SYM}/orders/%00",
    "/book/%ff",
    "/book/" + "X" * 10_000,
    "/books?" + "a=1&" * 2000,
    "/%",
    "/../../etc/passwd",
    "/metrics?name[]=" + "x" * 1000,
    "/openapi.json?" + "%" * 100,
]


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_hostile_requests_get_no_server_error(book: BookUnderTest) -> None:
    port = book.proc.port
    answers: dict[str, bytes] = {}
    for target in _HOSTILE_TARGETS:
        answers[target[:60]] = _raw_request(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n"
                                                  "Connection: close\r\n\r\n".encode())
    raw: list[tuple[str, bytes]] = [
        ("non-utf8 path", b"GET /book/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("huge header", b"GET /books HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000
         + b"\r\nConnection: close\r\n\r\n"),
        ("many headers", b"GET /books HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-%d: 1\r\n" % i for i in range(2000)) + b"Connection: close\r\n\r\n"),
        ("bad version", b"GET /books HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100
         + b"\r\n\r\n"),
        ("lying content-length", b"GET /books HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999"
         b"\r\nConnection: close\r\n\r\nabc"),
        ("proxy header loop", f"GET /book/{SYM} HTTP/1.1\r\nHost: x\r\n"
         "X-Kumex-Proxied-By: chaos\r\nConnection: close\r\n\r\n".encode()),
        ("ws upgrade, bad key", f"GET /ws/book/{SYM}?depth=0 HTTP/1.1\r\nHost: x\r\n"
         "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: !!\r\n"
         "Sec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n".encode()),
    ]
    for name, request in raw:
        try:
            answers[name] = _raw_request(port, request)
        except (ConnectionResetError, BrokenPipeError):
            answers[name] = b""  # the server hung up: fine
    for name, answer in answers.items():
        status_line = answer.split(b"\r\n", 1)[0]
        if status_line.startswith(b"HTTP/1.1 "):
            code = int(status_line.split()[1])
            assert code < 500, (name, status_line)
    book.proc.check_running()
    assert book.proc.healthy()
    assert book.sequence() == book.gen.sequence


# --------------------------------------------------------------------------- WebSocket


def _handshake(port: int, depth: int = 1000) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (f"GET /ws/book/{SYM}?depth={depth} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n").encode() + \
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"


def _silent_client(port: int) -> socket.socket:
    """Connects, asks for the socket, and never reads a byte (a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(_handshake(port))
    return sock


def _churn(port: int, n: int, errors: list[BaseException]) -> None:
    """Connect and drop at once, ``n`` times: half with a reset, half after the 101."""
    import struct

    try:
        for i in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(10)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(_handshake(port, depth=1 + i % 50))
                if i % 2:
                    sock.recv(1024)  # the 101 (and maybe a first push), then a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # the server may drop a half-open client: what we test is the server
            finally:
                sock.close()
    except BaseException as exc:  # pragma: no cover - surfaced by the test
        errors.append(exc)


def test_websocket_abuse_while_messages_flow(book: BookUnderTest) -> None:
    port = book.proc.port
    rss_before = book.rss_mb()
    clients_before = metric(book.url, "kumex_book_ws_clients")
    silent: list[socket.socket] = []
    errors: list[BaseException] = []
    last = book.gen.sequence
    try:
        for _ in range(SILENT_CLIENTS):
            silent.append(_silent_client(port))
        wait_for(lambda: metric(book.url, "kumex_book_ws_clients")
                 >= clients_before + SILENT_CLIENTS, f"{SILENT_CLIENTS} silent clients",
                 proc=book.proc)
        churners = [threading.Thread(target=_churn, args=(port, CHURN // 2, errors))
                    for _ in range(2)]
        for thread in churners:
            thread.start()
        pause = threading.Event()
        for _ in range(FLOW_MESSAGES // 500):
            last = book.write(500)
            pause.wait(0.05)  # a flow, not one burst: pushes go out all along
        for thread in churners:
            thread.join()
        book.wait_sequence(last)
        rss_during = book.rss_mb()
        book.proc.check_running()
    finally:
        for sock in silent:
            sock.close()
    assert not errors, errors
    # Every session ended once its client was gone: nothing left behind.
    wait_for(lambda: metric(book.url, "kumex_book_ws_clients") == clients_before,
             "every WebSocket session to end", proc=book.proc)
    last = book.write(500)
    book.wait_sequence(last)
    rss_after = book.rss_mb()
    dropped = metric(book.url, "kumex_book_ws_dropped_total")
    print(f"\nbook RSS {rss_before:.0f} MB -> {rss_during:.0f} MB with {SILENT_CLIENTS} silent "
          f"clients -> {rss_after:.0f} MB after; {dropped:.0f} slow clients dropped; "
          f"sequence {last}")
    assert rss_during - rss_before < RSS_BOUND_MB
    assert rss_after - rss_before < RSS_BOUND_MB
    assert book.proc.healthy()
