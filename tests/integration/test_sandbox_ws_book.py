"""A book built only from the sandbox's WebSocket and one REST snapshot equals the engine's.

The client here is written from kumex-api.md alone (bullet-public, welcome,
subscribe/ack, the level3v2 topic, the snapshot endpoint), as any exchange
client would be; only the book is the project's.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from websockets.asyncio.client import connect

from kumex_l3 import OrderBook, parse_message
from kumex_l3.testing.sandbox_proc import SandboxProcess
from tests.truth import assert_l3_equals_engine

SYM = "XBTUSDM"
MESSAGES = 100_000


def test_ws_messages_plus_one_snapshot_rebuild_the_engine_book() -> None:
    env = {"SANDBOX_SYMBOLS": SYM, "SANDBOX_FLOW_RATE": "0", "SANDBOX_SEED": "17",
           "SANDBOX_SNAPSHOT_RATE_PER_MIN": "0", "SANDBOX_REST_LATENCY_MS": "0",
           "SANDBOX_CLIENT_QUEUE_LIMIT": "50000"}
    with SandboxProcess(env) as sandbox:
        asyncio.run(_scenario(sandbox.base_url))


async def _scenario(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        bullet = (await http.post("/api/v1/bullet-public")).json()["data"]
        server = bullet["instanceServers"][0]
        url = f"{server['endpoint']}?token={bullet['token']}&connectId=book-test"
        async with connect(url, max_queue=None) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"id": "1", "type": "subscribe", "response": True,
                                      "topic": f"/contractMarket/level3v2:{SYM}",
                                      "privateChannel": False}))
            assert json.loads(await ws.recv()) == {"id": "1", "type": "ack"}
            start = int((await http.get("/sandbox/state")).json()["sequences"][SYM])
            (await http.post("/sandbox/flow/resume", json={"rate": "max"})).raise_for_status()
            frames: list[str] = []
            snapshot = None
            target = None
            while target is None or not frames or \
                    parse_message(frames[-1]).sequence < target:  # type: ignore[union-attr]
                frames.append(str(await asyncio.wait_for(ws.recv(), 60)))
                if snapshot is None and len(frames) == 2_000:  # mid-stream, as a client does
                    reply = await http.get("/api/v2/level3/snapshot", params={"symbol": SYM})
                    snapshot = reply.json()["data"]
                if target is None and len(frames) % 1000 == 0:
                    seq = int((await http.get("/sandbox/state")).json()["sequences"][SYM])
                    if seq - start >= MESSAGES:
                        (await http.post("/sandbox/flow/pause")).raise_for_status()
                        target = int(
                            (await http.get("/sandbox/state")).json()["sequences"][SYM])
            engine = (await http.get(f"/sandbox/book/{SYM}")).json()
    assert snapshot is not None
    book = OrderBook.from_snapshot(snapshot)
    applied = 0
    for frame in frames:
        msg = parse_message(frame)
        if book.apply(msg):  # type: ignore[arg-type]
            applied += 1
    assert book.sequence == target and target - start >= MESSAGES
    assert applied >= MESSAGES // 2  # the book followed the socket, not just the snapshot
    book.check()
    bids, asks = book.l3()
    ours = {"sequence": book.sequence,
            "bids": [{"price": lv.text, "orders": [{"orderId": o.order_id, "size": str(o.size)}
                                                   for o in lv.orders]} for lv in bids],
            "asks": [{"price": lv.text, "orders": [{"orderId": o.order_id, "size": str(o.size)}
                                                   for o in lv.orders]} for lv in asks]}
    assert_l3_equals_engine(ours, engine)
