"""The sandbox over TLS, as the venue serves it: HTTPS, and ``wss://`` with ``encrypt: true``.

A throwaway CA (kumex_l3.testing.tls) signs the sandbox's certificate for
127.0.0.1. Clients trust it only through the CA file they are given
(``KUMEX_CA_FILE`` for ours; ``SSL_CERT_FILE`` and ``REQUESTS_CA_BUNDLE`` for
KuCoin's own SDK, unchanged); none turns verification off, and without the CA
each one refuses the sandbox.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from kumex_l3 import OrderBook, keys, parse_message
from kumex_l3.config import tls_context
from kumex_l3.messages import PRIVATE_TOPIC
from kumex_l3.rest import KumexRestClient
from kumex_l3.testing.procs import ServiceProcess, wait_for
from kumex_l3.testing.sandbox_proc import DEMO_KEY_1, SandboxProcess
from kumex_l3.testing.tls import TlsFiles, make_tls
from kumex_l3.wsclient import ConnectError, WsClient, WsOptions, level3_topic
from tests.truth import assert_l3_equals_engine

SYM = "XBTUSDM"
SAFETY_S = 60.0  # a ceiling against hangs, never a measurement


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_sandbox(tls_files: TlsFiles) -> Iterator[SandboxProcess]:
    env = {"SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "23",
           "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0"}
    with SandboxProcess(env, tls=tls_files) as sandbox:
        yield sandbox


def _engine(sandbox: SandboxProcess, ca: Path) -> httpx.Client:
    return httpx.Client(base_url=sandbox.base_url, verify=tls_context(ca), timeout=30)


def _l3(book: OrderBook) -> dict[str, Any]:
    bids, asks = book.l3()
    return {"sequence": book.sequence,
            **{side: [{"price": lv.text, "orders": [{"orderId": o.order_id, "size": str(o.size)}
                                                    for o in lv.orders]} for lv in levels]
               for side, levels in (("bids", bids), ("asks", asks))}}


def _book_from(frames: list[str], snapshot: dict[str, Any]) -> OrderBook:
    book = OrderBook.from_snapshot(snapshot)
    for frame in frames:
        book.apply(parse_message(frame))  # type: ignore[arg-type]
    book.check()
    return book


def test_https_and_wss_with_the_ca_only(tls_sandbox: SandboxProcess,
                                        tls_files: TlsFiles) -> None:
    """HTTPS answers a client given the CA, and a client without it refuses the sandbox;
    bullet-public advertises the venue's wss:// with encrypt true."""
    with _engine(tls_sandbox, tls_files.ca) as http:
        assert http.get("/api/v1/timestamp").json()["code"] == "200000"
        server = http.post("/api/v1/bullet-public").json()["data"]["instanceServers"][0]
    assert tls_sandbox.base_url.startswith("https://")
    assert server["endpoint"] == f"wss://127.0.0.1:{tls_sandbox.port}/endpoint"
    assert server["encrypt"] is True
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_sandbox.base_url}/api/v1/timestamp", timeout=10)


async def test_our_clients_over_tls_build_the_engines_book(tls_sandbox: SandboxProcess,
                                                           tls_files: TlsFiles) -> None:
    """kumex_l3's WsClient and KumexRestClient, given the CA (``KUMEX_CA_FILE``): a book
    from wss:// frames and one HTTPS snapshot equals the engine's; without the CA, the
    connection is refused with a clear error."""
    tls = tls_context(tls_files.ca)
    with _engine(tls_sandbox, tls_files.ca) as http:
        async with WsClient(tls_sandbox.base_url, options=WsOptions(tls=tls)) as ws, \
                KumexRestClient(tls_sandbox.base_url, tls=tls) as rest, \
                ws.connect([level3_topic(SYM)]) as conn:
            http.post("/sandbox/flow/resume", json={"rate": 300}).raise_for_status()
            frames = [await asyncio.wait_for(conn.recv(), SAFETY_S) for _ in range(200)]
            snapshot = await rest.level3_snapshot(SYM)
            frames += [await asyncio.wait_for(conn.recv(), SAFETY_S) for _ in range(200)]
            http.post("/sandbox/flow/pause").raise_for_status()
            target = int(http.get("/sandbox/state").json()["sequences"][SYM])
            while parse_message(frames[-1]).sequence < target:
                frames.append(await asyncio.wait_for(conn.recv(), SAFETY_S))
            engine = http.get(f"/sandbox/book/{SYM}").json()
    assert_l3_equals_engine(_l3(_book_from(frames, snapshot)), engine)
    async with WsClient(tls_sandbox.base_url) as untrusting:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.fetch_bullet()
    # The token over HTTPS with the CA, then the wss:// endpoint without it.
    async with httpx.AsyncClient(verify=tls) as token_http, \
            WsClient(tls_sandbox.base_url, http=token_http,
                     options=WsOptions(tls=tls_context())) as ws:
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            async with ws.connect([level3_topic(SYM)]):
                pass


def test_the_feed_writes_the_stream_from_wss(tls_sandbox: SandboxProcess, tls_files: TlsFiles,
                                             redis_url: str, redis_sync: redis.Redis) -> None:
    """The feed as users run it, pointed at an https:// venue with ``KUMEX_CA_FILE``."""
    env = {"REDIS_URL": redis_url, "KUMEX_SYMBOLS": SYM, "KUMEX_BASE_URL": tls_sandbox.base_url,
           "KUMEX_CA_FILE": str(tls_files.ca), "FEED_HTTP_HOST": "127.0.0.1",
           "FEED_SNAPSHOT_PER_MIN": "0"}
    with ServiceProcess("services.feed", env, port_var="FEED_HTTP_PORT", name="feed-tls") as feed, \
            _engine(tls_sandbox, tls_files.ca) as http:
        wait_for(lambda: redis_sync.xlen(keys.l3_stream(SYM)) > 0, "the feed's first entry",
                 timeout=SAFETY_S, proc=feed)
        http.post("/sandbox/flow/resume", json={"rate": 200}).raise_for_status()
        wait_for(lambda: any(b"msg" in fields for _, fields in
                             redis_sync.xrevrange(keys.l3_stream(SYM), count=5)),
                 "messages from wss://", timeout=SAFETY_S, proc=feed)
        http.post("/sandbox/flow/pause").raise_for_status()
        assert "CERTIFICATE" not in feed.log_text()


# --------------------------------------------------------------------------- official SDK

def _sdk(name: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the SDK imports pkg_resources
            return importlib.import_module(name)
    except Exception as exc:
        pytest.skip(f"kucoin-futures-python is not usable: {exc!r}")


def _trusting_sdk(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """The SDK's ``client`` and ``ws_client`` modules, trusting the throwaway CA through
    the environment only."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))  # websockets' default context
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_files.ca))  # the SDK's REST (requests)
    return _sdk("kucoin_futures.client"), _sdk("kucoin_futures.ws_client")


def _collector() -> tuple[list[dict[str, Any]], asyncio.Event,
                          Callable[[dict[str, Any]], Awaitable[None]]]:
    """Frames an SDK callback receives, and an event set at each."""
    frames: list[dict[str, Any]] = []
    got = asyncio.Event()

    async def on_message(msg: dict[str, Any]) -> None:
        frames.append(msg)
        got.set()

    return frames, got, on_message


async def test_official_sdk_websocket_client_over_tls_builds_the_engines_book(
        tls_sandbox: SandboxProcess, tls_files: TlsFiles,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """KuCoin's kucoin-futures-python 1.0.14, unchanged: its WebSocket client (which
    connects with ``ssl=encrypt``) and its REST snapshot, trusting the throwaway CA
    through the environment only, give a book equal to the engine's."""
    client, ws_client = _trusting_sdk(tls_files, monkeypatch)
    frames, got, on_message = _collector()
    sdk_ws = await ws_client.KucoinFuturesWsClient.create(
        None, client.WsToken(url=tls_sandbox.base_url), on_message)
    with _engine(tls_sandbox, tls_files.ca) as http:
        try:
            await sdk_ws.subscribe(f"/contractMarket/level3v2:{SYM}")
            http.post("/sandbox/flow/resume", json={"rate": 300}).raise_for_status()
            await wait_until(lambda: len(frames) >= 200, got)
            market = client.Market(url=tls_sandbox.base_url)
            snapshot = await asyncio.to_thread(market.l3_order_book_v2, SYM)
            count = len(frames)
            await wait_until(lambda: len(frames) >= count + 200, got)
            http.post("/sandbox/flow/pause").raise_for_status()
            target = int(http.get("/sandbox/state").json()["sequences"][SYM])
            await wait_until(lambda: int(frames[-1]["data"]["sequence"]) >= target, got)
            engine = http.get(f"/sandbox/book/{SYM}").json()
        finally:
            await _close_sdk(sdk_ws)
    texts = [json.dumps(f) for f in frames]
    assert_l3_equals_engine(_l3(_book_from(texts, snapshot)), engine)


async def test_official_sdk_private_websocket_client_is_told_of_its_orders(
        tls_sandbox: SandboxProcess, tls_files: TlsFiles,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same SDK's private client (a ``bullet-private`` token, ``privateChannel``
    true) on ``/contractMarket/tradeOrders``: its orders placed through its own Trade
    client come back as ``orderChange`` open, then canceled."""
    client, ws_client = _trusting_sdk(tls_files, monkeypatch)
    creds = {"key": DEMO_KEY_1.key, "secret": DEMO_KEY_1.secret,
             "passphrase": DEMO_KEY_1.passphrase, "url": tls_sandbox.base_url}
    frames, got, on_message = _collector()
    sdk_ws = await ws_client.KucoinFuturesWsClient.create(
        None, client.WsToken(**creds), on_message, private=True)
    try:
        await sdk_ws.subscribe(PRIVATE_TOPIC)
        trade = client.Trade(**creds)
        placed = await asyncio.to_thread(trade.create_limit_order, SYM, "sell", "5", 2,
                                         "900000.0", clientOid="sdk-private-1")
        await wait_until(lambda: len(frames) >= 1, got)
        await asyncio.to_thread(trade.cancel_order, placed["orderId"])
        await wait_until(lambda: len(frames) >= 2, got)
    finally:
        await _close_sdk(sdk_ws)
    assert [(f["subject"], f["data"]["orderId"], f["data"]["clientOid"], f["data"]["type"])
            for f in frames] == [("orderChange", placed["orderId"], "sdk-private-1", "open"),
                                 ("orderChange", placed["orderId"], "sdk-private-1",
                                  "canceled")]


async def _close_sdk(sdk_ws: Any) -> None:
    """The SDK has no close: its tasks (started with ensure_future, no reference kept)
    reconnect forever, and its read loop swallows CancelledError. Stop the reconnecting,
    then close the socket so that the read loop ends."""
    sdk_tasks = [t for t in asyncio.all_tasks() if "ConnectWebsocket." in repr(t.get_coro())]
    for task in sdk_tasks:
        if "run_forever" in repr(task.get_coro()):
            task.cancel()
    if sdk_ws._conn._socket is not None:
        await sdk_ws._conn._socket.close()
    async with asyncio.timeout(SAFETY_S):
        await asyncio.gather(*sdk_tasks, return_exceptions=True)


async def wait_until(check: Any, event: asyncio.Event) -> None:
    async with asyncio.timeout(SAFETY_S):
        while not check():
            event.clear()
            await event.wait()
