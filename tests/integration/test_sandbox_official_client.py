"""An official KuCoin Futures client works against the sandbox with only its base URL changed.

The client is ``kucoin-futures-python`` (KuCoin's own SDK, ``kucoin_futures``),
unchanged: it signs with key version 2, sends numbers as it pleases and
checks the ``200000`` envelope itself. Skipped when the package is missing.
"""

from __future__ import annotations

import importlib
import uuid
import warnings
from decimal import Decimal
from typing import Any

import httpx
import pytest

from kumex_l3.testing.sandbox_proc import (
    DEMO_KEY_1,
    DEMO_KEY_2,
    DemoKey,
    SandboxProcess,
    queue_ahead,
)

try:
    with warnings.catch_warnings():
        # The SDK imports pkg_resources, which newer setuptools flags as deprecated
        # (and without it, the SDK's import fails with a NameError, not an ImportError).
        warnings.simplefilter("ignore")
        client = importlib.import_module("kucoin_futures.client")
except Exception as exc:
    pytest.skip(f"kucoin-futures-python is not usable: {exc!r}", allow_module_level=True)

SYMBOL = "XBTUSDM"


def _trade(sandbox: SandboxProcess, key: DemoKey = DEMO_KEY_1) -> Any:
    return client.Trade(
        key=key.key,
        secret=key.secret,
        passphrase=key.passphrase,
        url=sandbox.base_url,
    )


def test_market_data_endpoints(sandbox: SandboxProcess) -> None:
    market = client.Market(url=sandbox.base_url)
    assert isinstance(market.get_server_timestamp(), int)
    contracts = market.get_contracts_list()
    assert {c["symbol"] for c in contracts} == {"XBTUSDM", "XBTUSDTM", "ETHUSDTM"}
    detail = market.get_contract_detail(SYMBOL)
    assert detail["symbol"] == SYMBOL and detail["isInverse"] is True
    snapshot = market.l3_order_book_v2(SYMBOL)
    assert snapshot["symbol"] == SYMBOL and snapshot["bids"] and snapshot["asks"]
    with pytest.raises(Exception, match="200003"):
        market.get_contract_detail("NOPEUSDM")


def test_ws_token(sandbox: SandboxProcess) -> None:
    token = client.WsToken(url=sandbox.base_url).get_ws_token()
    assert token["token"]
    (server,) = token["instanceServers"]
    assert server["endpoint"] == f"{sandbox.ws_url}"
    assert server["pingInterval"] == 18000 and server["protocol"] == "websocket"
    private = client.WsToken(
        key=DEMO_KEY_1.key,
        secret=DEMO_KEY_1.secret,
        passphrase=DEMO_KEY_1.passphrase,
        url=sandbox.base_url,
    ).get_ws_token(is_private=True)
    assert private["token"]


def test_place_get_list_cancel(sandbox: SandboxProcess) -> None:
    trade = _trade(sandbox)
    trade.cancel_all_limit_order(SYMBOL)
    bid = float(client.Market(url=sandbox.base_url).l3_order_book_v2(SYMBOL)["bids"][0][1])
    price = f"{bid - 10:.1f}"
    client_oid = uuid.uuid4().hex

    placed = trade.create_limit_order(SYMBOL, "buy", "5", 2, price, clientOid=client_oid)
    order_id = placed["orderId"]
    details = trade.get_order_details(order_id)
    assert details["clientOid"] == client_oid and details["status"] == "open"
    assert details["price"] == price and details["size"] == 2

    listing = trade.get_order_list(status="active", symbol=SYMBOL)
    assert [o["id"] for o in listing["items"]] == [order_id]

    assert trade.cancel_order(order_id)["cancelledOrderIds"] == [order_id]
    with pytest.raises(Exception, match="100004"):
        trade.cancel_order(order_id)
    assert trade.get_order_details(order_id)["status"] == "done"

    second = uuid.uuid4().hex
    trade.create_limit_order(SYMBOL, "buy", 5, "2", price, clientOid=second)
    assert trade.cancel_order_by_clientOid(second, SYMBOL)["clientOid"] == second

    third = trade.create_limit_order(SYMBOL, "buy", "5", 1, price)["orderId"]
    assert trade.cancel_all_limit_order(SYMBOL)["cancelledOrderIds"] == [third]


def test_ticker_level2_and_trade_history(sandbox: SandboxProcess) -> None:
    """The SDK's own calls for the market data a strategy reads beside L3, in the venue's
    shapes: the level 2 book is the engine's, aggregated; a trade we make shows as the
    ticker's last trade and at the head of the history."""
    market, trade = client.Market(url=sandbox.base_url), _trade(sandbox)
    trade.cancel_all_limit_order(SYMBOL)
    ask = market.l2_order_book(SYMBOL)["asks"][0]
    taker = trade.create_limit_order(SYMBOL, "buy", "5", 1, ask[0], timeInForce="IOC")
    engine = httpx.get(f"{sandbox.base_url}/sandbox/book/{SYMBOL}", timeout=10).json()
    level2 = market.l2_order_book(SYMBOL)
    ticker = market.get_ticker(SYMBOL)
    history = market.get_trade_history(SYMBOL)
    assert level2["symbol"] == SYMBOL and level2["sequence"] == engine["sequence"]
    for side in ("bids", "asks"):
        assert level2[side] == [[lv["price"], int(lv["size"])] for lv in engine[side]]
    newest = history[0]
    assert newest["takerOrderId"] == taker["orderId"] and newest["side"] == "buy"
    # At the best ask, or better (a hidden sell inside the spread, which no book shows).
    assert float(newest["price"]) <= float(ask[0]) and newest["size"] == 1
    assert {k: ticker[k] for k in ("tradeId", "price", "size", "side", "ts")} == {
        k: newest[k] for k in ("tradeId", "price", "size", "side", "ts")}
    assert ticker["sequence"] == engine["sequence"] and ticker["symbol"] == SYMBOL
    assert [ticker["bestBidPrice"], ticker["bestBidSize"]] == level2["bids"][0]
    assert [ticker["bestAskPrice"], ticker["bestAskSize"]] == level2["asks"][0]
    assert [h["sequence"] for h in history] == sorted((h["sequence"] for h in history),
                                                      reverse=True)
    with pytest.raises(Exception, match=r"200003|400100"):
        market.get_ticker("NOPEUSDM")
    # The mark: the mid of the book on the tick, as the contract's detail shows it.
    mark = market.get_current_mark_price(SYMBOL)
    detail = market.get_contract_detail(SYMBOL)
    assert mark["symbol"] == SYMBOL and mark["value"] == detail["markPrice"]
    tick = detail["tickSize"]
    mid = (float(level2["bids"][0][0]) + float(level2["asks"][0][0])) / 2
    assert abs(mark["value"] - mid) <= tick / 2 + 1e-9
    assert mark["indexPrice"] == mark["value"] and mark["granularity"] == 1000


def _cross(sandbox: SandboxProcess, maker: Any, taker: Any, side: str,
           size: int) -> tuple[str, str]:
    """``maker`` joins the best level of ``side`` with ``size``; ``taker`` sends an IOC at
    that price for everything ahead of it and ``size`` more. (maker order, taker order)."""
    book = httpx.get(f"{sandbox.base_url}/sandbox/book/{SYMBOL}", timeout=10).json()
    price = book["bids" if side == "buy" else "asks"][0]["price"]
    rest = maker.create_limit_order(SYMBOL, side, "5", size, price, postOnly=True)["orderId"]
    book = httpx.get(f"{sandbox.base_url}/sandbox/book/{SYMBOL}", timeout=10).json()
    take = queue_ahead(book, side, Decimal(price), rest) + size
    hit = taker.create_limit_order(SYMBOL, "sell" if side == "buy" else "buy", "5", take,
                                   price, timeInForce="IOC")["orderId"]
    return rest, hit


def test_fills_and_recent_fills(sandbox: SandboxProcess) -> None:
    """A resting order of one account filled by another's IOC: each account sees its own
    fills (maker and taker, fee at the contract's rate), by order and in its recent fills,
    and never the other's."""
    market = client.Market(url=sandbox.base_url)
    maker, taker = _trade(sandbox), _trade(sandbox, DEMO_KEY_2)
    for account in (maker, taker):
        account.cancel_all_limit_order(SYMBOL)
    rest, hit = _cross(sandbox, maker, taker, "buy", 3)
    contract = market.get_contract_detail(SYMBOL)
    for account, order_id, side, liquidity, rate in (
            (maker, rest, "buy", "maker", contract["makerFeeRate"]),
            (taker, hit, "sell", "taker", contract["takerFeeRate"])):
        page = account.get_fills_details(symbol=SYMBOL, orderId=order_id)
        fills = page["items"]
        filled = account.get_order_details(order_id)["filledSize"]
        assert filled >= 1 and sum(f["size"] for f in fills) == filled
        assert page["totalNum"] == len(fills) and page["currentPage"] == 1
        for fill in fills:
            assert (fill["orderId"], fill["side"], fill["liquidity"]) == (
                order_id, side, liquidity)
            assert fill["symbol"] == SYMBOL
            # XBTUSDM is inverse: value = size x multiplier / price, in XBT.
            value = fill["size"] * abs(contract["multiplier"]) / float(fill["price"])
            assert float(fill["value"]) == pytest.approx(value, abs=1e-8)  # 8 places
            assert float(fill["fee"]) == pytest.approx(value * rate, rel=1e-3)
            assert fill["feeCurrency"] == fill["settleCurrency"] == contract["settleCurrency"]
        recent = account.get_recent_fills()
        assert recent[0]["tradeId"] == fills[0]["tradeId"]
        assert all(f["orderId"] != (hit if account is maker else rest) for f in recent)
    maker.cancel_all_limit_order(SYMBOL)


def _all_fills(account: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        reply = account.get_fills_details(symbol=SYMBOL, currentPage=page, pageSize=100)
        items += reply["items"]
        if page >= reply["totalPage"]:
            return items
        page += 1


def test_position_is_the_net_of_the_fills(sandbox: SandboxProcess) -> None:
    """Each account's position (the SDK's get_position_details / get_all_position) holds
    the net of its fills, at an entry price between theirs, and values it at the mark."""
    a, b = _trade(sandbox), _trade(sandbox, DEMO_KEY_2)
    for account in (a, b):
        account.cancel_all_limit_order(SYMBOL)
    for side, size in (("buy", 3), ("sell", 1), ("buy", 2)):
        _cross(sandbox, a, b, side, size)
    for account in (a, b):
        fills = _all_fills(account)
        net = sum(f["size"] if f["side"] == "buy" else -f["size"] for f in fills)
        position = account.get_position_details(SYMBOL)
        assert position["symbol"] == SYMBOL and position["currentQty"] == net
        assert position["settleCurrency"] == "XBT"
        assert position["isOpen"] is (net != 0)
        fees = sum(float(f["fee"]) for f in fills)
        # Each fill's fee is shown to 12 places: at most 5e-13 off, each.
        assert position["currentComm"] == pytest.approx(fees, abs=len(fills) * 5e-13 + 1e-15)
        if net:
            prices = [float(f["price"]) for f in fills]
            assert min(prices) <= position["avgEntryPrice"] <= max(prices)
            # Inverse: unrealised = cost - qty / mark (XBT).
            assert position["unrealisedPnl"] == pytest.approx(
                position["currentCost"] - net / position["markPrice"], rel=1e-6, abs=1e-12)
        listed = {p["symbol"]: p for p in account.get_all_position()}
        assert listed[SYMBOL]["currentQty"] == net
    a.cancel_all_limit_order(SYMBOL)


def test_bad_credentials_are_refused(sandbox: SandboxProcess) -> None:
    trade = client.Trade(
        key=DEMO_KEY_1.key, secret="wrong", passphrase=DEMO_KEY_1.passphrase, url=sandbox.base_url
    )
    with pytest.raises(Exception, match="400004"):
        trade.get_order_list(status="active")
