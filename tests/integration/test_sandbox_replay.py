"""Replaying captures through the hub over real sockets; the replayed book's snapshot.

The generated capture is a consistent level3v2 stream of two symbols, starting
mid-stream, with non-data lines mixed in; a plain reference model (a dict of
resting orders) says what the book must hold at the end.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from kumex_l3 import OrderBook
from services.sandbox.faults import FaultState
from services.sandbox.hub import Hub
from services.sandbox.replay import Replayer

TOPIC = "/contractMarket/level3v2:"
SAFETY_S = 10.0  # only ever a ceiling against a hang, never a measurement
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "real_l3_2022.jsonl"

Row = tuple[str, str, str, int]  # orderId, price, size, ts


class Capture:
    """A generated capture: its lines and, per symbol, the expected final book."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.data_lines: dict[str, list[str]] = {}
        self.books: dict[str, dict[str, dict[str, Any]]] = {}
        self.last: dict[str, tuple[int, int]] = {}  # symbol -> (sequence, ts)

    def expected(self, symbol: str) -> tuple[set[Row], set[Row]]:
        asks = {(oid, o["price"], str(o["size"]), o["ts"])
                for oid, o in self.books[symbol].items() if o["side"] == "sell"}
        bids = {(oid, o["price"], str(o["size"]), o["ts"])
                for oid, o in self.books[symbol].items() if o["side"] == "buy"}
        return asks, bids


def make_capture(n: int, seed: int = 1) -> Capture:
    """``n`` data messages over two symbols, valid against an L3 book, mid-stream."""
    rng = random.Random(seed)
    cap = Capture()
    seq = {"XBTUSDM": 5_000_000, "ETHUSDTM": 77}
    ts = 1_654_073_289_000_000_000
    for sym in seq:
        cap.books[sym] = {}
        cap.data_lines[sym] = []
    cap.lines.append(json.dumps({"id": "c", "type": "welcome"}))
    oid = 0
    for i in range(n):
        sym = rng.choice(list(seq))
        book = cap.books[sym]
        seq[sym] += 1
        ts += rng.randrange(1, 200_000)  # under 0.2 ms apart
        base: dict[str, Any] = {"symbol": sym, "sequence": seq[sym], "ts": ts}
        roll = rng.random()
        if roll < 0.45 or not book:
            oid += 1
            side = rng.choice(["buy", "sell"])
            price = rng.randrange(9000, 9990) if side == "buy" else rng.randrange(10010, 11000)
            order = {"side": side, "price": f"{price}.0", "size": rng.randrange(1, 500),
                     "ts": ts}
            book[f"o{oid}"] = order
            subject, data = "open", {**base, "side": side, "orderTime": ts - 5,
                                     "size": str(order["size"]), "orderId": f"o{oid}",
                                     "price": order["price"]}
        elif roll < 0.6:
            subject, data = "received", {**base, "orderId": f"r{i}", "clientOid": f"c{i}"}
        else:
            maker_id = rng.choice(sorted(book))
            maker = book[maker_id]
            if roll < 0.75:
                size = rng.randrange(1, maker["size"] + 1)
                maker["size"] -= size
                taker = "sell" if maker["side"] == "buy" else "buy"
                subject, data = "match", {**base, "side": taker, "price": maker["price"],
                                          "size": str(size), "makerOrderId": maker_id,
                                          "takerOrderId": f"t{i}", "tradeId": f"tr{i}"}
                if maker["size"] == 0:
                    del book[maker_id]
            elif roll < 0.85 and maker["size"] > 1:
                maker["size"] -= 1
                subject, data = "update", {**base, "orderId": maker_id,
                                           "size": str(maker["size"])}
            else:
                del book[maker_id]
                subject, data = "done", {**base, "orderId": maker_id, "reason": "canceled"}
        line = json.dumps({"type": "message", "topic": TOPIC + sym, "subject": subject,
                           "data": data}, separators=(",", ":"))
        cap.lines.append(line)
        cap.data_lines[sym].append(line)
        cap.last[sym] = (seq[sym], ts)
        if i % 97 == 0:
            cap.lines.append(json.dumps({"id": str(i), "type": "pong"}))
        if i % 331 == 0:
            cap.lines.append("")
            cap.lines.append("{not json")
    return cap


def write(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture
async def hub() -> AsyncIterator[tuple[Hub, int]]:
    hub = Hub(FaultState(), symbols=None)
    app = FastAPI()
    app.include_router(hub.router)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", ws_ping_interval=None))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(SAFETY_S):
        while not server.started:
            await asyncio.sleep(0.01)
    yield hub, int(server.servers[0].sockets[0].getsockname()[1])
    await hub.stop()
    server.should_exit = True
    await task


async def client(hub: Hub, port: int, symbols: str) -> ClientConnection:
    url = f"ws://127.0.0.1:{port}/endpoint?token={hub.issue_token()}&connectId=r"
    ws = await connect(url)
    async with asyncio.timeout(SAFETY_S):
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"id": "s", "type": "subscribe", "topic": TOPIC + symbols,
                                  "privateChannel": False, "response": True}))
        assert json.loads(await ws.recv()) == {"id": "s", "type": "ack"}
    return ws


async def receive(ws: ClientConnection, n: int) -> list[str]:
    out: list[str] = []
    async with asyncio.timeout(SAFETY_S):
        while len(out) < n:
            text = await ws.recv()
            assert isinstance(text, str)
            out.append(text)
    return out


def check_snapshot(replayer: Replayer, cap: Capture, symbol: str) -> None:
    snap = replayer.snapshot(symbol)
    assert set(snap) == {"symbol", "sequence", "ts", "asks", "bids"}
    assert snap["symbol"] == symbol
    assert (snap["sequence"], snap["ts"]) == cap.last[symbol]
    asks, bids = cap.expected(symbol)
    assert {tuple(r) for r in snap["asks"]} == asks
    assert {tuple(r) for r in snap["bids"]} == bids
    # Best first: asks up, bids down; the snapshot loads back into an identical book.
    ask_prices = [float(r[1]) for r in snap["asks"]]
    bid_prices = [float(r[1]) for r in snap["bids"]]
    assert ask_prices == sorted(ask_prices)
    assert bid_prices == sorted(bid_prices, reverse=True)
    reloaded = OrderBook.from_snapshot(snap)
    reloaded.check()
    assert reloaded.l3() == replayer.book(symbol).l3()


@pytest.mark.parametrize("name", ["capture.jsonl", "capture.jsonl.gz"])
async def test_fast_replay_is_byte_exact_and_in_order(
    hub: tuple[Hub, int], tmp_path: Path, name: str
) -> None:
    the_hub, port = hub
    cap = make_capture(1500)
    path = write(tmp_path / name, cap.lines)
    both = await client(the_hub, port, "XBTUSDM,ETHUSDTM")
    eth = await client(the_hub, port, "ETHUSDTM")
    replayer = Replayer(path, the_hub, speed=0)
    await replayer.run()
    data = [line for line in cap.lines if line.startswith('{"type":"message"')]
    assert await receive(both, len(data)) == data
    assert await receive(eth, len(cap.data_lines["ETHUSDTM"])) == cap.data_lines["ETHUSDTM"]
    stats = replayer.stats()
    assert stats["done"] and stats["published"] == len(data)
    assert stats["gaps"] == 0 and stats["bookErrors"] == 0
    assert stats["skipped"]["control"] == 1 + len(range(0, 1500, 97))
    assert stats["skipped"]["blank"] == stats["skipped"]["invalid"] == len(range(0, 1500, 331))
    first_seen = {json.loads(line)["data"]["symbol"]: None for line in data}
    assert replayer.symbols == list(first_seen)
    for symbol in cap.books:
        check_snapshot(replayer, cap, symbol)
    with pytest.raises(KeyError):
        replayer.snapshot("NOPE")
    await both.close()
    await eth.close()


async def test_paced_replay_pauses_and_resumes(hub: tuple[Hub, int], tmp_path: Path) -> None:
    the_hub, port = hub
    cap = make_capture(60, seed=2)  # about 6 ms of recorded time
    path = write(tmp_path / "paced.jsonl", cap.lines)
    ws = await client(the_hub, port, "XBTUSDM,ETHUSDTM")
    replayer = Replayer(path, the_hub, speed=1.0, wait_for_subscribers=1)
    replayer.pause()
    task = asyncio.create_task(replayer.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert replayer.paused and replayer.published == 0  # nothing goes out while paused
    replayer.resume()
    async with asyncio.timeout(SAFETY_S):
        await task
    data = [line for line in cap.lines if line.startswith('{"type":"message"')]
    assert await receive(ws, len(data)) == data
    for symbol in cap.books:
        check_snapshot(replayer, cap, symbol)
    await ws.close()


async def test_snapshot_matches_the_position_when_paused(
    hub: tuple[Hub, int], tmp_path: Path
) -> None:
    the_hub, _ = hub
    cap = make_capture(400, seed=3)
    replayer = Replayer(write(tmp_path / "cap.jsonl", cap.lines), the_hub, speed=0)

    async def pause_midway() -> None:
        while replayer.published < 150:
            await asyncio.sleep(0)
        replayer.pause()

    pauser = asyncio.create_task(pause_midway())
    task = asyncio.create_task(replayer.run())
    await pauser
    for _ in range(20):
        await asyncio.sleep(0)
    position = replayer.published
    assert replayer.paused and not replayer.done and position < 400
    # The same seed generates the same prefix: the reference book at this position.
    prefix = make_capture(position, seed=3)
    for symbol in replayer.symbols:
        check_snapshot(replayer, prefix, symbol)
    replayer.resume()
    async with asyncio.timeout(SAFETY_S):
        await task
    for symbol in cap.books:
        check_snapshot(replayer, cap, symbol)


async def test_capture_with_a_gap_still_goes_out(hub: tuple[Hub, int], tmp_path: Path) -> None:
    the_hub, port = hub
    cap = make_capture(200, seed=4)
    lines = [line for line in cap.lines if '"symbol":"ETHUSDTM"' not in line]
    data_at = [i for i, line in enumerate(lines) if line.startswith('{"type":"message"')]
    del lines[data_at[50]]  # a message missing from the recording: a sequence gap
    ws = await client(the_hub, port, "XBTUSDM")
    replayer = Replayer(write(tmp_path / "gap.jsonl", lines), the_hub, speed=0)
    await replayer.run()
    data = [line for line in lines if line.startswith('{"type":"message"')]
    assert await receive(ws, len(data)) == data
    assert replayer.gaps == 1
    assert replayer.snapshot("XBTUSDM")["sequence"] == cap.last["XBTUSDM"][0]
    await ws.close()


async def test_real_fixture_replays(hub: tuple[Hub, int], tmp_path: Path) -> None:
    the_hub, port = hub
    path = shutil.copy(FIXTURE, tmp_path / "real.jsonl")
    lines = FIXTURE.read_text().splitlines()
    ws = await client(the_hub, port, "XBTMM22,XBTUSDM,XBTUSDTM")
    replayer = Replayer(path, the_hub, speed=0)
    await replayer.run()
    assert await receive(ws, 3) == lines
    assert replayer.symbols == ["XBTMM22", "XBTUSDM", "XBTUSDTM"]
    assert replayer.stats()["skipped"] == {}
    assert replayer.snapshot("XBTMM22") == {
        "symbol": "XBTMM22", "sequence": 1647173843748, "ts": 1654073248910399802,
        "asks": [["629727a023aac2000194fc87", "31615.0", "28", 1654073248910399802]],
        "bids": [],
    }
    assert replayer.snapshot("XBTUSDM")["bids"] == [
        ["629727c9edde6b0001f422a7", "31570.0", "3671", 1654073289160921530]
    ]
    assert replayer.snapshot("XBTUSDTM") == {
        "symbol": "XBTUSDTM", "sequence": 1655525144741, "ts": 1654073324184830142,
        "asks": [], "bids": [],
    }
    await ws.close()
