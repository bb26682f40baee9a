"""The pure half of the WebSocket client: bullet parsing, frames, and the protocol Session.

No sockets and no clock: time is passed in. The socket shell is exercised
against real servers in ``tests/integration/test_feed.py``.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from kumex_l3.wsclient import (
    DataFrame,
    FrameKind,
    IdSource,
    PingTimeout,
    Session,
    SubscribeError,
    TokenError,
    WsServerError,
    classify,
    connect_url,
    is_retryable,
    level3_topic,
    parse_bullet,
    ping_frame,
    subscribe_frame,
    topic_symbol,
)

BULLET = {
    "code": "200000",
    "data": {
        "token": "tok-SECRET-123",
        "instanceServers": [{
            "endpoint": "wss://ws-api-futures.kucoin.com/endpoint", "encrypt": True,
            "protocol": "websocket", "pingInterval": 18000, "pingTimeout": 10000,
        }],
    },
}
DATA = ('{"type":"message","topic":"/contractMarket/level3v2:XBTUSDM","subject":"open",'
        '"data":{"symbol":"XBTUSDM","sequence":1639148481406,"side":"buy",'
        '"orderTime":1654073289118060857,"size":"3671","orderId":"629727c9edde6b0001f422a7",'
        '"price":"31570.0","ts":1654073289160921530}}')


# --------------------------------------------------------------------------- bullet


def test_parse_bullet_reads_token_and_servers_in_seconds() -> None:
    bullet = parse_bullet(json.dumps(BULLET))
    assert bullet.token == "tok-SECRET-123"
    (server,) = bullet.servers
    assert server.endpoint == "wss://ws-api-futures.kucoin.com/endpoint"
    assert (server.ping_interval, server.ping_timeout) == (18.0, 10.0)
    assert server.encrypt is True
    assert "tok-SECRET" not in repr(bullet)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"code":"429000","msg":"Too many requests"}', "429000"),
        ("not json", "envelope"),
        ('{"code":"200000","data":{"token":"t","instanceServers":[]}}', "no instanceServers"),
        ('{"code":"200000","data":{"token":"","instanceServers":[]}}', "empty token"),
        ('{"code":"200000","data":{"token":"t","instanceServers":[{"endpoint":"http://x",'
         '"pingInterval":1,"pingTimeout":1}]}}', "ws://"),
        ('{"code":"200000","data":{"token":"t","instanceServers":[{"endpoint":"ws://x",'
         '"pingInterval":0,"pingTimeout":1}]}}', "> 0"),
        ('{"code":"200000","data":{"instanceServers":[]}}', "not valid"),
    ],
)
def test_parse_bullet_refuses_bad_replies_clearly(body: str, needle: str) -> None:
    with pytest.raises(TokenError, match=needle):
        parse_bullet(body)


def test_connect_url_quotes_and_appends() -> None:
    url = connect_url("ws://h:1/endpoint", "a b&c=", "cid1")
    query = parse_qs(urlsplit(url).query)
    assert query == {"token": ["a b&c="], "connectId": ["cid1"]}
    assert connect_url("ws://h/e?x=1", "t", "c") == "ws://h/e?x=1&token=t&connectId=c"


# --------------------------------------------------------------------------- frames


def test_frames_are_what_the_protocol_says() -> None:
    assert json.loads(subscribe_frame("42", "/t:A")) == {
        "id": "42", "type": "subscribe", "topic": "/t:A", "privateChannel": False,
        "response": True}
    assert json.loads(subscribe_frame("43", "/t:A", unsubscribe=True))["type"] == "unsubscribe"
    assert ping_frame("1545910590801") == '{"id":"1545910590801","type":"ping"}'


def test_classify_reads_only_the_envelope() -> None:
    frame = classify(DATA)
    assert frame.kind is FrameKind.DATA
    assert frame.topic == "/contractMarket/level3v2:XBTUSDM"
    assert classify('{"id":"7","type":"ack"}').kind is FrameKind.ACK
    assert classify('{"id":7,"type":"pong"}').id == "7"
    assert classify('{"id":"c","type":"welcome"}').kind is FrameKind.WELCOME
    err = classify('{"id":"9","type":"error","code":"401","data":"token is invalid"}')
    assert (err.kind, err.id, err.code, err.text) == (FrameKind.ERROR, "9", 401,
                                                      "token is invalid")
    assert classify('{"type":"error","code":404,"data":{"x":1}}').code == 404
    assert classify('{"type":"notice"}').kind is FrameKind.UNKNOWN
    assert classify('{"topic":"x"}').kind is FrameKind.UNKNOWN
    assert classify("[1,2]").kind is FrameKind.INVALID
    assert classify("{not json").kind is FrameKind.INVALID


def test_topic_symbol() -> None:
    assert topic_symbol(level3_topic("XBTUSDM")) == "XBTUSDM"
    assert topic_symbol("/contractMarket/level3v2:A,B") is None
    assert topic_symbol("/contractMarket/level2:XBTUSDM") is None
    assert topic_symbol("/contractMarket/level3v2:") is None
    assert topic_symbol(None) is None


def test_ids_are_ms_text_and_strictly_increasing() -> None:
    ids = IdSource(lambda: 1_700_000_000_000)
    got = [ids() for _ in range(3)]
    assert got == ["1700000000000", "1700000000001", "1700000000002"]


# --------------------------------------------------------------------------- session


def _session(interval: float = 18.0, timeout: float = 10.0) -> Session:
    clock = iter(range(1_000, 1_000_000))
    return Session("cid", interval, timeout, IdSource(lambda: next(clock)))


def test_nothing_to_do_before_welcome() -> None:
    s = _session()
    assert s.tick(100.0) == 18.0
    assert s.data_to_send() == []
    assert s.receive('{"id":"cid","type":"welcome"}', 0.0) is None
    assert s.welcomed


def test_subscribe_acks_are_matched_by_id() -> None:
    s = _session()
    ids = s.subscribe(["/t:A", "/t:B"])
    sent = [json.loads(f) for f in s.data_to_send()]
    assert [f["id"] for f in sent] == ids
    assert [f["topic"] for f in sent] == ["/t:A", "/t:B"]
    assert s.receive('{"id":"999","type":"ack"}', 0.0) is None  # not ours: ignored
    assert set(s.pending) == set(ids)
    s.receive(json.dumps({"id": ids[1], "type": "ack"}), 0.0)
    s.receive(json.dumps({"id": ids[0], "type": "ack"}), 0.0)
    assert s.pending == {}
    assert s.topics == ["/t:B", "/t:A"]
    (unsub,) = s.unsubscribe(["/t:A"])
    s.receive(json.dumps({"id": unsub, "type": "ack"}), 0.0)
    assert s.topics == ["/t:B"]


def test_error_reply_to_a_subscribe_names_the_topic() -> None:
    s = _session()
    (msg_id,) = s.subscribe(["/contractMarket/level3v2:NOPE"])
    with pytest.raises(SubscribeError) as info:
        s.receive(json.dumps({"id": msg_id, "type": "error", "code": 404,
                              "data": "topic /contractMarket/level3v2:NOPE is not found"}), 0.0)
    assert info.value.topic == "/contractMarket/level3v2:NOPE"
    assert info.value.code == 404
    assert "not found" in str(info.value)


def test_other_error_frames_are_server_errors() -> None:
    s = _session()
    with pytest.raises(WsServerError, match=r"401.*token is invalid"):
        s.receive('{"id":"cid","type":"error","code":401,"data":"token is invalid"}', 0.0)


def test_data_and_unknown_frames_go_to_the_caller_unchanged() -> None:
    s = _session()
    assert s.receive(DATA, 0.0) == DataFrame(DATA, "/contractMarket/level3v2:XBTUSDM")
    odd = '{"type":"notice","x":1}'
    assert s.receive(odd, 0.0) == DataFrame(odd, None, FrameKind.UNKNOWN)
    assert s.receive("garbage", 0.0) == DataFrame("garbage", None, FrameKind.INVALID)


def test_server_ping_gets_a_pong_with_its_id() -> None:
    s = _session()
    assert s.receive('{"id":"77","type":"ping"}', 0.0) is None
    assert s.wants_to_send
    assert [json.loads(f) for f in s.data_to_send()] == [{"id": "77", "type": "pong"}]


def test_pings_every_interval_and_pongs_keep_it_alive() -> None:
    s = _session(interval=18.0, timeout=10.0)
    s.receive('{"id":"cid","type":"welcome"}', 100.0)
    assert s.tick(100.0) == 18.0
    assert s.data_to_send() == []
    assert s.tick(118.0) == 10.0  # ping sent; next wake-up: its pong deadline
    (ping,) = [json.loads(f) for f in s.data_to_send()]
    assert ping["type"] == "ping" and ping["id"].isdigit()
    s.receive(json.dumps({"id": ping["id"], "type": "pong"}), 119.0)
    assert s.tick(127.9) == pytest.approx(8.1)  # nothing outstanding: next ping at 136
    for now in (136.0, 154.0, 172.0):
        s.tick(now)
        (p,) = [json.loads(f) for f in s.data_to_send()]
        s.receive(json.dumps({"id": p["id"], "type": "pong"}), now + 9.9)
    assert s.tick(180.0) >= 0


def test_missing_pong_within_timeout_means_dead() -> None:
    s = _session(interval=18.0, timeout=10.0)
    s.receive('{"id":"cid","type":"welcome"}', 0.0)
    s.tick(18.0)
    s.data_to_send()
    s.receive('{"id":"not-that-one","type":"pong"}', 20.0)  # a stray pong proves nothing
    s.tick(27.9)
    with pytest.raises(PingTimeout):
        s.tick(28.0)


def test_a_pong_answers_older_pings_too() -> None:
    # pingInterval shorter than pingTimeout: two pings out; the later pong covers both.
    s = _session(interval=2.0, timeout=5.0)
    s.receive('{"id":"cid","type":"welcome"}', 0.0)
    s.tick(2.0)
    s.tick(4.0)
    first, second = (json.loads(f)["id"] for f in s.data_to_send())
    s.receive(json.dumps({"id": second, "type": "pong"}), 4.5)
    s.tick(6.0)
    s.data_to_send()
    s.tick(7.5)  # the first ping is 5.5 s old but was answered in effect
    assert first != second


def test_every_ws_error_is_retryable_and_bugs_are_not() -> None:
    assert is_retryable(PingTimeout("x"))
    assert is_retryable(WsServerError(401, "token is invalid"))
    assert is_retryable(ConnectionRefusedError())
    assert is_retryable(TimeoutError())
    assert not is_retryable(KeyError("bug"))
