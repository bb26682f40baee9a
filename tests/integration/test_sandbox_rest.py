"""The sandbox's REST and control APIs over real HTTP, against a real sandbox process.

Every endpoint with good and bad input: envelopes and codes of kumex-api.md,
never a 422 or a bare 500. The shared sandbox (``sandbox`` fixture) runs with
its flow paused, so its book only moves when a test acts or steps the flow.
Waits are bounded by safety timeouts, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from kumex_l3.testing.procs import wait_for
from kumex_l3.testing.sandbox_proc import DEMO_KEY_1, DEMO_KEY_2, KcAuth, SandboxProcess

SYMBOL = "XBTUSDM"
SAFETY_S = 10.0  # a ceiling against a hang, never a measurement


@pytest.fixture
def http(sandbox: SandboxProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.base_url, timeout=SAFETY_S) as client:
        yield client


@pytest.fixture
def user1() -> KcAuth:
    return KcAuth(DEMO_KEY_1)


@pytest.fixture
def user2() -> KcAuth:
    return KcAuth(DEMO_KEY_2)


def coid(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def data(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == "200000", body
    return body["data"]


def error(response: httpx.Response) -> tuple[int, str]:
    """HTTP status and venue code of a failure; the body must be exactly the envelope."""
    body = response.json()
    assert set(body) == {"code", "msg"}, body
    assert isinstance(body["msg"], str) and body["msg"]
    return response.status_code, body["code"]


def post_json(http: httpx.Client, path: str, payload: Any, auth: KcAuth) -> httpx.Response:
    """POST ``payload`` as compact JSON text (what gets signed is exactly what is sent)."""
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http.post(path, content=content, auth=auth, headers={"Content-Type": "application/json"})


def best_prices(http: httpx.Client, symbol: str = SYMBOL) -> tuple[float, float]:
    snap = http.get(f"/sandbox/snapshot/{symbol}").json()
    return float(snap["bids"][0][1]), float(snap["asks"][0][1])


def passive_buy(http: httpx.Client, symbol: str = SYMBOL, ticks_below: int = 50) -> str:
    """A limit price that rests on the bid side without crossing."""
    bid, _ = best_prices(http, symbol)
    tick = 0.01 if symbol == "ETHUSDTM" else 0.1
    return f"{bid - ticks_below * tick:.{2 if tick == 0.01 else 1}f}"


def limit_order(price: str, client_oid: str, **extra: Any) -> dict[str, Any]:
    order = {
        "clientOid": client_oid,
        "side": "buy",
        "symbol": SYMBOL,
        "leverage": "5",
        "type": "limit",
        "price": price,
        "size": 3,
    }
    order.update(extra)
    return order


@pytest.fixture
def clean(http: httpx.Client, user1: KcAuth, user2: KcAuth) -> None:
    """Both demo users start without open orders."""
    data(http.delete("/api/v1/orders", auth=user1))
    data(http.delete("/api/v1/orders", auth=user2))


# ---------------------------------------------------------------------- public


def test_timestamp_is_server_ms(http: httpx.Client) -> None:
    ts = data(http.get("/api/v1/timestamp"))
    assert isinstance(ts, int)
    assert abs(ts - time.time_ns() // 1_000_000) < 60_000  # same clock, not a duration


def test_contracts_active_and_detail(http: httpx.Client) -> None:
    contracts = data(http.get("/api/v1/contracts/active"))
    assert [c["symbol"] for c in contracts] == ["XBTUSDM", "XBTUSDTM", "ETHUSDTM"]
    xbt = data(http.get("/api/v1/contracts/XBTUSDM"))
    assert xbt["baseCurrency"] == "XBT" and xbt["quoteCurrency"] == "USD"
    assert xbt["settleCurrency"] == "XBT" and xbt["type"] == "FFWCSX"
    assert xbt["isInverse"] is True and xbt["multiplier"] == -1
    assert xbt["lotSize"] == 1 and xbt["tickSize"] == 0.1
    assert xbt["maxOrderQty"] == 10_000_000 and xbt["maxPrice"] == 1_000_000
    assert xbt["maxLeverage"] == 75 and xbt["status"] == "Open"
    assert xbt["makerFeeRate"] == 0.0002 and xbt["takerFeeRate"] == 0.0006
    assert isinstance(xbt["markPrice"], (int, float))
    usdt = data(http.get("/api/v1/contracts/XBTUSDTM"))
    assert usdt["multiplier"] == 0.001 and usdt["isInverse"] is False
    assert usdt["quoteCurrency"] == "USDT" and usdt["settleCurrency"] == "USDT"


def test_unknown_contract_is_404_200003(http: httpx.Client) -> None:
    assert error(http.get("/api/v1/contracts/DOGEUSDM")) == (404, "200003")


def test_unknown_paths_and_methods_get_envelopes(http: httpx.Client) -> None:
    assert error(http.get("/api/v1/nowhere")) == (404, "404000")
    assert error(http.put("/api/v1/timestamp"))[0] == 405
    assert error(http.get("/api/v1/contracts/"))[0] == 404


def test_bullet_public_gives_a_token_that_the_websocket_takes(
    http: httpx.Client, sandbox: SandboxProcess
) -> None:
    bullet = data(http.post("/api/v1/bullet-public"))
    assert isinstance(bullet["token"], str) and bullet["token"]
    (server,) = bullet["instanceServers"]
    assert server == {
        "endpoint": f"ws://127.0.0.1:{sandbox.port}/endpoint",
        "encrypt": False,
        "protocol": "websocket",
        "pingInterval": 18000,
        "pingTimeout": 10000,
    }

    async def welcome() -> dict[str, Any]:
        url = f"{server['endpoint']}?token={bullet['token']}&connectId=c-1"
        async with asyncio.timeout(SAFETY_S), connect(url) as ws:
            return dict(json.loads(await ws.recv()))

    assert asyncio.run(welcome()) == {"id": "c-1", "type": "welcome"}


def test_bullet_private_needs_a_signature(http: httpx.Client, user1: KcAuth) -> None:
    assert error(http.post("/api/v1/bullet-private")) == (401, "400001")
    assert data(http.post("/api/v1/bullet-private", auth=user1))["token"]


def test_status(http: httpx.Client) -> None:
    assert data(http.get("/api/v1/status"))["status"] == "open"


# ---------------------------------------------------------------------- snapshot


def test_snapshot_shape(http: httpx.Client) -> None:
    snap = data(http.get("/api/v2/level3/snapshot", params={"symbol": SYMBOL}))
    assert snap["symbol"] == SYMBOL
    assert isinstance(snap["sequence"], int) and isinstance(snap["ts"], int)
    assert snap["asks"] and snap["bids"]
    for row in snap["asks"] + snap["bids"]:
        order_id, price, size, ts = row
        assert isinstance(order_id, str) and isinstance(price, str) and isinstance(size, str)
        assert isinstance(ts, int) and int(size) > 0
    assert float(snap["bids"][0][1]) < float(snap["asks"][0][1])


def test_snapshot_bad_input(http: httpx.Client) -> None:
    assert error(http.get("/api/v2/level3/snapshot")) == (400, "400100")
    assert error(http.get("/api/v2/level3/snapshot", params={"symbol": "NOPE"})) == (400, "200003")


def test_snapshot_rate_limit_per_client(http: httpx.Client) -> None:
    http.post("/sandbox/faults", json={"snapshot_rate_per_min": 1}).raise_for_status()
    url = "/api/v2/level3/snapshot?symbol=XBTUSDM"
    data(http.get(url))
    limited = http.get(url)
    assert error(limited) == (429, "429000")
    assert int(limited.headers["Retry-After"]) >= 1
    # The control API's snapshot is never limited.
    assert http.get("/sandbox/snapshot/XBTUSDM").status_code == 200
    counts = http.get("/sandbox/state").json()["counts"]
    assert counts["snapshots_rate_limited"] >= 1
    # 0 turns the limit off.
    http.post("/sandbox/faults", json={"snapshot_rate_per_min": 0}).raise_for_status()
    for _ in range(3):
        data(http.get(url))


def test_refused_snapshots_are_500_and_counted(http: httpx.Client) -> None:
    before = http.get("/sandbox/state").json()["counts"].get("snapshots_refused", 0)
    http.post("/sandbox/faults", json={"refuse_snapshots": True}).raise_for_status()
    assert error(http.get("/api/v2/level3/snapshot?symbol=XBTUSDM")) == (500, "500000")
    after = http.get("/sandbox/state").json()["counts"]["snapshots_refused"]
    assert after == before + 1
    http.post("/sandbox/faults", json={"refuse_snapshots": False}).raise_for_status()
    data(http.get("/api/v2/level3/snapshot?symbol=XBTUSDM"))


# ---------------------------------------------------------------------- orders


@pytest.mark.usefixtures("clean")
def test_place_then_visible_by_client_oid_and_id(http: httpx.Client, user1: KcAuth) -> None:
    client_oid = coid()
    price = passive_buy(http)
    placed = data(post_json(http, "/api/v1/orders", limit_order(price, client_oid), user1))
    assert set(placed) == {"orderId", "clientOid"} and placed["clientOid"] == client_oid

    by_coid = data(
        http.get("/api/v1/orders/byClientOid", params={"clientOid": client_oid}, auth=user1)
    )
    assert by_coid["id"] == placed["orderId"]
    assert by_coid["clientOid"] == client_oid and by_coid["symbol"] == SYMBOL
    assert by_coid["status"] == "open" and by_coid["isActive"] is True
    assert by_coid["side"] == "buy" and by_coid["type"] == "limit"
    assert by_coid["price"] == price and by_coid["size"] == 3 and by_coid["filledSize"] == 0
    assert by_coid["leverage"] == "5" and by_coid["timeInForce"] == "GTC"
    for field in ("filledValue", "cancelExist", "createdAt", "updatedAt", "orderTime", "postOnly"):
        assert field in by_coid

    by_id = data(http.get(f"/api/v1/orders/{placed['orderId']}", auth=user1))
    assert by_id == by_coid
    book = http.get(f"/sandbox/book/{SYMBOL}").json()
    resting = {o["orderId"] for level in book["bids"] for o in level["orders"]}
    assert placed["orderId"] in resting


@pytest.mark.usefixtures("clean")
def test_orders_are_scoped_to_the_key_user(
    http: httpx.Client, user1: KcAuth, user2: KcAuth
) -> None:
    client_oid = coid()
    placed = data(
        post_json(http, "/api/v1/orders", limit_order(passive_buy(http), client_oid), user1)
    )
    order_id = placed["orderId"]
    assert error(http.get(f"/api/v1/orders/{order_id}", auth=user2)) == (404, "100004")
    params = {"clientOid": client_oid}
    assert error(http.get("/api/v1/orders/byClientOid", params=params, auth=user2))[0] == 404
    assert error(http.delete(f"/api/v1/orders/{order_id}", auth=user2)) == (404, "100004")
    active2 = data(http.get("/api/v1/orders", params={"status": "active"}, auth=user2))
    assert order_id not in {o["id"] for o in active2["items"]}
    # user2 may use the same clientOid: it is per user.
    data(post_json(http, "/api/v1/orders", limit_order(passive_buy(http), client_oid), user2))


def test_order_body_validation(http: httpx.Client, user1: KcAuth) -> None:
    price = passive_buy(http)
    good = limit_order(price, coid())
    cases: list[Any] = [
        b"{not json",
        b"",
        b"[1, 2]",
        b'"a string"',
        {k: v for k, v in good.items() if k != "clientOid"},
        {k: v for k, v in good.items() if k != "leverage"},
        {k: v for k, v in good.items() if k != "side"},
        {k: v for k, v in good.items() if k != "size"},
        {k: v for k, v in good.items() if k != "price"},
        {**good, "clientOid": "x" * 41},
        {**good, "clientOid": "bad oid!"},
        {**good, "clientOid": 12345},
        {**good, "side": "long"},
        {**good, "type": "stop"},
        {**good, "size": "abc"},
        {**good, "size": 1.5},
        {**good, "size": True},
        {**good, "size": 0},
        {**good, "size": -3},
        {**good, "price": "cheap"},
        {**good, "price": [1]},
        {**good, "leverage": "high"},
        {**good, "postOnly": "maybe"},
        {**good, "timeInForce": "FOK"},
        {**good, "iceberg": True, "visibleSize": 1},
        {**good, "stop": "down", "stopPrice": "1"},
        {**good, "remark": 5},
    ]
    for case in cases:
        response = post_json(http, "/api/v1/orders", case, user1)
        assert error(response) == (400, "400100"), (case, response.text)


def test_order_values_outside_the_contract(http: httpx.Client, user1: KcAuth) -> None:
    price = passive_buy(http)
    assert error(
        post_json(http, "/api/v1/orders", {**limit_order(price, coid()), "symbol": "NOPE"}, user1)
    ) == (400, "200003")
    off_tick = f"{float(price) + 0.05:.2f}"
    assert error(post_json(http, "/api/v1/orders", limit_order(off_tick, coid()), user1)) == (
        400,
        "300000",
    )
    too_big = {**limit_order(price, coid()), "size": 10_000_001}
    assert error(post_json(http, "/api/v1/orders", too_big, user1)) == (400, "300000")
    leverage = {**limit_order(price, coid()), "leverage": 500}
    assert error(post_json(http, "/api/v1/orders", leverage, user1)) == (400, "300000")


@pytest.mark.usefixtures("clean")
def test_numbers_may_be_json_numbers_or_strings(http: httpx.Client, user1: KcAuth) -> None:
    price = passive_buy(http)
    order = {**limit_order(price, coid()), "price": float(price), "size": "2", "leverage": 10}
    placed = data(post_json(http, "/api/v1/orders", order, user1))
    got = data(http.get(f"/api/v1/orders/{placed['orderId']}", auth=user1))
    assert got["price"] == price and got["size"] == 2 and got["leverage"] == "10"


@pytest.mark.usefixtures("clean")
def test_duplicate_active_client_oid_is_300018(http: httpx.Client, user1: KcAuth) -> None:
    order = limit_order(passive_buy(http), coid())
    data(post_json(http, "/api/v1/orders", order, user1))
    assert error(post_json(http, "/api/v1/orders", order, user1)) == (400, "300018")


@pytest.mark.usefixtures("clean")
def test_cancel_by_id_twice_is_100004(http: httpx.Client, user1: KcAuth) -> None:
    placed = data(post_json(http, "/api/v1/orders", limit_order(passive_buy(http), coid()), user1))
    order_id = placed["orderId"]
    assert data(http.delete(f"/api/v1/orders/{order_id}", auth=user1)) == {
        "cancelledOrderIds": [order_id]
    }
    assert error(http.delete(f"/api/v1/orders/{order_id}", auth=user1)) == (400, "100004")
    done = data(http.get(f"/api/v1/orders/{order_id}", auth=user1))
    assert done["status"] == "done" and done["isActive"] is False and done["cancelExist"] is True
    assert error(http.delete("/api/v1/orders/000000000000000000000000", auth=user1)) == (
        404,
        "100004",
    )


@pytest.mark.usefixtures("clean")
def test_cancel_by_client_oid(http: httpx.Client, user1: KcAuth) -> None:
    client_oid = coid()
    data(post_json(http, "/api/v1/orders", limit_order(passive_buy(http), client_oid), user1))
    url = f"/api/v1/orders/client-order/{client_oid}"
    assert data(http.delete(url, params={"symbol": SYMBOL}, auth=user1)) == {
        "clientOid": client_oid
    }
    assert error(http.delete(url, params={"symbol": SYMBOL}, auth=user1)) == (400, "100004")
    assert error(http.delete(f"/api/v1/orders/client-order/{coid()}", auth=user1))[1] == "100004"
    assert error(http.delete(url, params={"symbol": "NOPE"}, auth=user1)) == (400, "200003")


@pytest.mark.usefixtures("clean")
def test_cancel_all_by_symbol_and_everywhere(http: httpx.Client, user1: KcAuth) -> None:
    ids = [
        data(post_json(http, "/api/v1/orders", limit_order(passive_buy(http), coid()), user1))[
            "orderId"
        ]
        for _ in range(2)
    ]
    eth = {
        **limit_order(passive_buy(http, "ETHUSDTM"), coid()),
        "symbol": "ETHUSDTM",
    }
    eth_id = data(post_json(http, "/api/v1/orders", eth, user1))["orderId"]
    cancelled = data(http.delete("/api/v1/orders", params={"symbol": SYMBOL}, auth=user1))
    assert sorted(cancelled["cancelledOrderIds"]) == sorted(ids)
    assert data(http.delete("/api/v1/orders", auth=user1)) == {"cancelledOrderIds": [eth_id]}
    assert data(http.delete("/api/v1/orders", auth=user1)) == {"cancelledOrderIds": []}
    assert error(http.delete("/api/v1/orders", params={"symbol": "NOPE"}, auth=user1))[1] == (
        "200003"
    )


@pytest.mark.usefixtures("clean")
def test_market_order_fills_against_the_book(http: httpx.Client, user1: KcAuth) -> None:
    client_oid = coid()
    order = {"clientOid": client_oid, "side": "buy", "symbol": SYMBOL, "leverage": 3,
             "type": "market", "size": 1}  # fmt: skip
    placed = data(post_json(http, "/api/v1/orders", order, user1))
    got = data(http.get(f"/api/v1/orders/{placed['orderId']}", auth=user1))
    assert got["status"] == "done" and got["filledSize"] == 1 and got["type"] == "market"
    done = data(http.get("/api/v1/orders", params={"status": "done"}, auth=user1))
    assert placed["orderId"] in {o["id"] for o in done["items"]}


@pytest.mark.usefixtures("clean")
def test_order_list_pagination(http: httpx.Client, user1: KcAuth) -> None:
    placed = []
    for i in range(5):
        price = passive_buy(http, ticks_below=60 + i)
        placed.append(
            data(post_json(http, "/api/v1/orders", limit_order(price, coid()), user1))["orderId"]
        )
    seen: list[str] = []
    for page in (1, 2, 3):
        params: dict[str, str | int] = {
            "status": "active",
            "symbol": SYMBOL,
            "pageSize": 2,
            "currentPage": page,
        }
        listing = data(http.get("/api/v1/orders", params=params, auth=user1))
        assert listing["currentPage"] == page and listing["pageSize"] == 2
        assert listing["totalNum"] == 5 and listing["totalPage"] == 3
        assert len(listing["items"]) == (1 if page == 3 else 2)
        assert all(o["isActive"] and o["status"] == "open" for o in listing["items"])
        seen += [o["id"] for o in listing["items"]]
    assert sorted(seen) == sorted(placed)
    assert seen[0] == placed[-1]  # newest first
    beyond: dict[str, str | int] = {"status": "active", "pageSize": 2, "currentPage": 9}
    assert data(http.get("/api/v1/orders", params=beyond, auth=user1))["items"] == []
    default = data(http.get("/api/v1/orders", params={"status": "active"}, auth=user1))
    assert default["pageSize"] == 50 and default["currentPage"] == 1


def test_order_list_bad_parameters(http: httpx.Client, user1: KcAuth) -> None:
    cases: tuple[dict[str, str | int], ...] = (
        {"status": "pending"},
        {"status": "active", "pageSize": 0},
        {"status": "active", "pageSize": 1001},
        {"status": "active", "pageSize": "ten"},
        {"status": "active", "currentPage": "-1"},
        {"status": "active", "side": "long"},
    )
    for params in cases:
        assert error(http.get("/api/v1/orders", params=params, auth=user1)) == (400, "400100")
    assert error(http.get("/api/v1/orders", params={"symbol": "NOPE"}, auth=user1))[1] == "200003"
    assert error(http.get("/api/v1/orders/byClientOid", auth=user1)) == (400, "400100")


@pytest.mark.usefixtures("clean")
def test_order_is_on_the_l3_stream(
    http: httpx.Client, sandbox: SandboxProcess, user1: KcAuth
) -> None:
    """A 200 from POST /orders means the engine acted: its messages reach subscribers."""
    bullet = data(http.post("/api/v1/bullet-public"))
    endpoint = bullet["instanceServers"][0]["endpoint"]
    client_oid = coid()

    async def scenario() -> list[dict[str, Any]]:
        url = f"{endpoint}?token={bullet['token']}&connectId=rest-test"
        async with asyncio.timeout(SAFETY_S), connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            topic = f"/contractMarket/level3v2:{SYMBOL}"
            await ws.send(json.dumps({"id": "1", "type": "subscribe", "topic": topic,
                                      "privateChannel": False, "response": True}))  # fmt: skip
            assert json.loads(await ws.recv()) == {"id": "1", "type": "ack"}
            order = limit_order(passive_buy(http), client_oid)
            placed = await asyncio.to_thread(post_json, http, "/api/v1/orders", order, user1)
            order_id = data(placed)["orderId"]
            got: list[dict[str, Any]] = []
            while not any(m["subject"] == "open" for m in got):
                msg = json.loads(await ws.recv())
                if msg["data"].get("orderId") == order_id:
                    got.append(msg)
            return got

    received, opened = asyncio.run(scenario())
    assert received["subject"] == "received" and received["data"]["clientOid"] == client_oid
    assert opened["data"]["sequence"] == received["data"]["sequence"] + 1
    assert opened["data"]["size"] == "3" and opened["data"]["side"] == "buy"


# ---------------------------------------------------------------------- faults


def test_rest_error_fault_answers_429_then_500_and_counts(http: httpx.Client) -> None:
    before = http.get("/sandbox/state").json()["counts"].get("rest_errors", 0)
    http.post("/sandbox/rest-error", json={"status": 429, "seconds": 60}).raise_for_status()
    assert error(http.get("/api/v1/timestamp")) == (429, "429000")
    assert error(http.post("/api/v1/bullet-public")) == (429, "429000")
    http.post("/sandbox/rest-error", json={"status": 500, "seconds": 60}).raise_for_status()
    assert error(http.get("/api/v1/contracts/active")) == (500, "500000")
    # The control API is not affected.
    assert http.get("/sandbox/state").status_code == 200
    http.post("/sandbox/rest-error", json={"status": None}).raise_for_status()
    data(http.get("/api/v1/timestamp"))
    assert http.get("/sandbox/state").json()["counts"]["rest_errors"] == before + 3


def test_rest_error_bad_input(http: httpx.Client) -> None:
    for body in ({"status": 404, "seconds": 1}, {"status": 429, "seconds": 0},
                 {"status": 429, "seconds": "long"}, {"status": "429"}):  # fmt: skip
        response = http.post("/sandbox/rest-error", json=body)
        assert response.status_code == 400, body
        assert "error" in response.json()
    assert http.post("/sandbox/rest-error", content=b"{nope").status_code == 400


# ---------------------------------------------------------------------- control API


def test_state_shows_flow_sequences_faults_and_clients(http: httpx.Client) -> None:
    state = http.get("/sandbox/state").json()
    assert state["flow"]["running"] is False and state["flow"]["rate"] == 0
    assert set(state["sequences"]) == {"XBTUSDM", "XBTUSDTM", "ETHUSDTM"}
    assert state["faults"]["drop_rate"] == 0 and "counts" in state["faults"]
    assert isinstance(state["clients"], int)


def test_step_advances_the_sequences_deterministically(http: httpx.Client) -> None:
    before = http.get("/sandbox/state").json()["sequences"]
    stepped = http.post("/sandbox/step", json={"n": 50}).json()
    after = stepped["sequences"]
    assert stepped["steps"] == 50
    assert sum(after.values()) - sum(before.values()) == stepped["messages"] > 0
    snap = data(http.get("/api/v2/level3/snapshot", params={"symbol": SYMBOL}))
    assert snap["sequence"] == after[SYMBOL]
    for body in ({"n": -1}, {"n": "ten"}, {"n": 10**9}, [1]):
        assert http.post("/sandbox/step", json=body).status_code == 400


def test_flow_pause_resume_and_rate(http: httpx.Client) -> None:
    assert http.post("/sandbox/flow/rate", json={"rate": 50}).json()["rate"] == 50
    resumed = http.post("/sandbox/flow/resume").json()
    assert resumed["running"] is True
    start = http.get("/sandbox/state").json()["flow"]["steps"]
    wait_for(lambda: http.get("/sandbox/state").json()["flow"]["steps"] != start,
             "the flow to step")
    assert http.post("/sandbox/flow/rate", json={"rate": "max"}).json()["max"] is True
    paused = http.post("/sandbox/flow/pause").json()
    assert paused["running"] is False
    assert http.post("/sandbox/flow/rate", json={"rate": 0}).json()["rate"] == 0
    for body in ({}, {"rate": "fast"}, {"rate": True}):
        assert http.post("/sandbox/flow/rate", json=body).status_code == 400


def test_faults_update_is_validated(http: httpx.Client) -> None:
    updated = http.post("/sandbox/faults", json={"drop_rate": 0.5, "delay_ms": 10}).json()
    assert updated["drop_rate"] == 0.5 and updated["delay_ms"] == 10
    for body in ({"drop_rate": 2}, {"nope": 1}, {"refuse_snapshots": "yes"}, {"delay_ms": -1}):
        response = http.post("/sandbox/faults", json=body)
        assert response.status_code == 400 and "error" in response.json(), body
    assert http.get("/sandbox/state").json()["faults"]["drop_rate"] == 0.5


def test_book_and_snapshot_of_the_control_api(http: httpx.Client) -> None:
    book = http.get(f"/sandbox/book/{SYMBOL}").json()
    snap = http.get(f"/sandbox/snapshot/{SYMBOL}").json()
    assert book["symbol"] == SYMBOL and book["sequence"] == snap["sequence"]
    level = book["bids"][0]
    assert set(level) == {"price", "size", "orders"}
    assert int(level["size"]) == sum(int(o["size"]) for o in level["orders"])
    flat = [
        [o["orderId"], lv["price"], o["size"], o["ts"]] for lv in book["bids"] for o in lv["orders"]
    ]
    assert sorted(flat) == sorted(snap["bids"])
    assert http.get("/sandbox/book/NOPE").status_code == 404
    assert http.get("/sandbox/snapshot/NOPE").status_code == 404


def test_disconnect_drops_websocket_clients(http: httpx.Client) -> None:
    bullet = data(http.post("/api/v1/bullet-public"))
    endpoint = bullet["instanceServers"][0]["endpoint"]

    async def scenario() -> int | None:
        url = f"{endpoint}?token={bullet['token']}&connectId=d-1"
        async with asyncio.timeout(SAFETY_S), connect(url) as ws:
            await ws.recv()
            response = await asyncio.to_thread(http.post, "/sandbox/disconnect")
            assert response.json()["disconnected"] >= 1
            await ws.wait_closed()
            return ws.close_code

    assert asyncio.run(scenario()) == 1001


# ---------------------------------------------------------------------- the process


CAPTURE = Path(__file__).resolve().parent.parent / "fixtures" / "real_l3_2022.jsonl"


def test_replay_mode_serves_the_capture_and_refuses_orders() -> None:
    env = {"SANDBOX_REPLAY": str(CAPTURE), "SANDBOX_REPLAY_SPEED": "0",
           "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0"}  # fmt: skip
    with SandboxProcess(env) as proc, httpx.Client(base_url=proc.base_url) as client:
        wait_for(lambda: client.get("/sandbox/state").json()["replay"]["done"],
                 "the replay to finish")
        snap = data(client.get("/api/v2/level3/snapshot", params={"symbol": "XBTUSDM"}))
        assert snap["sequence"] == 1639148481406
        assert snap["bids"] == [
            ["629727c9edde6b0001f422a7", "31570.0", "3671", 1654073289160921530]
        ]
        # A symbol of the capture that the sandbox does not list is served too.
        assert data(client.get("/api/v2/level3/snapshot", params={"symbol": "XBTMM22"}))["asks"]
        assert error(client.get("/api/v2/level3/snapshot", params={"symbol": "ETHUSDTM"}))[1] == (
            "200003"
        )
        order = {**limit_order("30000.0", coid()), "symbol": "XBTUSDM"}
        assert error(post_json(client, "/api/v1/orders", order, KcAuth(DEMO_KEY_1))) == (
            400,
            "400100",
        )
        assert client.post("/sandbox/step", json={"n": 1}).status_code == 409
        assert client.get("/sandbox/snapshot/ETHUSDTM").status_code == 404


def test_bad_setting_stops_the_service_naming_the_variable() -> None:
    env = {"SANDBOX_PORT": "not-a-port", "SANDBOX_FLOW_RATE": "fast", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "services.sandbox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "SANDBOX_PORT" in done.stderr and "SANDBOX_FLOW_RATE" in done.stderr
    # A certificate without its key (or files that are not there) is refused, named.
    for tls in ({"SANDBOX_TLS_CERT": __file__},
                {"SANDBOX_TLS_CERT": "/no/cert.pem", "SANDBOX_TLS_KEY": "/no/key.pem"}):
        done = subprocess.run([sys.executable, "-m", "services.sandbox"], env={**tls, "PATH": ""},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and "SANDBOX_TLS" in done.stderr, done.stderr


def test_default_settings_flow_runs_and_sigterm_stops_cleanly() -> None:
    """Demo defaults: the flow runs on its own, snapshots are limited to 1 a minute."""
    proc = SandboxProcess({"SANDBOX_SEED": "3"})
    with proc, httpx.Client(base_url=proc.base_url, timeout=SAFETY_S) as client:
        first = client.get("/sandbox/state").json()
        assert first["flow"]["running"] is True and first["flow"]["rate"] == 20
        wait_for(lambda: client.get("/sandbox/state").json()["sequences"] != first["sequences"],
                 "the flow to move")
        data(client.get("/api/v2/level3/snapshot", params={"symbol": "ETHUSDTM"}))
        assert error(client.get("/api/v2/level3/snapshot", params={"symbol": "ETHUSDTM"}))[0] == 429
        assert "sandbox exchange on http://127.0.0.1:" in proc.log_text()
        assert proc.stop() == 0


async def test_error_handlers_never_leak_a_422_or_a_bare_500() -> None:
    """In process (httpx.ASGITransport): typed parameters and crashes get envelopes."""
    from fastapi import FastAPI

    from services.sandbox.rest import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/typed/{n}")
    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("boom")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
        assert (await client.get("/typed/3")).json() == {"n": 3}
        assert error(await client.get("/typed/three")) == (400, "400100")
        assert error(await client.get("/crash")) == (500, "500000")
