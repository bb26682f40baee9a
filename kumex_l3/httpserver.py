"""The HTTP/1.1 protocol every service's uvicorn runs: httptools, bounded, with fast routes.

:func:`http_protocol` returns uvicorn's own ``httptools`` protocol (the C parser
of Node's llhttp) with what a service facing the open network needs and
uvicorn leaves out:

* **A deadline on each request's head.** uvicorn closes an idle keep-alive
  connection, but a connection that sends its headers a byte at a time
  (slowloris), or nothing at all, stays open for as long as the client likes.
  Here it is closed ``header_timeout`` seconds after it opened (or after its
  last response) unless a request's head has arrived by then.
* **A bound on the head's size.** llhttp accepts a request line and headers of
  any length; past ``max_head_bytes`` the client gets ``431`` and the
  connection is closed.
* **Fast routes.** ``fast(path, query)`` is asked first about every ``GET``
  that no earlier request of the connection is still being answered for; when
  it returns a :class:`FastAnswer` the response is written at once, from the
  parser's callback: no ASGI scope, task, middleware or framework. It returns
  ``None`` for everything else, which the ASGI app then answers as usual.
  This is for answers already built (the book's bodies are built once per
  book change): a server that does nothing per request but write them costs
  a fraction of a framework's request (docs/BENCHMARKS.md, "Read path").

Pass the class as ``uvicorn.Config(..., http=http_protocol(...))``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, NamedTuple

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

__all__ = ["HEADER_TIMEOUT_S", "MAX_HEAD_BYTES", "FastAnswer", "FastRoute", "http_protocol"]

#: Seconds a client has to send a request's head (slowloris).
HEADER_TIMEOUT_S: Final = 5.0
#: Bytes a request line and headers may take together (h11's own bound is 16 KiB).
MAX_HEAD_BYTES: Final = 16 * 1024


class FastAnswer(NamedTuple):
    """A whole response: status, body, and its own header lines (with content-length).

    Made once per body (:meth:`of`) and written as often as asked for.
    """

    status: int
    body: bytes
    head: bytes

    @classmethod
    def of(cls, status: int, body: bytes,
           headers: tuple[tuple[bytes, bytes], ...] = ()) -> FastAnswer:
        """``headers``: lower-case names and values, as bytes."""
        lines = [b"%s: %s\r\n" % pair for pair in headers]
        lines.append(b"content-length: %d\r\n" % len(body))
        return cls(status, body, b"".join(lines))


#: ``fast(path, query)``: an answer, or ``None`` to let the ASGI app answer.
FastRoute = Callable[[str, bytes], FastAnswer | None]

_TOO_LARGE: Final = b"request head too large"


def http_protocol(header_timeout: float = HEADER_TIMEOUT_S, *,
                  max_head_bytes: int = MAX_HEAD_BYTES,
                  fast: FastRoute | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a head deadline, a head bound and ``fast`` routes."""

    class ServiceProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _fast: FastAnswer | None = None

        # ------------------------------------------------------------ the head deadline

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def handle_websocket_upgrade(self) -> None:
            self._disarm()  # the head is in; the socket is a WebSocket's from now on
            super().handle_websocket_upgrade()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head has as long

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        # ------------------------------------------------------------ the head bound

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            self._fast = None
            # A request pipelined behind a fast answer, in the same read: the keep-alive
            # timer armed by that answer must not close the connection under it.
            self._unset_keepalive_if_required()
            # What uvicorn's on_message_begin sets before the head is read; its ASGI scope
            # is made only for a request the app answers (:meth:`_begin_for_app`).
            self.url = b""
            self.expect_100_continue = False
            self.headers = []

        def _begin_for_app(self) -> None:
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()
            self.url, self.expect_100_continue = url, expect
            self.headers.extend(headers)  # the list the new scope holds

        def _count(self, n: int) -> bool:
            self._head_bytes += n
            if self._head_bytes <= max_head_bytes:
                return True
            if not self.transport.is_closing():
                self._refuse_head()
            return False

        def _refuse_head(self) -> None:
            self.transport.write(b"".join([
                STATUS_LINE[431], b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(_TOO_LARGE), b"connection: close\r\n\r\n",
                _TOO_LARGE]))
            self.transport.close()

        def on_url(self, url: bytes) -> None:
            if self._count(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._count(len(name) + len(value) + 4):
                super().on_header(name, value)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return  # refused (431) or timed out: nothing more is read
            super().data_received(data)

        # ------------------------------------------------------------ fast routes

        def on_headers_complete(self) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            if fast is not None and self._fast_allowed():
                url = self.url
                mark = url.find(b"?")
                raw_path, query = (url, b"") if mark < 0 else (url[:mark], url[mark + 1:])
                if b"%" not in raw_path and raw_path[:1] == b"/":
                    answer = fast(raw_path.decode("ascii", "replace"), query)
                    if answer is not None:
                        self._fast = answer
                        return
            self._begin_for_app()
            super().on_headers_complete()

        def _fast_allowed(self) -> bool:
            cycle = self.cycle
            return (self.parser.get_method() == b"GET" and not self.pipeline
                    and (cycle is None or cycle.response_complete)
                    and not self.parser.should_upgrade())

        def on_body(self, body: bytes) -> None:
            if self._fast is None and not self.transport.is_closing():
                super().on_body(body)

        def on_message_complete(self) -> None:
            answer, self._fast = self._fast, None
            if answer is not None:
                self._write_fast(answer)
            elif not self.transport.is_closing():
                super().on_message_complete()

        def _write_fast(self, answer: FastAnswer) -> None:
            keep_alive = (self.parser.get_http_version() != "1.0"
                          and self.parser.should_keep_alive())
            self.transport.write(b"".join((
                STATUS_LINE[answer.status], _server_headers(self.server_state.default_headers),
                answer.head, b"\r\n" if keep_alive else b"connection: close\r\n\r\n",
                answer.body)))
            if keep_alive:
                self.on_response_complete()
            else:
                self.server_state.total_requests += 1
                self.transport.close()

    return ServiceProtocol


_server_headers_of: tuple[object, bytes] = (None, b"")


def _server_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default header lines (``server``, ``date``) as bytes, made again only when
    uvicorn replaces the list (the date, once a second)."""
    global _server_headers_of
    source, lines = _server_headers_of
    if source is not headers:
        lines = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        _server_headers_of = (headers, lines)
    return lines
