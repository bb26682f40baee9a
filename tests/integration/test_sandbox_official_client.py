"""An official KuCoin Futures client works against the sandbox with only its base URL changed.

The client is ``kucoin-futures-python`` (KuCoin's own SDK, ``kucoin_futures``),
unchanged: it signs with key version 2, sends numbers as it pleases and
checks the ``200000`` envelope itself. Skipped when the package is missing.

The sandbox serves TLS here, as the venue does (HTTPS, ``wss://`` with
``encrypt: true``), with a throwaway CA that the SDK trusts through
``REQUESTS_CA_BUNDLE`` only (its REST is ``requests``); its WebSocket client is
checked in tests/integration/test_sandbox_tls.py.
"""

from __future__ import annotations

import importlib
import re
import uuid
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from kumex_l3.messages import parse_snapshot
from kumex_l3.testing.procs import wait_for
from kumex_l3.testing.sandbox_proc import (
    DEMO_KEY_1,
    DEMO_KEY_2,
    SANDBOX_TEST_ENV,
    DemoKey,
    SandboxProcess,
    queue_ahead,
)
from kumex_l3.testing.tls import make_tls

try:
    with warnings.catch_warnings():
        # The SDK imports pkg_resources, which newer setuptools flags as deprecated
        # (and without it, the SDK's import fails with a NameError, not an ImportError).
        warnings.simplefilter("ignore")
        client = importlib.import_module("kucoin_futures.client")
except Exception as exc:
    pytest.skip(f"kucoin-futures-python is not usable: {exc!r}", allow_module_level=True)

SYMBOL = "XBTUSDM"


@pytest.fixture(scope="module")
def tls_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    """This module's own sandbox, over TLS; the SDK trusts its CA through the environment."""
    files = make_tls(tmp_path_factory.mktemp("sdk-tls"))
    with pytest.MonkeyPatch.context() as env, SandboxProcess(SANDBOX_TEST_ENV,
                                                             tls=files) as sandbox:
        env.setenv("REQUESTS_CA_BUNDLE", str(files.ca))
        yield sandbox


@pytest.fixture
def sandbox(tls_sandbox: SandboxProcess) -> SandboxProcess:
    """The TLS sandbox with its flow paused (the shared fixture's, for this module)."""
    with _control(tls_sandbox) as http:
        http.post("/sandbox/flow/pause").raise_for_status()
    return tls_sandbox


def _control(sandbox: SandboxProcess) -> httpx.Client:
    return httpx.Client(base_url=sandbox.base_url, verify=sandbox.verify, timeout=10)


def _engine_book(sandbox: SandboxProcess) -> dict[str, Any]:
    """The engine's own book (``/sandbox/book``)."""
    with _control(sandbox) as http:
        book: dict[str, Any] = http.get(f"/sandbox/book/{SYMBOL}").json()
    return book


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


def test_level3_snapshot_v1_has_the_older_rows_and_the_same_book(
        sandbox: SandboxProcess) -> None:
    """l3_order_book (v1): rows ``[orderTime, orderId, price, size, ts]``, the book of v2
    (the venue's older shape, which our parser accepts as well)."""
    market = client.Market(url=sandbox.base_url)
    v1, v2 = market.l3_order_book(SYMBOL), market.l3_order_book_v2(SYMBOL)
    assert v1["sequence"] == v2["sequence"] and v1["bids"] and v1["asks"]
    for side in ("bids", "asks"):
        assert [r[1:] for r in v1[side]] == v2[side]
        assert all(isinstance(r[0], int) and 0 < r[0] <= r[4] for r in v1[side])
    parsed = parse_snapshot(v1)
    assert [o.order_id for o in parsed.bids] == [r[0] for r in v2["bids"]]
    assert all(o.order_time is not None for o in parsed.asks)


def test_ws_token(sandbox: SandboxProcess) -> None:
    token = client.WsToken(url=sandbox.base_url).get_ws_token()
    assert token["token"]
    (server,) = token["instanceServers"]
    assert server["endpoint"] == f"{sandbox.ws_url}"
    assert server["endpoint"].startswith("wss://") and server["encrypt"] is True
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
    engine = _engine_book(sandbox)
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
    book = _engine_book(sandbox)
    price = book["bids" if side == "buy" else "asks"][0]["price"]
    rest = maker.create_limit_order(SYMBOL, side, "5", size, price, postOnly=True)["orderId"]
    book = _engine_book(sandbox)
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


# ---------------------------------------------------------------------- account overview

_OVERVIEW = {"accountEquity", "unrealisedPNL", "marginBalance", "positionMargin", "orderMargin",
             "frozenFunds", "availableBalance", "currency"}


def _user(sandbox: SandboxProcess, key: DemoKey = DEMO_KEY_1) -> Any:
    return client.User(key=key.key, secret=key.secret, passphrase=key.passphrase,
                       url=sandbox.base_url)


def _book(sandbox: SandboxProcess) -> dict[str, Any]:
    return _engine_book(sandbox)


def _book_ids(sandbox: SandboxProcess) -> set[str]:
    book = _book(sandbox)
    return {o["orderId"] for side in ("bids", "asks") for lv in book[side] for o in lv["orders"]}


def _consistent(overview: dict[str, Any], currency: str) -> None:
    assert set(overview) == _OVERVIEW and overview["currency"] == currency
    assert all(isinstance(overview[k], (int, float)) for k in _OVERVIEW - {"currency"})
    assert overview["frozenFunds"] == 0
    assert overview["accountEquity"] == pytest.approx(
        overview["marginBalance"] + overview["unrealisedPNL"], abs=1e-12)
    assert overview["marginBalance"] == pytest.approx(  # the venue's documented identity
        overview["positionMargin"] + overview["orderMargin"] + overview["frozenFunds"]
        + overview["availableBalance"] - overview["unrealisedPNL"], abs=1e-12)


def test_account_overview_moves_by_the_profit_less_fees(sandbox: SandboxProcess) -> None:
    """The SDK's get_account_overview: the venue's fields as numbers; a round trip moves the
    margin balance by its fills' profit less their fees; a position holds its cost over its
    leverage, an open order its value over its leverage."""
    user, trade = _user(sandbox), _trade(sandbox)
    trade.cancel_all_limit_order(SYMBOL)
    held = trade.get_position_details(SYMBOL)["currentQty"]
    if held:  # flat first: the round trip's profit is then its own fills'
        trade.create_market_order(SYMBOL, "sell" if held > 0 else "buy", "5", size=abs(held))
    assert trade.get_position_details(SYMBOL)["currentQty"] == 0
    before = user.get_account_overview("XBT")
    _consistent(before, "XBT")
    assert before["positionMargin"] == before["orderMargin"] == before["unrealisedPNL"] == 0
    seen = {f["tradeId"] for f in _all_fills(trade)}

    buy = trade.create_market_order(SYMBOL, "buy", "5", size=3)["orderId"]
    during = user.get_account_overview()  # XBT by default
    _consistent(during, "XBT")
    position = trade.get_position_details(SYMBOL)
    assert position["currentQty"] == 3
    assert during["positionMargin"] == pytest.approx(abs(position["posCost"]) / 5, rel=1e-9)
    assert during["unrealisedPNL"] == pytest.approx(position["unrealisedPnl"], abs=1e-15)
    sell = trade.create_market_order(SYMBOL, "sell", "5", size=3)["orderId"]
    after = user.get_account_overview("XBT")
    _consistent(after, "XBT")
    fills = [f for f in _all_fills(trade) if f["tradeId"] not in seen]
    assert {f["orderId"] for f in fills} == {buy, sell}
    # XBTUSDM is inverse: a long's profit is what its entry was worth less its exit, in XBT.
    profit = sum(float(f["value"]) * (1 if f["side"] == "buy" else -1) for f in fills)
    fees = sum(float(f["fee"]) for f in fills)
    assert fees > 0
    # Values are shown to 8 places (fees to 12): each at most 5e-9 off.
    assert after["marginBalance"] - before["marginBalance"] == pytest.approx(
        profit - fees, abs=len(fills) * 5e-9 + 1e-12)
    assert after["positionMargin"] == after["unrealisedPNL"] == 0

    bid = Decimal(_book(sandbox)["bids"][0]["price"])
    price = bid - 10
    trade.create_limit_order(SYMBOL, "buy", "10", 7, f"{price:f}")
    resting = user.get_account_overview("XBT")
    _consistent(resting, "XBT")
    assert resting["orderMargin"] == pytest.approx(7 / float(price) / 10, rel=1e-9)
    assert resting["marginBalance"] == after["marginBalance"]
    trade.cancel_all_limit_order(SYMBOL)
    _consistent(user.get_account_overview("USDT"), "USDT")
    with pytest.raises(Exception, match="400100"):
        user.get_account_overview("DOGE")


# ---------------------------------------------------------------------- order test


def test_order_test_refuses_as_an_order_would_and_places_nothing(
        sandbox: SandboxProcess) -> None:
    """The SDK's place_order_test: the reply of a placed order, but nothing in the book,
    on the feed or in the account's orders; every refusal the very one of create_*_order."""
    trade = _trade(sandbox)
    trade.cancel_all_limit_order(SYMBOL)
    trade.cancel_all_stop_order(SYMBOL)
    book = _book(sandbox)
    price = Decimal(book["bids"][0]["price"]) - 10
    client_oid = uuid.uuid4().hex
    tested = trade.place_order_test(SYMBOL, "buy", "5", "limit", clientOid=client_oid,
                                    price=f"{price:f}", size=2)
    assert tested["clientOid"] == client_oid and re.fullmatch(r"[0-9a-f]{24}",
                                                              tested["orderId"])
    stop = trade.place_order_test(SYMBOL, "sell", "5", "market", size=1, stop="down",
                                  stopPrice=f"{price:f}", stopPriceType="TP")
    assert stop["orderId"] != tested["orderId"]
    assert _book(sandbox)["sequence"] == book["sequence"]
    with pytest.raises(Exception, match="100004"):
        trade.get_order_details(tested["orderId"])
    assert trade.get_order_list(status="active", symbol=SYMBOL)["items"] == []
    assert trade.get_open_stop_order(symbol=SYMBOL)["items"] == []

    taken = uuid.uuid4().hex
    trade.create_limit_order(SYMBOL, "buy", "5", 2, f"{price:f}", clientOid=taken)
    cases: list[dict[str, Any]] = [
        {"clientOid": taken},  # 300018: an active order has it
        {"price": f"{price + Decimal('0.05'):f}"},  # 300000: off the tick
        {"size": 0},  # 400100
        {"stop": "down", "stopPrice": f"{price:f}", "stopPriceType": "MP"},  # 400100
        {"stop": "down", "stopPrice": f"{price:f}"},  # 400100: no stopPriceType
        {"symbol": "NOPEUSDM"},  # 200003
    ]
    for case in cases:
        body = {"price": f"{price:f}", "size": 1, "clientOid": uuid.uuid4().hex, **case}
        symbol = body.pop("symbol", SYMBOL)
        with pytest.raises(Exception) as as_test:
            trade.place_order_test(symbol, "buy", "5", "limit", **body)
        size, limit = body.pop("size"), body.pop("price")
        with pytest.raises(Exception) as as_order:
            trade.create_limit_order(symbol, "buy", "5", size, limit, **body)
        assert str(as_test.value) == str(as_order.value), case
        assert str(as_test.value).startswith(("400-", "404-")), as_test.value
    trade.cancel_all_limit_order(SYMBOL)


# ---------------------------------------------------------------------- stop orders


def _stop_state(details: dict[str, Any]) -> tuple[Any, ...]:
    return (details["stop"], details["stopPrice"], details["stopPriceType"],
            details["stopTriggered"], details["status"])


def test_stop_orders_wait_off_the_book_then_trade_as_ordinary_orders(
        sandbox: SandboxProcess) -> None:
    """create_limit_order / create_market_order with stop, stopPrice, stopPriceType: the
    order waits off the book; a trade at its stop price places it, same orderId, from then
    on an ordinary order (the limit one rests, the market one fills)."""
    market = client.Market(url=sandbox.base_url)
    a, b = _trade(sandbox), _trade(sandbox, DEMO_KEY_2)
    for account in (a, b):
        account.cancel_all_limit_order(SYMBOL)
        account.cancel_all_stop_order(SYMBOL)
    ask = Decimal(_book(sandbox)["asks"][0]["price"])
    # A buy at the ask trades above every bid (no resting sell is at or below a bid).
    b.create_limit_order(SYMBOL, "buy", "5", 1, f"{ask:f}", timeInForce="IOC")
    bid = Decimal(_book(sandbox)["bids"][0]["price"])
    assert Decimal(market.get_ticker(SYMBOL)["price"]) > bid
    far = ask + 10  # 100 ticks above the ask: rests when placed
    stop = {"stop": "down", "stopPrice": f"{bid:f}", "stopPriceType": "TP"}
    resting = a.create_limit_order(SYMBOL, "sell", "5", 1, f"{far:f}", **stop)["orderId"]
    taker = a.create_market_order(SYMBOL, "sell", "5", size=1, **stop)["orderId"]
    sequence = _book(sandbox)["sequence"]
    for order_id in (resting, taker):
        assert _stop_state(a.get_order_details(order_id)) == (
            "down", f"{bid:f}", "TP", False, "open")
    assert not {resting, taker} & _book_ids(sandbox)

    # The other account sells at the bid, more each time, until a trade is at the bid
    # (hidden bids above it, which no book shows, take their share first).
    size = 1

    def triggered() -> bool:
        nonlocal size
        b.create_limit_order(SYMBOL, "sell", "5", size, f"{bid:f}", timeInForce="IOC")
        size *= 2
        return bool(a.get_order_details(resting)["stopTriggered"])

    wait_for(triggered, "a trade at the stop price")
    assert _book(sandbox)["sequence"] > sequence
    placed = a.get_order_details(resting)
    assert placed["id"] == resting and _stop_state(placed) == (
        "down", f"{bid:f}", "TP", True, "open")
    asks = {lv["price"]: [o["orderId"] for o in lv["orders"]] for lv in _book(sandbox)["asks"]}
    assert resting in asks[f"{far:f}"]
    assert resting in {o["id"] for o in a.get_order_list(status="active", symbol=SYMBOL)["items"]}
    filled = a.get_order_details(taker)
    assert _stop_state(filled) == ("down", f"{bid:f}", "TP", True, "done")
    assert filled["filledSize"] == 1 and filled["type"] == "market"
    fills = a.get_fills_details(symbol=SYMBOL, orderId=taker)["items"]
    assert [(f["size"], f["liquidity"], f["side"]) for f in fills] == [(1, "taker", "sell")]
    assert a.get_open_stop_order(symbol=SYMBOL)["items"] == []
    a.cancel_all_limit_order(SYMBOL)


def _two_clean_accounts(sandbox: SandboxProcess
                        ) -> tuple[Any, Any, Decimal, Decimal, str, str]:
    """demo-1's and demo-2's SDK clients with no stop or limit order left in ``SYMBOL``, the
    best bid and ask, and stop prices 1,000 ticks below the bid and above the ask (never reached
    while the flow is paused)."""
    a, b = _trade(sandbox), _trade(sandbox, DEMO_KEY_2)
    for account in (a, b):
        account.cancel_all_stop_order(SYMBOL)
        account.cancel_all_limit_order(SYMBOL)
    book = _book(sandbox)
    bid, ask = Decimal(book["bids"][0]["price"]), Decimal(book["asks"][0]["price"])
    return a, b, bid, ask, f"{bid - 100:f}", f"{ask + 100:f}"


def test_open_stop_orders_are_listed_by_page_and_refused_when_bad(
        sandbox: SandboxProcess) -> None:
    """get_open_stop_order: the account's untriggered stop orders, newest first, by page and
    filter, in the venue's order shape; never in the book nor in the active orders."""
    a, b, bid, ask, low, high = _two_clean_accounts(sandbox)
    ids = [
        a.create_limit_order(SYMBOL, "buy", "5", 1, f"{bid - 200:f}", stop="up",
                             stopPrice=high, stopPriceType="TP")["orderId"],
        a.create_market_order(SYMBOL, "sell", "5", size=2, stop="down", stopPrice=low,
                              stopPriceType="TP")["orderId"],
        a.create_limit_order(SYMBOL, "sell", "5", 3, f"{ask + 200:f}", stop="down",
                             stopPrice=low, stopPriceType="TP", reduceOnly=False)["orderId"],
    ]
    page = a.get_open_stop_order(symbol=SYMBOL)
    assert [o["id"] for o in page["items"]] == ids[::-1]
    assert (page["currentPage"], page["totalNum"], page["totalPage"]) == (1, 3, 1)
    for item in page["items"]:
        assert item["symbol"] == SYMBOL and item["stopPriceType"] == "TP"
        assert item["stopTriggered"] is False and item["isActive"] is True
        assert item["status"] == "open" and item["settleCurrency"] == "XBT"
    first = page["items"][-1]
    assert (first["stop"], first["stopPrice"], first["type"], first["price"], first["size"]) == (
        "up", high, "limit", f"{bid - 200:f}", 1)
    second = a.get_open_stop_order(symbol=SYMBOL, pageSize=2, currentPage=2)
    assert [o["id"] for o in second["items"]] == ids[:1] and second["totalPage"] == 2
    sells = a.get_open_stop_order(symbol=SYMBOL, side="sell", type="market")
    assert [o["id"] for o in sells["items"]] == [ids[1]]
    assert b.get_open_stop_order(symbol=SYMBOL)["items"] == []
    assert not set(ids) & _book_ids(sandbox)
    assert a.get_order_list(status="active", symbol=SYMBOL)["items"] == []

    with pytest.raises(Exception, match="400100"):
        a.create_market_order(SYMBOL, "sell", "5", size=1, stop="down", stopPrice=low,
                              stopPriceType="MP")
    with pytest.raises(Exception, match="300000"):
        a.create_market_order(SYMBOL, "sell", "5", size=1, stop="down",
                              stopPrice=f"{bid - Decimal('0.05'):f}", stopPriceType="TP")
    with pytest.raises(Exception, match="400100"):
        a.create_market_order(SYMBOL, "sell", "5", size=1, stop="sideways", stopPrice=low,
                              stopPriceType="TP")

    assert a.cancel_order(ids[1])["cancelledOrderIds"] == [ids[1]]
    canceled = a.get_order_details(ids[1])
    assert (canceled["status"], canceled["cancelExist"], canceled["stopTriggered"]) == (
        "done", True, False)
    assert [o["id"] for o in a.get_open_stop_order(symbol=SYMBOL)["items"]] == [ids[2], ids[0]]
    a.cancel_all_stop_order(SYMBOL)


def test_cancel_all_stop_orders_leaves_limit_orders_and_other_accounts(
        sandbox: SandboxProcess) -> None:
    """cancel_all_stop_order: every untriggered stop order of the account and contract,
    and nothing else; cancel_all_limit_order leaves stop orders alone."""
    a, b, bid, _, low, high = _two_clean_accounts(sandbox)
    mine = [a.create_market_order(SYMBOL, "sell", "5", size=1, stop="down", stopPrice=low,
                                  stopPriceType="TP")["orderId"],
            a.create_limit_order(SYMBOL, "buy", "5", 1, f"{bid - 50:f}", stop="up",
                                 stopPrice=high, stopPriceType="TP")["orderId"]]
    theirs = b.create_market_order(SYMBOL, "buy", "5", size=1, stop="up", stopPrice=high,
                                   stopPriceType="TP")["orderId"]
    limit = a.create_limit_order(SYMBOL, "buy", "5", 1, f"{bid - 50:f}")["orderId"]

    assert b.cancel_all_limit_order(SYMBOL)["cancelledOrderIds"] == []
    cancelled = a.cancel_all_stop_order(SYMBOL)["cancelledOrderIds"]
    assert sorted(cancelled) == sorted(mine)
    assert a.get_open_stop_order(symbol=SYMBOL)["items"] == []
    for order_id in mine:
        details = a.get_order_details(order_id)
        assert (details["status"], details["cancelExist"], details["stopTriggered"]) == (
            "done", True, False)
    assert a.get_order_details(limit)["status"] == "open"
    assert [o["id"] for o in b.get_open_stop_order(symbol=SYMBOL)["items"]] == [theirs]
    assert a.cancel_all_stop_order(SYMBOL)["cancelledOrderIds"] == []
    b.cancel_all_stop_order(SYMBOL)
    a.cancel_all_limit_order(SYMBOL)
