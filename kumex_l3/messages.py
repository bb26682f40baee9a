"""Parsing of raw level3v2 messages and L3 snapshots (pure, no I/O).

``parse_message(raw)`` takes the text or bytes of one WebSocket frame, exactly as
the feed stored it in Redis, and returns a typed message:

* data messages (``"type":"message"``): :class:`Received`, :class:`Open`,
  :class:`Update`, :class:`Match`, :class:`Done`;
* everything else the exchange sends on the socket (``welcome``, ``ack``,
  ``pong``, ``ping``, ``error``): :class:`Control`.

``parse_order_change(raw)`` takes one frame of the private channel
``/contractMarket/tradeOrders`` (an account's own orders, docs/protocol.md §8) and
returns an :class:`OrderChange`, or None for a frame that is not an order change
(``welcome``, ``ack``, ``pong``...).

Anything that is not one of these (bad JSON, a missing field, a wrong type, a
negative or non-numeric size, an unknown subject, a frame over
:data:`MAX_MESSAGE_BYTES`) raises :class:`~kumex_l3.errors.MessageError`
carrying the reason; the caller decides what to do with it (dead-letter queue).

Exactness: ``sequence``, ``ts`` and ``orderTime`` are decoded straight to Python
``int`` (nanosecond timestamps exceed 2**53 and must never go through a float).
Prices keep their original text (``price``) and their exact value
(``price_value``, a :class:`~decimal.Decimal`); sizes keep their text (``size``)
and their exact value (``qty``: an ``int`` for whole contract counts, else a
``Decimal``). Prices are compared as numbers, never as strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar

import msgspec

from kumex_l3.errors import MessageError

__all__ = [
    "CHANGE_TYPES",
    "MAX_MESSAGE_BYTES",
    "PRIVATE_TOPIC",
    "TOPIC_PREFIX",
    "Control",
    "DataMessage",
    "Done",
    "Match",
    "Message",
    "Open",
    "OrderChange",
    "Qty",
    "Received",
    "Snapshot",
    "SnapshotOrder",
    "Update",
    "format_qty",
    "parse_message",
    "parse_order_change",
    "parse_price",
    "parse_qty",
    "parse_snapshot",
]

#: Larger frames are refused without decoding (a real level3v2 frame is ~300 bytes).
MAX_MESSAGE_BYTES: Final = 64 * 1024
#: Topic of the L3 stream; the symbol follows the colon.
TOPIC_PREFIX: Final = "/contractMarket/level3v2:"

#: A size: an ``int`` for whole contract counts (futures), else an exact ``Decimal``.
Qty: TypeAlias = int | Decimal

Side = Literal["buy", "sell"]

_ZERO: Final = Decimal(0)

#: Sequences and nanosecond timestamps: exact non-negative integers within int64.
_U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

#: Largest size accepted (int64): no contract count comes near it, and bounding it
#: keeps hostile sizes cheap (``int(Decimal("1e999999999"))`` would never return).
_MAX_QTY: Final = 2**63 - 1
_MAX_QTY_DIGITS: Final = len(str(_MAX_QTY))


def parse_price(text: str) -> Decimal:
    """Exact value of a price text; refuses non-numbers, non-finite and non-positive values."""
    try:
        value = Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        raise MessageError(f"price {text!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise MessageError(f"price {text!r} must be a positive finite number")
    return value


def parse_qty(text: str, *, allow_zero: bool = False) -> Qty:
    """Exact value of a size text: ``int`` when it is a whole number, else ``Decimal``.

    Refuses (``MessageError``) non-numbers, non-finite, negative (zero unless
    ``allow_zero``) and sizes above 2**63-1, before any costly conversion.
    """
    if text.isdigit() and text.isascii():
        if len(text.lstrip("0")) > _MAX_QTY_DIGITS:
            raise MessageError(f"size {text[:40]!r} is out of range")
        value: Qty = int(text)
    else:
        try:
            dec = Decimal(text)
        except (InvalidOperation, TypeError, ValueError):
            raise MessageError(f"size {text!r} is not a number") from None
        if not dec.is_finite():
            raise MessageError(f"size {text!r} is not finite")
        if dec.adjusted() >= _MAX_QTY_DIGITS:
            raise MessageError(f"size {text[:40]!r} is out of range")
        value = int(dec) if dec == dec.to_integral_value() else dec
    if value > _MAX_QTY:
        raise MessageError(f"size {text[:40]!r} is out of range")
    if value < 0 or (value == 0 and not allow_zero):
        raise MessageError(f"size {text!r} must be {'>= 0' if allow_zero else '> 0'}")
    return value


#: Exact values of the price and size texts seen lately, so that the common case (a
#: price or size the book saw a moment ago) is one dict lookup. A value enters only
#: once :func:`parse_price` or :func:`parse_qty` accepted its text; the memo is
#: emptied when it reaches :data:`_MEMO_MAX` texts (a hostile stream of distinct
#: texts costs what it would without the memo, never unbounded memory).
_PRICES: Final[dict[str, Decimal]] = {}
_SIZES: Final[dict[str, Qty]] = {}
_MEMO_MAX: Final = 1 << 16
_V = TypeVar("_V")


def _remember(memo: dict[str, _V], text: str, value: _V) -> _V:
    """``value`` kept in ``memo`` under ``text`` (the memo emptied when full)."""
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[text] = value
    return value


def _price(text: str) -> Decimal:
    return _remember(_PRICES, text, parse_price(text))


def _size(text: str) -> Qty:
    return _remember(_SIZES, text, parse_qty(text))


def format_qty(qty: Qty) -> str:
    """Text of a size computed by the book (``"10"``, ``"0.5"``), never in exponent form."""
    if isinstance(qty, int):
        return str(qty)
    return format(qty.normalize(), "f")


class _Data(msgspec.Struct, rename="camel", gc=False, kw_only=True):
    symbol: str
    sequence: _U63
    ts: _U63


class Received(_Data, kw_only=True, gc=False, rename="camel"):
    """``received``: the engine accepted an order; links ``client_oid`` to ``order_id``."""

    order_id: str
    client_oid: str | None = None


class Open(_Data, kw_only=True, gc=False, rename="camel"):
    """``open``: an order now rests on the book with ``size`` at ``price``."""

    side: Side
    price: str
    size: str
    order_id: str
    order_time: _U63 | None = None
    price_value: Decimal = msgspec.field(default=_ZERO, name="__price_value")
    qty: int | Decimal = msgspec.field(default=0, name="__qty")

    def __post_init__(self) -> None:
        self.price_value = _PRICES.get(self.price) or _price(self.price)
        self.qty = _SIZES.get(self.size) or _size(self.size)


class Update(_Data, kw_only=True, gc=False, rename="camel"):
    """``update``: a resting order's size is now ``size`` (it keeps its place)."""

    order_id: str
    size: str
    qty: int | Decimal = msgspec.field(default=0, name="__qty")

    def __post_init__(self) -> None:
        self.qty = parse_qty(self.size, allow_zero=True)


class Match(_Data, kw_only=True, gc=False, rename="camel"):
    """``match``: ``size`` traded at the maker's ``price``; ``side`` is the taker's side."""

    side: Side
    price: str
    size: str
    maker_order_id: str
    taker_order_id: str
    trade_id: str
    remain_size: str | None = None
    price_value: Decimal = msgspec.field(default=_ZERO, name="__price_value")
    qty: int | Decimal = msgspec.field(default=0, name="__qty")
    remain_qty: int | Decimal | None = msgspec.field(default=None, name="__remain_qty")

    def __post_init__(self) -> None:
        self.price_value = _PRICES.get(self.price) or _price(self.price)
        self.qty = _SIZES.get(self.size) or _size(self.size)
        if self.remain_size is not None:
            self.remain_qty = parse_qty(self.remain_size, allow_zero=True)


class Done(_Data, kw_only=True, gc=False, rename="camel"):
    """``done``: the order left the book (or never rested), ``reason`` filled or canceled."""

    order_id: str
    reason: Literal["filled", "canceled"]


DataMessage: TypeAlias = Received | Open | Update | Match | Done


@dataclass(frozen=True, slots=True)
class Control:
    """A non-data envelope: ``welcome``, ``ack``, ``pong``, ``ping`` or ``error``."""

    type: str
    id: str | None
    code: int | None = None
    data: Any = None


Message: TypeAlias = DataMessage | Control


class _Envelope(msgspec.Struct, gc=False):
    type: str
    id: str | int | None = None
    topic: str | None = None
    subject: str | None = None
    code: int | str | None = None
    data: msgspec.Raw = msgspec.Raw(b"")


#: What decoding hostile input may raise: msgspec raises ``RecursionError`` (not a
#: ``DecodeError``) for JSON nested deeper than the interpreter's recursion limit.
_DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

_CONTROL_TYPES: Final = frozenset({"welcome", "ack", "pong", "ping", "error"})
_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "received": msgspec.json.Decoder(Received),
    "open": msgspec.json.Decoder(Open),
    "update": msgspec.json.Decoder(Update),
    "match": msgspec.json.Decoder(Match),
    "done": msgspec.json.Decoder(Done),
}
_ANY: Final = msgspec.json.Decoder()


# The common case in one pass: the whole frame decoded at once, the subject (a field
# of the envelope, beside ``data``) choosing the data's type. The envelope's fields
# are those of _Envelope, with the same types, so a frame this accepts is one the
# two-pass path accepts too; anything else (control frames, every malformed frame)
# takes the two-pass path, which names the reason.
class _Frame(msgspec.Struct, gc=False, kw_only=True, tag_field="subject"):
    type: Literal["message"]  # a control frame with a subject takes the two-pass path
    id: str | int | None = None
    topic: str | None = None
    code: int | str | None = None


class _ReceivedFrame(_Frame, tag="received"):
    data: Received


class _OpenFrame(_Frame, tag="open"):
    data: Open


class _UpdateFrame(_Frame, tag="update"):
    data: Update


class _MatchFrame(_Frame, tag="match"):
    data: Match


class _DoneFrame(_Frame, tag="done"):
    data: Done


_FRAME: Final = msgspec.json.Decoder(
    _ReceivedFrame | _OpenFrame | _UpdateFrame | _MatchFrame | _DoneFrame)
#: Topics already found to be the L3 topic of their symbol (topic -> symbol), bounded.
_TOPICS: Final[dict[str, str]] = {}


def parse_message(raw: bytes | bytearray | memoryview | str) -> Message:
    """Parse one raw WebSocket frame (see the module docstring). Raises ``MessageError``."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        frame = _FRAME.decode(raw)
    except _DECODE_ERRORS:
        return _parse_in_two_passes(raw)
    msg: DataMessage = frame.data
    topic = frame.topic
    if topic is None or _TOPICS.get(topic) == msg.symbol:
        return msg
    return _parse_in_two_passes(raw)


def _parse_in_two_passes(raw: bytes | bytearray | memoryview | str) -> Message:
    """The envelope, then its data by subject: every frame, with the reason of a refusal."""
    try:
        env = _ENVELOPE.decode(raw)
    except _DECODE_ERRORS as exc:
        raise MessageError(f"bad envelope: {exc}") from None
    if env.type != "message":
        if env.type in _CONTROL_TYPES:
            return _control(env)
        raise MessageError(f"unknown envelope type {env.type!r}")
    subject = env.subject
    if subject is None:
        raise MessageError("data message without subject")
    decoder = _DECODERS.get(subject)
    if decoder is None:
        raise MessageError(f"unknown subject {subject!r}")
    if not env.data:
        raise MessageError(f"{subject}: missing data")
    try:
        msg: DataMessage = decoder.decode(env.data)
    except _DECODE_ERRORS as exc:  # ValidationError is one
        raise MessageError(f"{subject}: {exc}") from None
    topic = env.topic
    if topic is not None and not (
        topic.startswith(TOPIC_PREFIX) and topic.endswith(msg.symbol)
        and len(topic) == len(TOPIC_PREFIX) + len(msg.symbol)
    ):
        raise MessageError(f"{subject}: topic {topic!r} does not match symbol {msg.symbol!r}")
    if topic is not None:
        _remember(_TOPICS, topic, msg.symbol)
    return msg


def _control(env: _Envelope) -> Control:
    data: Any = None
    if env.data:
        try:
            data = _ANY.decode(env.data)
        except _DECODE_ERRORS as exc:
            raise MessageError(f"{env.type}: bad data: {exc}") from None
    code = env.code
    if isinstance(code, str):
        # ASCII digits only ("²".isdigit() is true, int("²") raises), bounded length.
        code = int(code) if code.isascii() and code.isdigit() and len(code) <= 18 else None
    return Control(type=env.type, id=None if env.id is None else str(env.id), code=code, data=data)


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True, slots=True)
class SnapshotOrder:
    """One resting order of a snapshot."""

    order_id: str
    price: str
    price_value: Decimal
    size: str
    qty: Qty
    ts: int
    order_time: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An L3 snapshot; ``bids`` best (highest) first, ``asks`` best (lowest) first, then by ts."""

    symbol: str
    sequence: _U63
    ts: _U63
    bids: tuple[SnapshotOrder, ...]
    asks: tuple[SnapshotOrder, ...]


def _int_field(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int:
        raise MessageError(f"snapshot: {name} must be an integer, got {value!r:.40}")
    return value


def _row(row: Any, where: str) -> SnapshotOrder:
    if not isinstance(row, list | tuple):
        raise MessageError(f"snapshot: {where} is not a list")
    order_time: int | None = None
    if len(row) == 4:
        order_id, price, size, ts = row
    elif len(row) == 5:
        order_time, order_id, price, size, ts = row
        if type(order_time) is not int:
            raise MessageError(f"snapshot: {where} orderTime must be an integer")
    else:
        raise MessageError(f"snapshot: {where} has {len(row)} elements, expected 4 or 5")
    if not isinstance(order_id, str) or not order_id:
        raise MessageError(f"snapshot: {where} orderId must be a non-empty string")
    if not isinstance(price, str) or not isinstance(size, str):
        raise MessageError(f"snapshot: {where} price and size must be strings")
    if type(ts) is not int:
        raise MessageError(f"snapshot: {where} ts must be an integer")
    try:
        return SnapshotOrder(order_id, price, parse_price(price), size, parse_qty(size), ts,
                             order_time)
    except MessageError as exc:
        raise MessageError(f"snapshot: {where}: {exc.reason}") from None


def parse_snapshot(data: Mapping[str, Any] | bytes | str) -> Snapshot:
    """Parse the ``data`` of ``/api/v2/level3/snapshot`` (a dict, or its JSON text).

    Accepts 4-element rows ``[orderId, price, size, ts]`` and 5-element rows
    ``[orderTime, orderId, price, size, ts]``, in any order; returns each side
    sorted by price (best first), then by ``ts``. Raises ``MessageError``.
    """
    if isinstance(data, bytes | str):
        try:
            data = _ANY.decode(data)
        except _DECODE_ERRORS as exc:
            raise MessageError(f"snapshot: bad JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise MessageError("snapshot: data is not an object")
    symbol = data.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise MessageError("snapshot: symbol must be a non-empty string")
    sequence = _int_field(data, "sequence")
    ts = data.get("ts", 0)
    if type(ts) is not int:
        raise MessageError("snapshot: ts must be an integer")
    sides: dict[str, tuple[SnapshotOrder, ...]] = {}
    seen: set[str] = set()
    for name in ("bids", "asks"):
        rows = data.get(name, [])
        if not isinstance(rows, list):
            raise MessageError(f"snapshot: {name} is not a list")
        orders = [_row(row, f"{name}[{i}]") for i, row in enumerate(rows)]
        for order in orders:
            if order.order_id in seen:
                raise MessageError(f"snapshot: order {order.order_id} appears twice")
            seen.add(order.order_id)
        if name == "bids":
            orders.sort(key=lambda o: (-o.price_value, o.ts))
        else:
            orders.sort(key=lambda o: (o.price_value, o.ts))
        sides[name] = tuple(orders)
    return Snapshot(symbol, sequence, ts, sides["bids"], sides["asks"])


# ---------------------------------------------------------------------------- private

#: The private channel of an account's orders (``:SYM`` for one contract's).
PRIVATE_TOPIC: Final = "/contractMarket/tradeOrders"
#: The ``type`` values of an order change (docs/protocol.md §8).
CHANGE_TYPES: Final = frozenset({"open", "match", "filled", "canceled", "update"})


@dataclass(frozen=True, slots=True)
class OrderChange:
    """One change of an own order, as the private channel tells it (docs/protocol.md §8).

    ``kind``: ``open``, ``match``, ``filled``, ``canceled`` or ``update``;
    ``filled`` and ``remain`` are the order's filled size and size still open
    right after the change; for a ``match``: ``match_qty``, ``match_price``,
    ``trade_id`` and ``liquidity`` (``maker``/``taker``). ``ts`` in ns, the
    same clock as the level3v2 messages of the change.
    """

    symbol: str
    order_id: str
    client_oid: str
    kind: str
    status: str
    side: str
    size: Qty
    remain: Qty
    filled: Qty
    ts: int
    match_qty: Qty = 0
    match_price: str = ""
    trade_id: str = ""
    liquidity: str = ""

    @property
    def final(self) -> bool:
        """True for ``filled`` and ``canceled``: the order is done."""
        return self.kind in ("filled", "canceled")


def _change_qty(data: Mapping[str, Any], name: str, *, allow_zero: bool = True) -> Qty:
    value = data.get(name)
    if type(value) is int:
        value = str(value)
    if not isinstance(value, str):
        raise MessageError(f"order change: {name} must be a number text, got {value!r:.40}")
    return parse_qty(value, allow_zero=allow_zero)


def _change_text(data: Mapping[str, Any], name: str, *, empty: bool = False) -> str:
    value = data.get(name)
    if not isinstance(value, str) or (not value and not empty) or len(value) > 200:
        raise MessageError(f"order change: {name} must be a non-empty string, got "
                           f"{value!r:.40}")
    return value


def parse_order_change(raw: bytes | bytearray | memoryview | str) -> OrderChange | None:
    """The :class:`OrderChange` in one private-channel frame; None for a frame of another
    kind (control frames, other topics); :class:`MessageError` when it is malformed."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"frame of {len(raw)} bytes is over {MAX_MESSAGE_BYTES}")
    try:
        frame = _ANY.decode(raw)
    except _DECODE_ERRORS as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(frame, dict) or frame.get("type") != "message":
        return None
    topic = frame.get("topic")
    if not isinstance(topic, str) or not (topic == PRIVATE_TOPIC
                                          or topic.startswith(PRIVATE_TOPIC + ":")):
        return None
    data = frame.get("data")
    if not isinstance(data, dict):
        raise MessageError("order change: data is not an object")
    kind = _change_text(data, "type")
    if kind not in CHANGE_TYPES:
        raise MessageError(f"order change: unknown type {kind!r:.40}")
    ts = data.get("ts")
    if type(ts) is not int or ts < 0:
        raise MessageError(f"order change: ts must be an integer, got {ts!r:.40}")
    side = data.get("side")
    if side not in ("buy", "sell"):
        raise MessageError(f"order change: side must be buy or sell, got {side!r:.40}")
    match_qty: Qty = 0
    match_price = trade_id = liquidity = ""
    if kind == "match":
        match_qty = _change_qty(data, "matchSize", allow_zero=False)
        match_price = _change_text(data, "matchPrice")
        trade_id = _change_text(data, "tradeId")
        said = data.get("liquidity")
        liquidity = said if said in ("maker", "taker") else ""
    return OrderChange(
        symbol=_change_text(data, "symbol"), order_id=_change_text(data, "orderId"),
        client_oid=_change_text(data, "clientOid", empty=True), kind=kind,
        status=_change_text(data, "status", empty=True), side=side,
        size=_change_qty(data, "size", allow_zero=False), remain=_change_qty(data, "remainSize"),
        filled=_change_qty(data, "filledSize"), ts=ts, match_qty=match_qty,
        match_price=match_price, trade_id=trade_id, liquidity=liquidity)
