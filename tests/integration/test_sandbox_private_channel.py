"""The sandbox's private order channel (``/contractMarket/tradeOrders``), over real sockets.

A ``bullet-private`` token belongs to the signing key's account: its connection
is told of that account's orders, in the venue's ``orderChange`` shape, and of
no one else's. The sandbox is a real process of this module's own, its flow
paused and its book emptied at start (hidden orders too), so that two
accounts' orders meet only each other; clients are the ``websockets`` library.
Waits are bounded by a safety ceiling, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from kumex_l3.messages import PRIVATE_TOPIC, parse_order_change
from kumex_l3.testing.sandbox_proc import (
    DEMO_KEY_1,
    DEMO_KEY_2,
    SANDBOX_TEST_ENV,
    DemoKey,
    KcAuth,
    SandboxProcess,
)

SYM = "XBTUSDM"
SAFETY_S = 10.0  # a ceiling against a hang, never a measurement
#: Every field of an order change (docs/protocol.md §8), and those only a match carries.
FIELDS = {"orderId", "symbol", "type", "status", "orderType", "side", "price", "size",
          "remainSize", "filledSize", "canceledSize", "clientOid", "orderTime", "ts"}
MATCH_FIELDS = {"matchSize", "matchPrice", "tradeId", "liquidity"}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProcess]:
    """This module's sandbox: one contract, no flow, an empty book."""
    with SandboxProcess({**SANDBOX_TEST_ENV, "SANDBOX_SYMBOLS": SYM}) as venue:
        for side in ("sell", "buy"):  # demo-2 takes every primed order, hidden ones too
            _place(venue, DEMO_KEY_2, side=side, type="market", size=5_000_000)
        with httpx.Client(base_url=venue.base_url, timeout=10) as control:
            book = control.get(f"/sandbox/book/{SYM}").json()
            assert book["bids"] == [] and book["asks"] == []  # hidden ones went first
        yield venue


def _token(sandbox: SandboxProcess, key: DemoKey | None) -> tuple[str, str]:
    path = "/api/v1/bullet-public" if key is None else "/api/v1/bullet-private"
    with httpx.Client(base_url=sandbox.base_url, timeout=10,
                      auth=None if key is None else KcAuth(key)) as http:
        data = http.post(path).raise_for_status().json()["data"]
    return data["token"], data["instanceServers"][0]["endpoint"]


@asynccontextmanager
async def _socket(sandbox: SandboxProcess, key: DemoKey | None) -> AsyncIterator[ClientConnection]:
    token, endpoint = _token(sandbox, key)
    async with connect(f"{endpoint}?token={token}&connectId={uuid.uuid4().hex}") as ws:
        assert (await _recv(ws))["type"] == "welcome"
        yield ws


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(SAFETY_S):
        reply: dict[str, Any] = json.loads(await ws.recv())
        return reply


async def _ask(ws: ClientConnection, topic: str, *, private: bool = True) -> dict[str, Any]:
    await ws.send(json.dumps({"id": "s1", "type": "subscribe", "topic": topic,
                              "privateChannel": private, "response": True}))
    return await _recv(ws)


async def _changes(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [await _recv(ws) for _ in range(n)]


async def _quiet(ws: ClientConnection) -> bool:
    """True when nothing arrives for a while (what another account must not be told)."""
    try:
        async with asyncio.timeout(0.5):
            await ws.recv()
    except TimeoutError:
        return True
    return False


def _place(sandbox: SandboxProcess, key: DemoKey, **body: Any) -> str:
    with httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(key)) as http:
        body = {"clientOid": uuid.uuid4().hex, "symbol": SYM, "leverage": "5", **body}
        return str(http.post("/api/v1/orders", json=body).raise_for_status()
                   .json()["data"]["orderId"])


def _cancel_all(sandbox: SandboxProcess) -> None:
    """No resting order of either account in ``SYM`` (the sandbox is shared): a sweep then
    meets only this test's orders of theirs."""
    for key in (DEMO_KEY_1, DEMO_KEY_2):
        with httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(key)) as http:
            http.delete("/api/v1/orders", params={"symbol": SYM}).raise_for_status()


async def test_an_account_is_told_of_its_own_orders_and_of_no_one_elses(
        sandbox: SandboxProcess) -> None:
    _cancel_all(sandbox)
    async with _socket(sandbox, DEMO_KEY_1) as mine, _socket(sandbox, DEMO_KEY_2) as theirs:
        assert (await _ask(mine, PRIVATE_TOPIC))["type"] == "ack"
        assert (await _ask(theirs, PRIVATE_TOPIC))["type"] == "ack"
        price = "30000.0"  # the book is empty: only these two orders meet
        maker = _place(sandbox, DEMO_KEY_1, side="buy", price=price, size=10)
        (opened,) = await _changes(mine, 1)
        assert (opened["topic"], opened["subject"], opened["channelType"]) == (
            PRIVATE_TOPIC, "orderChange", "private")
        data = opened["data"]
        assert set(data) >= FIELDS
        assert (data["orderId"], data["type"], data["status"], data["size"],
                data["remainSize"], data["filledSize"], data["price"], data["side"]) == (
            maker, "open", "open", "10", "10", "0", price, "buy")
        assert await _quiet(theirs)
        # demo-2 takes 6 of it with an IOC: one trade, told to each side as its own.
        taker = _place(sandbox, DEMO_KEY_2, side="sell", price=price, size=6,
                       timeInForce="IOC")
        (match,) = await _changes(mine, 1)
        their_match, their_done = await _changes(theirs, 2)
        m, t = match["data"], their_match["data"]
        assert set(m) >= MATCH_FIELDS and set(t) >= MATCH_FIELDS
        assert (m["orderId"], m["type"], m["status"], m["liquidity"], m["matchSize"],
                m["filledSize"], m["remainSize"]) == (maker, "match", "open", "maker", "6",
                                                      "6", "4")
        assert (t["orderId"], t["status"], t["liquidity"], t["tradeId"], t["ts"]) == (
            taker, "match", "taker", m["tradeId"], m["ts"])
        assert (their_done["data"]["type"], their_done["data"]["status"]) == ("filled", "done")
        # The cancel of the rest: canceled, with the size it took off the book.
        with httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(DEMO_KEY_1)) as http:
            http.delete(f"/api/v1/orders/{maker}").raise_for_status()
        (done,) = await _changes(mine, 1)
        assert (done["data"]["type"], done["data"]["status"], done["data"]["canceledSize"],
                done["data"]["remainSize"], done["data"]["filledSize"]) == (
            "canceled", "done", "4", "0", "6")
        assert await _quiet(theirs)
        # Every frame is what our own parser reads.
        for frame in (opened, match, done):
            change = parse_order_change(json.dumps(frame))
            assert change is not None and change.client_oid == frame["data"]["clientOid"]


async def test_a_contract_topic_and_what_is_refused(sandbox: SandboxProcess) -> None:
    async with _socket(sandbox, None) as public:
        refused = await _ask(public, PRIVATE_TOPIC)
        assert (refused["type"], refused["code"]) == ("error", 401)
    async with _socket(sandbox, DEMO_KEY_1) as ws:
        no_flag = await _ask(ws, PRIVATE_TOPIC, private=False)
        assert (no_flag["type"], no_flag["code"]) == ("error", 401)
        unknown = await _ask(ws, f"{PRIVATE_TOPIC}:NOPEUSDM")
        assert (unknown["type"], unknown["code"]) == ("error", 404)
        assert (await _ask(ws, f"{PRIVATE_TOPIC}:{SYM}"))["type"] == "ack"
        order = _place(sandbox, DEMO_KEY_1, side="buy", price="9000.0", size=1, hidden=True)
        (opened,) = await _changes(ws, 1)
        # A hidden order never shows on the public feed; its owner is told.
        assert (opened["topic"], opened["subject"], opened["data"]["orderId"],
                opened["data"]["type"]) == (f"{PRIVATE_TOPIC}:{SYM}", "symbolOrderChange",
                                            order, "open")
        # The public feed still works on a private connection (privateChannel true).
        assert (await _ask(ws, f"/contractMarket/level3v2:{SYM}"))["type"] == "ack"
        with httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(DEMO_KEY_1)) as http:
            http.delete(f"/api/v1/orders/{order}").raise_for_status()
        frames = [await _recv(ws), await _recv(ws)]
        # Its done on the public feed (a done for an order no book held), then its owner's.
        assert [f["subject"] for f in frames] == ["done", "symbolOrderChange"]
        assert frames[1]["data"]["type"] == "canceled"


async def test_every_private_token_of_an_account_is_told(sandbox: SandboxProcess) -> None:
    """Two tokens of one account, two connections: each is told of its orders."""
    key = DEMO_KEY_1
    async with _socket(sandbox, key) as a, _socket(sandbox, key) as b:
        for ws in (a, b):
            assert (await _ask(ws, PRIVATE_TOPIC))["type"] == "ack"
        order = _place(sandbox, key, side="sell", price="900000.0", size=1)
        for ws in (a, b):
            (opened,) = await _changes(ws, 1)
            assert opened["data"]["orderId"] == order
        with httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(key)) as http:
            http.delete(f"/api/v1/orders/{order}").raise_for_status()
        for ws in (a, b):
            assert (await _changes(ws, 1))[0]["data"]["type"] == "canceled"


async def test_tokens_never_reach_the_sandbox_log_even_with_access_logs_on() -> None:
    """A private token is a bearer credential for an account's order flow: uvicorn's access
    line of ``/endpoint?token=...`` is written with the token masked."""
    env = {"SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_ACCESS_LOG": "true",
           "SANDBOX_LOG_LEVEL": "debug"}
    with SandboxProcess(env) as sandbox:
        token, endpoint = _token(sandbox, DEMO_KEY_1)
        async with connect(f"{endpoint}?token={token}&connectId=logged") as ws:
            assert (await _recv(ws))["type"] == "welcome"
            assert (await _ask(ws, PRIVATE_TOPIC))["type"] == "ack"
        log = sandbox.log_text()
    assert "/endpoint?token=***" in log  # the access line is there, masked
    assert token not in log


async def test_the_position_channel_tells_the_position_after_each_fill(
        sandbox: SandboxProcess) -> None:
    """``/contract/position:SYM``: after a fill of the account, its position as
    ``GET /api/v1/position`` gives it (``position.change``, ``positionChange``)."""
    _cancel_all(sandbox)
    async with _socket(sandbox, DEMO_KEY_1) as ws, _socket(sandbox, DEMO_KEY_2) as other:
        assert (await _ask(ws, f"/contract/position:{SYM}"))["type"] == "ack"
        assert (await _ask(other, f"/contract/position:{SYM}"))["type"] == "ack"
        refused = await _ask(ws, "/contract/position:NOPEUSDM")
        assert (refused["type"], refused["code"]) == ("error", 404)
        _place(sandbox, DEMO_KEY_2, side="sell", price="31000.0", size=2)
        _place(sandbox, DEMO_KEY_1, side="buy", type="market", size=2)
        told, their = await _recv(ws), await _recv(other)
        assert (told["topic"], told["subject"], told["channelType"]) == (
            f"/contract/position:{SYM}", "position.change", "private")
        for key, frame in ((DEMO_KEY_1, told), (DEMO_KEY_2, their)):
            with httpx.Client(base_url=sandbox.base_url, timeout=10, auth=KcAuth(key)) as http:
                venue = http.get("/api/v1/position", params={"symbol": SYM}).json()["data"]
            data = frame["data"]
            assert data["changeReason"] == "positionChange"
            assert (data["currentQty"], data["avgEntryPrice"], data["currentCost"]) == (
                venue["currentQty"], venue["avgEntryPrice"], venue["currentCost"])
        assert told["data"]["currentQty"] - their["data"]["currentQty"] >= 4  # +2 and -2
        assert await _quiet(ws) and await _quiet(other)  # one fill: one change each
