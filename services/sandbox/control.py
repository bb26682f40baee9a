"""The sandbox's control API (``/sandbox/...``, JSON): what tests and demos turn.

Not part of the venue's protocol, and so not under ``/api`` (no REST latency,
no REST error fault, no signature). Errors are ``{"error": "..."}`` with HTTP
400 (bad input), 404 (unknown symbol) or 409 (not possible in this mode).

=====================================  =============================================
``GET  /sandbox/state``                flow (running, rate, steps), sequences per
                                       symbol, fault knobs, injected counts, clients
``POST /sandbox/flow/pause``           stop the synthetic flow (or the replay)
``POST /sandbox/flow/resume``          start it again; optional ``{"rate": r}``
``POST /sandbox/flow/rate``            ``{"rate": r}``: actions/s, 0 = none,
                                       negative or ``"max"`` = as fast as possible
``POST /sandbox/step``                 ``{"n": 10}``: run n flow steps now
                                       (deterministic tests: pause first)
``POST /sandbox/faults``               partial update of the fault knobs
                                       (:class:`~services.sandbox.faults.FaultState`),
                                       e.g. ``{"pong_disabled": true}``
``POST /sandbox/inject``               ``{"symbol": "XBTUSDM", "frames": ["...", ...]}``:
                                       send these raw frames, unchanged and unchecked,
                                       to the symbol's subscribers, in order
                                       (``"binary": true``: frames are base64, sent as
                                       binary frames); counted as ``injected``
``POST /sandbox/rest-error``           ``{"status": 429|500, "seconds": s}``; status
                                       null ends the window
``POST /sandbox/disconnect``           drop every WebSocket client now (a venue-wide
                                       outage); optional ``{"seconds": s}``: and refuse
                                       new connections for ``s`` seconds
``GET  /sandbox/book/{symbol}``        the engine's visible L3 book, best first
``GET  /sandbox/snapshot/{symbol}``    the L3 snapshot, without rate limit or faults
``GET  /sandbox/journal/{symbol}``     ``?after=SEQ&limit=N``: the engine's messages
                                       (before faults) above SEQ, when
                                       ``SANDBOX_JOURNAL_SIZE`` > 0
=====================================  =============================================
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from services.sandbox.engine import RejectError
from services.sandbox.exchange import UnknownSymbol
from services.sandbox.rest import ExchangeDep

__all__ = ["MAX_INJECT_BYTES", "MAX_INJECT_FRAMES", "MAX_STEPS", "router"]

#: Most flow steps one ``POST /sandbox/step`` may ask for.
MAX_STEPS: Final = 100_000
#: Most frames one ``POST /sandbox/inject`` may send.
MAX_INJECT_FRAMES: Final = 10_000
#: Most bytes (all frames together) one ``POST /sandbox/inject`` may send.
MAX_INJECT_BYTES: Final = 16 * 1024 * 1024


class _BadInput(Exception):
    def __init__(self, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.msg = msg
        self.status = status


def _error(msg: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


async def _json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise _BadInput("a JSON object body is required")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        raise _BadInput("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadInput("the body must be a JSON object")
    return body


def _rate(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() == "max":
        return -1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadInput('rate must be a number or "max"')
    rate = float(value)
    if not math.isfinite(rate):
        raise _BadInput("rate must be finite")
    return rate


def _frames(body: dict[str, Any]) -> list[str | bytes]:
    """The frames of an inject request: text as given, or base64-decoded bytes."""
    frames = body.get("frames")
    binary = body.get("binary", False)
    if not isinstance(binary, bool):
        raise _BadInput("binary must be true or false")
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        raise _BadInput("frames must be a list of strings")
    if len(frames) > MAX_INJECT_FRAMES:
        raise _BadInput(f"at most {MAX_INJECT_FRAMES} frames at a time")
    out: list[str | bytes] = []
    total = 0
    for i, frame in enumerate(frames):
        data: str | bytes
        if binary:
            try:
                data = base64.b64decode(frame, validate=True)
            except (binascii.Error, ValueError):
                raise _BadInput(f"frames[{i}] is not base64") from None
            total += len(data)
        else:
            # A text frame is UTF-8 on the wire: a lone surrogate cannot be sent as text.
            try:
                total += len(frame.encode("utf-8"))
            except UnicodeEncodeError:
                raise _BadInput(f"frames[{i}] is not valid UTF-8 text: send it binary"
                                ) from None
            data = frame
        if total > MAX_INJECT_BYTES:
            raise _BadInput(f"at most {MAX_INJECT_BYTES} bytes at a time")
        out.append(data)
    return out


class _Guarded(APIRoute):
    """A control route whose refusals answer ``{"error": ...}``: bad input 400 (or the
    status it names), an unknown symbol 404, an order the engine refuses 409 (404 when
    it does not exist). The REST API answers the same exceptions in the venue's
    envelope (:mod:`services.sandbox.rest`), so this mapping is the control routes' own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handle(request)
            except _BadInput as exc:
                return _error(exc.msg, exc.status)
            except UnknownSymbol as exc:
                return _error(exc.msg, 404)
            except RejectError as exc:
                return _error(exc.msg, 404 if exc.http_status == 404 else 409)

        return guarded


#: The ``/sandbox/...`` endpoints; the exchange they control is the app's
#: (:data:`services.sandbox.rest.ExchangeDep`).
router = APIRouter(prefix="/sandbox", route_class=_Guarded)


@router.get("/state")
async def state(exchange: ExchangeDep) -> JSONResponse:
    return JSONResponse(exchange.state())


@router.post("/flow/pause")
async def pause(exchange: ExchangeDep) -> JSONResponse:
    exchange.pause()
    return JSONResponse(exchange.state()["flow"])


@router.post("/flow/resume")
async def resume(request: Request, exchange: ExchangeDep) -> JSONResponse:
    body = await _json_object(request, optional=True)
    if "rate" in body:
        exchange.set_rate(_rate(body["rate"]))
    exchange.resume()
    return JSONResponse(exchange.state()["flow"])


@router.post("/flow/rate")
async def rate(request: Request, exchange: ExchangeDep) -> JSONResponse:
    body = await _json_object(request)
    if "rate" not in body:
        raise _BadInput("rate is required")
    exchange.set_rate(_rate(body["rate"]))
    return JSONResponse(exchange.state()["flow"])


@router.post("/step")
async def step(request: Request, exchange: ExchangeDep) -> JSONResponse:
    body = await _json_object(request, optional=True)
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_STEPS:
        raise _BadInput(f"n must be an integer in [0, {MAX_STEPS}]")
    messages = exchange.step(n)
    return JSONResponse({"steps": n, "messages": messages, "sequences": exchange.sequences()})


@router.post("/faults")
async def faults(request: Request, exchange: ExchangeDep) -> JSONResponse:
    body = await _json_object(request)
    try:
        exchange.faults.update(**body)
    except (ValueError, TypeError) as exc:
        raise _BadInput(str(exc)) from None
    if "snapshot_rate_per_min" in body:
        exchange.snapshot_limiter.reset()
    return JSONResponse(exchange.faults.to_dict())


@router.post("/inject")
async def inject(request: Request, exchange: ExchangeDep) -> JSONResponse:
    body = await _json_object(request)
    symbol = body.get("symbol")
    if not isinstance(symbol, str) or not exchange.hub.symbol_known(symbol):
        raise _BadInput(f"unknown symbol {symbol!r}", 404)
    frames = _frames(body)
    exchange.hub.inject(symbol, frames)
    return JSONResponse({"symbol": symbol, "injected": len(frames),
                         "subscribers": exchange.hub.subscriber_count(symbol)})


@router.post("/rest-error")
async def rest_error(request: Request, exchange: ExchangeDep) -> JSONResponse:
    body = await _json_object(request)
    status = body.get("status")
    seconds = body.get("seconds", 60)
    if status is None:
        exchange.faults.update(rest_error_status=None, rest_error_until=0.0)
        return JSONResponse(exchange.faults.to_dict())
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds) or seconds <= 0):
        raise _BadInput("seconds must be a positive number")
    try:
        exchange.faults.update(
            rest_error_status=status, rest_error_until=time.monotonic() + float(seconds)
        )
    except (ValueError, TypeError) as exc:
        raise _BadInput(str(exc)) from None
    return JSONResponse(exchange.faults.to_dict())


@router.post("/disconnect")
async def disconnect(request: Request, exchange: ExchangeDep) -> JSONResponse:
    body = await _json_object(request, optional=True)
    seconds = body.get("seconds", 0)
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds) or not 0 <= seconds <= 3600):
        raise _BadInput("seconds must be a number in [0, 3600]")
    closed = exchange.hub.disconnect_all(float(seconds))
    return JSONResponse({"disconnected": closed, "refusingFor": float(seconds)})


@router.get("/book/{symbol}")
async def book(symbol: str, exchange: ExchangeDep) -> JSONResponse:
    if exchange.replay_mode:
        raise _BadInput("no engine book while replaying a capture", 409)
    if symbol not in exchange.engines:
        raise _BadInput(f"unknown symbol {symbol!r}", 404)
    return JSONResponse(exchange.book_l3(symbol))


@router.get("/snapshot/{symbol}")
async def snapshot(symbol: str, exchange: ExchangeDep) -> JSONResponse:
    exchange.check_market_symbol(symbol)
    return JSONResponse(exchange.snapshot(symbol))


@router.get("/journal/{symbol}")
async def journal(symbol: str, request: Request, exchange: ExchangeDep) -> JSONResponse:
    if not exchange.journal:
        raise _BadInput("the journal is off (SANDBOX_JOURNAL_SIZE=0)", 409)
    try:
        after = int(request.query_params.get("after", "0"))
        limit = int(request.query_params.get("limit", "100000"))
    except ValueError:
        raise _BadInput("after and limit must be integers") from None
    if limit < 1:
        raise _BadInput("limit must be positive")
    return JSONResponse(exchange.journal_after(symbol, after, limit))
