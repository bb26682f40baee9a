"""A corpus of malformed and hostile level3v2 frames, each with a name and its expected fate.

Used by the chaos tests (``tests/chaos``) to feed the system bad input two
ways: through the sandbox's WebSocket (``POST /sandbox/inject``, so the feed
sees it as it would from the exchange) and straight into the Redis stream
(``XADD kumex:{SYM}:l3 msg ...``, as a broken or hostile writer would).

* :func:`malformed` — frames the parser must refuse (``MessageError``): every
  one that reaches the book lands in ``kumex:{SYM}:dlq`` with a reason.
  Each names what the feed does with it when it comes over the socket
  (:class:`WsFate`): stored in the stream, not routable (counted by the feed,
  dropped), consumed by the WebSocket session, or ending the connection.
* :func:`forged_stale` — well-formed messages (unknown order ids, a new
  order, no topic) whose sequence the book has already passed: ignored, never
  dead-lettered.
* :func:`replays` — genuine messages already applied, duplicated and swapped:
  ignored as stale.
* :func:`oversized` — a frame above the WebSocket client's ``max_size``.

Every frame's bytes are unique in the corpus, so a test can match the DLQ to
the corpus by content. Frames are built around a symbol and a sequence so that
they look as plausible as possible: a parser that let one through would
corrupt the book.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "DEEP_NESTING",
    "MAX_WS_FRAME",
    "ONE_MB",
    "Frame",
    "WsFate",
    "forged_stale",
    "malformed",
    "oversized",
    "replays",
]

TOPIC_PREFIX: Final = "/contractMarket/level3v2:"
#: The size of the "1 MB" frame: below the feed's WebSocket max_size (1 MiB), above
#: the parser's 64 KiB limit.
ONE_MB: Final = 1_000_000
#: The websockets client's default (and the feed's) max_size: a bigger frame closes
#: the connection (1009).
MAX_WS_FRAME: Final = 1 << 20
#: Nesting depth of the deeply nested frame: well past the interpreter's recursion
#: limit (1000), well under the parser's 64 KiB size limit.
DEEP_NESTING: Final = 5000
_TS: Final = 1_654_073_289_160_921_530


class WsFate(enum.Enum):
    """What the feed does with a frame that comes over the exchange's WebSocket."""

    #: A data frame of a configured symbol: appended to the stream as is.
    STORED = "stored"
    #: No configured symbol to file it under: counted in
    #: ``kumex_feed_messages_unrouted_total{reason}`` (:attr:`Frame.reason`), dropped.
    UNROUTED = "unrouted"
    #: A protocol frame (welcome, ack, pong, ping) the client session handles itself.
    CONSUMED = "consumed"
    #: Ends the connection (an ``error`` envelope, a frame over max_size): the
    #: feed reconnects.
    DISCONNECT = "disconnect"


@dataclass(frozen=True, slots=True)
class Frame:
    """One corpus entry: ``raw`` as sent (``bytes`` go as a binary WebSocket frame)."""

    name: str
    raw: str | bytes
    ws: WsFate
    #: The feed's unrouted ``reason`` label when ``ws`` is :attr:`WsFate.UNROUTED`.
    reason: str | None = None

    @property
    def data(self) -> bytes:
        """The frame's bytes, as they are stored in Redis."""
        return self.raw if isinstance(self.raw, bytes) else self.raw.encode("utf-8")

    @property
    def binary(self) -> bool:
        return isinstance(self.raw, bytes)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _open_data(symbol: str, sequence: int, oid: str) -> dict[str, Any]:
    return {"symbol": symbol, "sequence": sequence, "side": "buy", "orderTime": _TS - 7,
            "size": "10", "orderId": oid, "price": "31570.0", "ts": _TS}


def _envelope(symbol: str, subject: Any, data: Any, **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"type": "message", "topic": TOPIC_PREFIX + symbol,
                           "subject": subject, "data": data}
    env.update(extra)
    return env


def _msg(symbol: str, subject: Any, data: Any, **extra: Any) -> str:
    return _dumps(_envelope(symbol, subject, data, **extra))


def malformed(symbol: str, sequence: int, *, other_symbol: str = "ETHUSDTM") -> list[Frame]:
    """Frames the parser must refuse, built as if they were message ``sequence`` of ``symbol``.

    Refused frames never consume a sequence, so using the next one makes each
    the most damaging it could be if it got through.
    """
    out: list[Frame] = []
    topic = TOPIC_PREFIX + symbol

    def add(name: str, raw: str | bytes, ws: WsFate, reason: str | None = None) -> None:
        out.append(Frame(name, raw, ws, reason))

    def stored(name: str, raw: str | bytes) -> None:
        add(name, raw, WsFate.STORED)

    def unrouted(name: str, raw: str | bytes, reason: str) -> None:
        add(name, raw, WsFate.UNROUTED, reason)

    def oid(name: str) -> str:
        return f"chaos-{name}"

    def open_with(name: str, **changes: Any) -> str:
        data = _open_data(symbol, sequence, oid(name))
        for key, value in changes.items():
            if value is _DELETE:
                del data[key]
            else:
                data[key] = value
        return _msg(symbol, "open", data)

    valid_open = _msg(symbol, "open", _open_data(symbol, sequence, oid("truncated")))

    # -- not JSON, or not a JSON object: the feed cannot route them -------------------
    unrouted("empty", "", "invalid")
    unrouted("whitespace", " \t\r\n ", "invalid")
    unrouted("not_json", "chaos: this is not JSON", "invalid")
    unrouted("truncated", valid_open[: len(valid_open) // 2], "invalid")
    unrouted("json_array", '["chaos-array",1,2]', "invalid")
    unrouted("json_string", '"chaos-string"', "invalid")
    unrouted("json_number", "31570.5", "invalid")
    unrouted("json_null", "null", "invalid")
    unrouted("trailing_garbage",
             open_with("trailing_garbage") + " chaos", "invalid")
    unrouted("two_messages_in_one_frame",
             open_with("two_a") + open_with("two_b"), "invalid")
    unrouted("bare_nan_literal",
             open_with("bare_nan").replace(f'"sequence":{sequence}', '"sequence":NaN'),
             "invalid")
    unrouted("bare_infinity_literal",
             open_with("bare_inf").replace(f'"ts":{_TS}', '"ts":Infinity'), "invalid")
    unrouted("single_quotes", open_with("single_quotes").replace('"', "'"), "invalid")
    # json.dumps escapes control characters: put a raw one in afterwards.
    unrouted("raw_control_character",
             open_with("rawctl").replace("chaos-rawctl", "chaos-raw\x01ctl"), "invalid")
    unrouted("utf8_bom", "\ufeff" + open_with("bom"), "invalid")
    unrouted("lone_surrogate_escape",
             open_with("surrogate").replace("chaos-surrogate", "chaos-\\udcff"), "invalid")
    unrouted("deeply_nested",
             _msg(symbol, "open", {**_open_data(symbol, sequence, oid("deep")),
                                   "x": "@"}).replace('"@"', "[" * DEEP_NESTING
                                                      + "]" * DEEP_NESTING), "invalid")
    # Bytes that are not UTF-8: only a binary frame (or Redis) can carry them.
    unrouted("invalid_utf8_binary",
             open_with("bad_utf8").encode().replace(b"chaos-bad_utf8", b"chaos-\xff\xfe"),
             "invalid")
    unrouted("latin1_binary", open_with("latin1_caf\u00e9").encode("latin-1"), "invalid")

    # -- JSON objects that are not data messages ------------------------------------
    data = _open_data(symbol, sequence, oid("no_type"))
    unrouted("envelope_without_type", _dumps({"topic": topic, "subject": "open", "data": data}),
             "unknown_type")
    unrouted("envelope_type_number", _dumps({**_envelope(symbol, "open", _open_data(
        symbol, sequence, oid("type_number"))), "type": 42}), "unknown_type")
    unrouted("unknown_envelope_type", _dumps({**_envelope(symbol, "open", _open_data(
        symbol, sequence, oid("notice"))), "type": "notice"}), "unknown_type")
    unrouted("envelope_type_upper_case", _dumps({**_envelope(symbol, "open", _open_data(
        symbol, sequence, oid("upper"))), "type": "MESSAGE"}), "unknown_type")
    add("welcome_in_stream", '{"id":"chaos-welcome","type":"welcome"}', WsFate.CONSUMED)
    add("ack_in_stream", '{"id":"chaos-ack","type":"ack"}', WsFate.CONSUMED)
    add("pong_in_stream", '{"id":"chaos-pong","type":"pong"}', WsFate.CONSUMED)
    add("server_ping", '{"id":"chaos-ping","type":"ping"}', WsFate.CONSUMED)
    add("error_envelope",
        '{"id":"chaos-error","type":"error","code":500,"data":"chaos: injected error"}',
        WsFate.DISCONNECT)
    # "²".isdigit() is true but int("²") raises: once crashed the parser and the feed.
    add("error_code_superscript_digit",
        '{"id":"chaos-error-2","type":"error","code":"\u00b2","data":"chaos"}',
        WsFate.DISCONNECT)

    # -- routed by topic, refused by the parser --------------------------------------
    def routed_data(name: str, subject: Any, data: Any) -> None:
        stored(name, _msg(symbol, subject, data))

    stored("missing_subject", _dumps({"type": "message", "topic": topic,
                                      "data": _open_data(symbol, sequence, oid("no_subj"))}))
    routed_data("unknown_subject", "teleport", _open_data(symbol, sequence, oid("teleport")))
    routed_data("subject_upper_case", "OPEN", _open_data(symbol, sequence, oid("OPEN")))
    routed_data("subject_number", 7, _open_data(symbol, sequence, oid("subject7")))
    routed_data("subject_null_with_data", None, _open_data(symbol, sequence, oid("subjnull")))
    stored("missing_data", _dumps({"type": "message", "topic": topic, "subject": "open",
                                   "id": "chaos-missing-data"}))
    routed_data("data_null", "done", None)
    routed_data("data_array", "open", ["chaos-data-array", sequence])
    routed_data("data_string", "open", "chaos-data-string")
    routed_data("data_empty_object", "received", {})
    for key in ("symbol", "sequence", "ts", "orderId", "price", "size", "side"):
        stored(f"open_without_{key}", open_with(f"no_{key}", **{key: _DELETE}))
    stored("sequence_as_string", open_with("seq_str", sequence=str(sequence)))
    stored("sequence_as_float", open_with("seq_float", sequence=float(sequence)))
    stored("sequence_as_bool", open_with("seq_bool", sequence=True))
    stored("sequence_null", open_with("seq_null", sequence=None))
    stored("sequence_negative", open_with("seq_neg", sequence=-sequence))
    stored("sequence_above_int64", open_with("seq_2_63", sequence=2**63))
    stored("sequence_huge", open_with("seq_1e40", sequence=10**40))
    stored("sequence_exponent", open_with("seq_exp").replace(
        f'"sequence":{sequence}', f'"sequence":{sequence}e0'))
    stored("ts_above_int64", open_with("ts_big", ts=2**64 + 1))
    stored("ts_negative", open_with("ts_neg", ts=-1))
    stored("order_time_above_int64", open_with("otime_big", orderTime=2**63))
    stored("size_negative", open_with("size_neg", size="-10"))
    stored("size_zero", open_with("size_zero", size="0"))
    stored("size_nan", open_with("size_nan", size="NaN"))
    stored("size_infinity", open_with("size_inf", size="Infinity"))
    stored("size_not_a_number", open_with("size_word", size="ten"))
    stored("size_empty", open_with("size_empty", size=""))
    stored("size_as_number", open_with("size_num", size=10))
    stored("size_above_int64", open_with("size_2_63", size=str(2**63)))
    stored("size_many_digits", open_with("size_digits", size="9" * 5000))
    # int(Decimal("1e999999999")) never returns: once froze every parser of the stream.
    stored("size_huge_exponent", open_with("size_exp", size="1e999999999"))
    stored("size_hex", open_with("size_hex", size="0x10"))
    stored("price_negative", open_with("price_neg", price="-31570.0"))
    stored("price_zero", open_with("price_zero", price="0"))
    stored("price_nan", open_with("price_nan", price="NaN"))
    stored("price_snan", open_with("price_snan", price="sNaN"))
    stored("price_infinity", open_with("price_inf", price="-Infinity"))
    stored("price_not_a_number", open_with("price_word", price="3l570"))
    stored("price_empty", open_with("price_empty", price=""))
    stored("price_as_number", open_with("price_num", price=31570.0))
    stored("side_unknown", open_with("side_long", side="long"))
    stored("side_upper_case", open_with("side_upper", side="BUY"))
    stored("order_id_number", open_with("oid_num", orderId=629727))
    stored("symbol_number", open_with("sym_num", symbol=7))
    stored("done_reason_unknown", _msg(symbol, "done", {
        "symbol": symbol, "sequence": sequence, "orderId": oid("expired"),
        "reason": "expired", "ts": _TS}))
    stored("update_size_negative", _msg(symbol, "update", {
        "symbol": symbol, "sequence": sequence, "orderId": oid("upd_neg"), "size": "-1",
        "ts": _TS}))
    stored("match_remain_size_negative", _msg(symbol, "match", {
        "symbol": symbol, "sequence": sequence, "side": "buy", "price": "31570.0",
        "size": "1", "remainSize": "-1", "makerOrderId": oid("maker"),
        "takerOrderId": oid("taker"), "tradeId": oid("trade"), "ts": _TS}))
    stored("match_without_maker", _msg(symbol, "match", {
        "symbol": symbol, "sequence": sequence, "side": "sell", "price": "31570.0",
        "size": "1", "takerOrderId": oid("taker2"), "tradeId": oid("trade2"), "ts": _TS}))
    stored("topic_symbol_mismatch", _msg(symbol, "open", _open_data(
        other_symbol, sequence, oid("mismatch"))))
    stored("valid_utf8_binary_frame",
           open_with("binary_negative", size="-3").encode("utf-8"))
    stored("frame_1mb", _padded(symbol, sequence, oid("1mb"), ONE_MB, "x"))

    # -- a topic the feed is not subscribed to, or not a level3v2 topic --------------
    unrouted("topic_of_another_symbol", _msg(other_symbol, "open", _open_data(
        other_symbol, sequence, oid("other"))), "unknown_topic")
    unrouted("multi_symbol_topic", _dumps(_envelope(symbol, "open", _open_data(
        symbol, sequence, oid("multi")), topic=f"{TOPIC_PREFIX}{symbol},{other_symbol}")),
        "unknown_topic")
    unrouted("level2_topic", _dumps(_envelope(symbol, "open", _open_data(
        symbol, sequence, oid("level2")), topic=f"/contractMarket/level2:{symbol}")),
        "unknown_topic")
    unrouted("topic_not_a_string", _dumps(_envelope(symbol, "open", _open_data(
        symbol, sequence, oid("topic_num")), topic=12345)), "no_topic")

    _check_unique(out)
    return out


class _Delete:
    """Marker: remove this key."""


_DELETE: Final = _Delete()


def forged_stale(symbol: str, sequence: int) -> list[Frame]:
    """Well-formed messages at ``sequence`` (which the book must already have passed).

    Unknown order ids, a new order, a message without a topic: the parser
    accepts them; the book must ignore them as stale (they are not refused).
    """
    topic_free = _dumps({"type": "message", "subject": "done", "data": {
        "symbol": symbol, "sequence": sequence, "orderId": "chaos-no-topic",
        "reason": "canceled", "ts": _TS}})
    frames = [
        Frame("done_unknown_order", _msg(symbol, "done", {
            "symbol": symbol, "sequence": sequence, "orderId": "chaos-unknown-done",
            "reason": "filled", "ts": _TS}), WsFate.STORED),
        Frame("update_unknown_order", _msg(symbol, "update", {
            "symbol": symbol, "sequence": sequence, "orderId": "chaos-unknown-update",
            "size": "1", "ts": _TS}), WsFate.STORED),
        Frame("match_unknown_maker", _msg(symbol, "match", {
            "symbol": symbol, "sequence": sequence, "side": "buy", "price": "31570.0",
            "size": "5", "makerOrderId": "chaos-unknown-maker",
            "takerOrderId": "chaos-unknown-taker", "tradeId": "chaos-trade", "ts": _TS}),
            WsFate.STORED),
        Frame("open_new_order", _msg(symbol, "open", _open_data(
            symbol, sequence, "chaos-stale-open")), WsFate.STORED),
        Frame("received_unknown_order", _msg(symbol, "received", {
            "symbol": symbol, "sequence": sequence, "orderId": "chaos-received",
            "clientOid": "chaos-client-oid", "ts": _TS}), WsFate.STORED),
        Frame("open_max_int64_size", _msg(symbol, "open", {**_open_data(
            symbol, sequence, "chaos-int64"), "size": str(2**63 - 1)}), WsFate.STORED),
        Frame("unknown_fields_and_channel_type", _msg(symbol, "done", {
            "symbol": symbol, "sequence": sequence, "orderId": "chaos-extra-fields",
            "reason": "canceled", "ts": _TS, "chaos": {"nested": [1, 2, 3]}},
            channelType="public", chaos=True), WsFate.STORED),
        Frame("no_topic", topic_free, WsFate.UNROUTED, "no_topic"),
    ]
    _check_unique(frames)
    return frames


def replays(texts: Sequence[str], *, seed: int = 0) -> list[Frame]:
    """Genuine messages already applied, sent again: each duplicated, neighbours swapped."""
    rng = random.Random(seed)
    out: list[Frame] = []
    items = list(texts)
    for i, text in enumerate(items):
        out.append(Frame(f"duplicate_{i}", text, WsFate.STORED))
    swapped = items[:]
    for i in range(0, len(swapped) - 1, 2):
        if rng.random() < 0.5:
            swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    out.extend(Frame(f"out_of_order_{i}", text, WsFate.STORED)
               for i, text in enumerate(reversed(swapped)))
    return out


def oversized(symbol: str, sequence: int, size: int = MAX_WS_FRAME + 4096) -> Frame:
    """A data frame of ``size`` bytes, above the feed's WebSocket ``max_size``."""
    return Frame("frame_over_ws_max_size",
                 _padded(symbol, sequence, "chaos-oversized", size, "y"), WsFate.DISCONNECT)


def _padded(symbol: str, sequence: int, oid: str, size: int, fill: str) -> str:
    """An ``open`` message of exactly ``size`` bytes (a ``pad`` field fills it up)."""
    head = _dumps(_envelope(symbol, "open", _open_data(symbol, sequence, oid), pad=""))
    return head.replace('"pad":""', '"pad":"' + fill * (size - len(head)) + '"')


def _check_unique(frames: Sequence[Frame]) -> None:
    names = [f.name for f in frames]
    datas = [f.data for f in frames]
    if len(set(names)) != len(names) or len(set(datas)) != len(datas):
        raise AssertionError("corpus frames must have unique names and bytes")
