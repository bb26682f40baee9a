"""The sandbox WebSocket hub over real sockets: protocol, fan-out, slow clients, faults.

A real uvicorn server runs in the test's event loop with a small FastAPI app
that only includes ``hub.router``; clients are the ``websockets`` library, as
the feed uses it. Waits are bounded by generous safety timeouts, never
asserted: the assertions are about order, presence and counts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.sandbox.faults import FaultState
from services.sandbox.hub import Hub

SYMBOLS = ("XBTUSDM", "ETHUSDTM", "XBTUSDTM")
TOPIC = "/contractMarket/level3v2:"
SAFETY_S = 10.0  # only ever a ceiling against a hang, never a measurement


class Served:
    """A hub behind a real uvicorn server on a free port."""

    def __init__(self, hub: Hub, port: int) -> None:
        self.hub = hub
        self.port = port
        self.faults = hub.faults

    def url(self, token: str | None = None, connect_id: str = "c1") -> str:
        token = self.hub.issue_token() if token is None else token
        return f"ws://127.0.0.1:{self.port}/endpoint?token={token}&connectId={connect_id}"


async def _serve(hub: Hub) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    app = FastAPI()
    app.include_router(hub.router)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off", ws_ping_interval=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(SAFETY_S):
        while not server.started:
            await asyncio.sleep(0.01)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    return server, task, port


@pytest.fixture
async def make_served() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    running: list[tuple[Hub, uvicorn.Server, asyncio.Task[None]]] = []

    async def make(**kwargs: Any) -> Served:
        faults = kwargs.pop("faults", None) or FaultState()
        kwargs.setdefault("symbols", SYMBOLS)
        hub = Hub(faults, **kwargs)
        await hub.start()
        server, task, port = await _serve(hub)
        running.append((hub, server, task))
        return Served(hub, port)

    yield make
    for hub, server, task in running:
        await hub.stop()
        server.should_exit = True
        await task


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(SAFETY_S):
        text = await ws.recv()
    assert isinstance(text, str)
    obj: dict[str, Any] = json.loads(text)
    return obj


async def recv_text(ws: ClientConnection) -> str:
    async with asyncio.timeout(SAFETY_S):
        text = await ws.recv()
    assert isinstance(text, str)
    return text


async def open_client(served: Served, connect_id: str = "c1", **kwargs: Any) -> ClientConnection:
    ws = await connect(served.url(connect_id=connect_id), compression=None, **kwargs)
    assert await recv(ws) == {"id": connect_id, "type": "welcome"}
    return ws


async def subscribe(ws: ClientConnection, symbols: str, msg_id: str = "s1") -> None:
    await ws.send(json.dumps({"id": msg_id, "type": "subscribe", "topic": TOPIC + symbols,
                              "privateChannel": False, "response": True}))
    assert await recv(ws) == {"id": msg_id, "type": "ack"}


async def closed_code(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(SAFETY_S):
            while True:
                await ws.recv()
    rcvd = info.value.rcvd
    assert rcvd is not None
    return rcvd.code, rcvd.reason


def l3(symbol: str, seq: int, pad: str = "") -> dict[str, Any]:
    data: dict[str, Any] = {"symbol": symbol, "sequence": seq, "orderId": f"o{seq}",
                            "clientOid": f"c{seq}", "ts": 1654073324184830142 + seq}
    if pad:
        data["pad"] = pad
    return {"type": "message", "topic": TOPIC + symbol, "subject": "received", "data": data}


def text_of(msg: dict[str, Any]) -> str:
    return json.dumps(msg, separators=(",", ":"))


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(SAFETY_S):
        while not predicate():
            await asyncio.sleep(0.005)


async def drain(ws: ClientConnection) -> list[dict[str, Any]]:
    """Everything queued for ``ws`` before a ping's pong (the queue is FIFO)."""
    await ws.send(json.dumps({"id": "fence", "type": "ping"}))
    out: list[dict[str, Any]] = []
    while True:
        msg = await recv(ws)
        if msg == {"id": "fence", "type": "pong"}:
            return out
        out.append(msg)


def seqs(msgs: list[dict[str, Any]]) -> list[int]:
    return [m["data"]["sequence"] for m in msgs]


# ---------------------------------------------------------------------------- protocol


async def test_welcome_ping_pong_and_errors_keep_connection(make_served: Any) -> None:
    served = await make_served()
    ws = await open_client(served, "abc")
    await ws.send(json.dumps({"id": "1545910840805", "type": "ping"}))
    assert await recv(ws) == {"id": "1545910840805", "type": "pong"}
    await ws.send("not json")
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == 400
    await ws.send(json.dumps({"id": "x", "type": "dance"}))
    err = await recv(ws)
    assert (err["id"], err["type"], err["code"]) == ("x", "error", 400)
    for topic in ("/contractMarket/level2:XBTUSDM", TOPIC + "NOPEUSDM",
                  TOPIC + "XBTUSDM,NOPEUSDM"):
        await ws.send(json.dumps({"id": "t", "type": "subscribe", "topic": topic,
                                  "privateChannel": False, "response": True}))
        err = await recv(ws)
        assert err == {"id": "t", "type": "error", "code": 404,
                       "data": f"topic {topic} is not found"}
    # Nothing of the refused mixed topic was subscribed.
    served.hub.publish("XBTUSDM", [l3("XBTUSDM", 1)])
    assert await drain(ws) == []
    # response false: no ack, yet subscribed.
    await ws.send(json.dumps({"id": "q", "type": "subscribe", "topic": TOPIC + "XBTUSDM",
                              "privateChannel": False, "response": False}))
    await until(lambda: served.hub.subscriber_count("XBTUSDM") == 1)
    served.hub.publish("XBTUSDM", [l3("XBTUSDM", 2)])
    assert seqs(await drain(ws)) == [2]
    await ws.close()


@pytest.mark.parametrize("token", ["", "forged"])
async def test_bad_token_gets_error_and_close(make_served: Any, token: str) -> None:
    served = await make_served()
    ws = await connect(served.url(token=token, connect_id="bad"), compression=None)
    assert await recv(ws) == {"id": "bad", "type": "error", "code": 401,
                              "data": "token is invalid"}
    code, _ = await closed_code(ws)
    assert code == 1008


async def test_missing_token_gets_error(make_served: Any) -> None:
    served = await make_served()
    ws = await connect(f"ws://127.0.0.1:{served.port}/endpoint?connectId=n", compression=None)
    assert (await recv(ws))["code"] == 401
    await closed_code(ws)


async def test_messages_arrive_in_order_with_exact_text(make_served: Any) -> None:
    served = await make_served()
    ws = await open_client(served)
    await subscribe(ws, "XBTUSDM")
    msgs = [l3("XBTUSDM", s) for s in range(1, 201)]
    for i in range(0, 200, 7):
        served.hub.publish("XBTUSDM", msgs[i:i + 7])
    served.hub.publish("ETHUSDTM", [l3("ETHUSDTM", 1)])  # not subscribed
    raw = [l3("XBTUSDM", 201) | {"channelType": "private"}]
    served.hub.publish_raw("XBTUSDM", [text_of(raw[0]).replace(",", ", ")])
    got = [await recv_text(ws) for _ in range(201)]
    assert got[:200] == [text_of(m) for m in msgs]
    assert got[200] == text_of(raw[0]).replace(",", ", ")  # publish_raw: unchanged bytes
    assert await drain(ws) == []
    await ws.close()


async def test_several_topics_and_unsubscribe(make_served: Any) -> None:
    served = await make_served()
    hub = served.hub
    ws = await open_client(served)
    await subscribe(ws, "XBTUSDM,ETHUSDTM", "a")
    await subscribe(ws, "XBTUSDTM", "b")
    assert hub.stats()["subscriptions"] == {TOPIC + s: 1 for s in SYMBOLS}
    for n in (1, 2):
        for sym in SYMBOLS:
            hub.publish(sym, [l3(sym, n)])
    got = await drain(ws)
    assert [(m["data"]["symbol"], m["data"]["sequence"]) for m in got] == [
        (s, n) for n in (1, 2) for s in SYMBOLS
    ]
    await ws.send(json.dumps({"id": "u", "type": "unsubscribe", "topic": TOPIC + "ETHUSDTM",
                              "privateChannel": False, "response": True}))
    assert await recv(ws) == {"id": "u", "type": "ack"}
    for sym in SYMBOLS:
        hub.publish(sym, [l3(sym, 3)])
    assert [m["data"]["symbol"] for m in await drain(ws)] == ["XBTUSDM", "XBTUSDTM"]
    await ws.close()


async def test_topic_limit_of_one_connection(make_served: Any) -> None:
    served = await make_served(symbols=None)
    ws = await open_client(served)
    await subscribe(ws, ",".join(f"S{i}USDM" for i in range(100)))
    await ws.send(json.dumps({"id": "x", "type": "subscribe", "topic": TOPIC + "ONEMOREUSDM",
                              "privateChannel": False, "response": True}))
    err = await recv(ws)
    assert err["type"] == "error" and "100" in err["data"]
    await subscribe(ws, "S5USDM", "again")  # already held: still fine
    await ws.close()


# ---------------------------------------------------------------------------- drops


async def test_slow_client_is_disconnected_while_others_keep_receiving(
    make_served: Any,
) -> None:
    served = await make_served(queue_limit=8)
    hub = served.hub
    good = await open_client(served, "good")
    await subscribe(good, "XBTUSDM")
    # The slow client stops reading: a one-frame client buffer and a small kernel buffer.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", served.port))
    slow = await connect(served.url(connect_id="slow"), sock=sock, compression=None,
                         max_queue=1)
    assert (await recv(slow))["type"] == "welcome"
    await subscribe(slow, "XBTUSDM")

    received: list[str] = []

    async def read_good() -> None:
        while True:
            received.append(await recv_text(good))

    reader = asyncio.create_task(read_good())
    pad = "x" * 16384
    sent: list[str] = []
    seq = 0
    while hub.faults.counts["slow_clients_dropped"] == 0:
        seq += 1
        assert seq < 5000, "the slow client was never dropped"
        msg = l3("XBTUSDM", seq, pad)
        sent.append(text_of(msg))
        hub.publish("XBTUSDM", [msg])
        await until(lambda: len(received) == len(sent))  # the good client keeps up
    for _ in range(5):  # the good client keeps receiving afterwards
        seq += 1
        msg = l3("XBTUSDM", seq, pad)
        sent.append(text_of(msg))
        hub.publish("XBTUSDM", [msg])
    await until(lambda: len(received) == len(sent))
    reader.cancel()
    assert received == sent
    stats = hub.stats()
    assert stats["clients"] == 1
    assert stats["subscriptions"] == {TOPIC + "XBTUSDM": 1}
    assert [c["connectId"] for c in stats["connections"]] == ["good"]
    code, reason = await closed_code(slow)  # reading again: buffered data, then the close
    assert code == 1008 and "slow client" in reason
    await good.close()


async def test_no_ping_is_dropped(make_served: Any) -> None:
    served = await make_served(ping_timeout_s=0.3)
    ws = await open_client(served)
    code, reason = await closed_code(ws)
    assert (code, reason) == (1008, "ping timeout")
    assert served.faults.counts["ping_timeouts"] == 1
    await until(lambda: served.hub.stats()["clients"] == 0)


async def test_disconnect_all(make_served: Any) -> None:
    served = await make_served()
    a = await open_client(served, "a")
    b = await open_client(served, "b")
    await subscribe(b, "XBTUSDM")
    await until(lambda: served.hub.stats()["clients"] == 2)
    assert served.hub.disconnect_all() == 2
    assert (await closed_code(a))[0] == 1001
    assert (await closed_code(b))[0] == 1001
    assert served.faults.counts["disconnects"] == 2
    assert served.hub.stats()["clients"] == 0
    c = await open_client(served, "c")  # reconnecting works
    await subscribe(c, "XBTUSDM")
    await c.close()


# ---------------------------------------------------------------------------- faults


async def _faulty_stream(served: Served, n: int, per_call: int = 1) -> list[int]:
    ws = await open_client(served)
    await subscribe(ws, "XBTUSDM")
    for start in range(1, n + 1, per_call):
        served.hub.publish("XBTUSDM",
                           [l3("XBTUSDM", s) for s in range(start, min(start + per_call, n + 1))])
    served.hub.flush("XBTUSDM")
    got = seqs(await drain(ws))
    await ws.close()
    return got


async def test_drop_fault_makes_a_sequence_gap(make_served: Any) -> None:
    served = await make_served(faults=FaultState(drop_rate=0.2), seed=5)
    got = await _faulty_stream(served, 200, per_call=3)
    assert got == sorted(got)
    gaps = [b - a for a, b in itertools.pairwise(got) if b - a > 1]
    assert gaps
    assert served.faults.counts["dropped"] == 200 - len(got)


async def test_duplicate_fault_repeats_a_sequence(make_served: Any) -> None:
    served = await make_served(faults=FaultState(duplicate_rate=0.2), seed=5)
    got = await _faulty_stream(served, 200)
    repeats = [a for a, b in itertools.pairwise(got) if a == b]
    assert repeats
    assert len(repeats) == served.faults.counts["duplicated"]
    assert sorted(set(got)) == list(range(1, 201))


async def test_reorder_fault_swaps_a_pair(make_served: Any) -> None:
    served = await make_served(faults=FaultState(reorder_rate=0.2), seed=5)
    got = await _faulty_stream(served, 200)
    swapped = [i for i in range(len(got) - 1) if got[i] > got[i + 1]]
    assert swapped
    assert all(got[i] == got[i + 1] + 1 for i in swapped)
    assert len(swapped) == served.faults.counts["reordered"]
    assert sorted(got) == list(range(1, 201))


async def test_delay_fault_holds_messages_then_delivers_in_order(make_served: Any) -> None:
    served = await make_served()
    hub = served.hub
    ws = await open_client(served)
    await subscribe(ws, "XBTUSDM")
    hub.faults.update(delay_ms=1500)
    hub.publish("XBTUSDM", [l3("XBTUSDM", 1), l3("XBTUSDM", 2)])
    for _ in range(5):
        await asyncio.sleep(0)
    assert hub.stats()["queue_depth_max"] == 2  # held by the delay, not yet on the socket
    hub.faults.update(delay_ms=0)
    hub.publish("XBTUSDM", [l3("XBTUSDM", 3)])  # queued behind the delayed ones
    assert seqs(await drain(ws)) == [1, 2, 3]
    await ws.close()


async def test_disconnect_every_fault_closes_and_reconnect_works(make_served: Any) -> None:
    served = await make_served()
    ws = await open_client(served)
    await subscribe(ws, "XBTUSDM")
    served.faults.update(disconnect_every_s=0.2)
    code, _ = await closed_code(ws)
    assert code == 1001
    assert served.faults.counts["disconnects"] >= 1
    served.faults.update(disconnect_every_s=0)
    again = await open_client(served, "again")
    await subscribe(again, "XBTUSDM")
    served.hub.publish("XBTUSDM", [l3("XBTUSDM", 9)])
    assert seqs(await drain(again)) == [9]
    await again.close()


# ----------------------------------------------------------- faults are per connection


async def test_two_connections_lose_different_messages(make_served: Any) -> None:
    """Drops are drawn per connection: two clients rarely miss the same message, and
    together they have nearly all of them (what the feed's redundant lines rely on)."""
    served = await make_served(faults=FaultState(drop_rate=0.1), seed=9)
    a = await open_client(served, "a")
    b = await open_client(served, "b")
    await subscribe(a, "XBTUSDM")
    await subscribe(b, "XBTUSDM")
    for start in range(1, 1001, 10):
        served.hub.publish("XBTUSDM", [l3("XBTUSDM", s) for s in range(start, start + 10)])
    got_a, got_b = set(seqs(await drain(a))), set(seqs(await drain(b)))
    everything = set(range(1, 1001))
    lost_a, lost_b = everything - got_a, everything - got_b
    assert 50 < len(lost_a) < 150 and 50 < len(lost_b) < 150
    assert lost_a != lost_b
    assert len(lost_a & lost_b) < 30  # ~10 expected: independent dice
    assert served.faults.counts["dropped"] == len(lost_a) + len(lost_b)
    await a.close()
    await b.close()


async def test_each_connection_is_cut_on_its_own_schedule(make_served: Any) -> None:
    served = await make_served(seed=11)
    clients = [await open_client(served, f"c{i}") for i in range(4)]
    for ws in clients:
        await subscribe(ws, "XBTUSDM")
    served.faults.update(disconnect_every_s=0.3, disconnect_every_max_s=1.5)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def cut(ws: ClientConnection) -> float:
        code, _ = await closed_code(ws)
        assert code == 1001
        return loop.time() - start

    closed_at = await asyncio.gather(*(cut(ws) for ws in clients))
    served.faults.update(disconnect_every_s=0)
    # Lifetimes drawn in [0.3, 1.5] s: not all at the same moment.
    assert max(closed_at) - min(closed_at) > 0.05, closed_at
    assert served.faults.counts["disconnects"] == 4


async def test_an_outage_closes_everyone_and_refuses_new_connections(make_served: Any) -> None:
    served = await make_served()
    ws = await open_client(served)
    await subscribe(ws, "XBTUSDM")
    assert served.hub.disconnect_all(outage_s=30.0) == 1
    assert (await closed_code(ws))[0] == 1001
    refused = await connect(served.url(connect_id="during"), compression=None)
    assert (await closed_code(refused)) == (1013, "try again later: outage")
    assert served.faults.counts["outage_refusals"] == 1
    served.hub.outage_until = 0.0  # the outage is over
    again = await open_client(served, "after")
    await subscribe(again, "XBTUSDM")
    await again.close()
