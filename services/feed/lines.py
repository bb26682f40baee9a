"""One line of the feed: a WebSocket connection to the exchange that keeps itself up.

A :class:`Line` takes its own token, opens its own connection (its own
``connectId``), subscribes to every symbol of the feed (one subscribe message
for up to 100 symbols; over 100 symbols, the venue's limit for a connection,
the line holds one connection per hundred, and it is up while all of them are)
and hands each frame to
its owner (the :class:`~services.feed.feed.Feed`, which arbitrates the lines
by sequence). When the connection ends, for whatever reason, the line says
so and connects again, on its own schedule, independently of the other lines.

Reconnect policy (:func:`reconnect_delay`, pure): a session that subscribed
and delivered data was healthy: the backoff is reset and the next attempt is
made at once (a small jitter, so that lines cut together do not reconnect in
lock step); only attempts that fail make the delay grow, exponentially, up to
``FEED_BACKOFF_MAX``. A venue that drops every socket after 30 s therefore
costs one round trip each time, never a growing delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from kumex_l3.backoff import Backoff
from kumex_l3.logs import kv
from kumex_l3.tasks import cancel_and_wait
from kumex_l3.wsclient import Connection, DataFrame, WsClient, is_retryable

__all__ = ["HEALTHY_JITTER_S", "Line", "LineOwner", "reconnect_delay"]

_log = logging.getLogger(__name__)

#: Largest delay before reconnecting after a healthy session (a jitter, not a backoff).
HEALTHY_JITTER_S: Final = 0.25


class LineOwner(Protocol):
    """What a line tells its feed."""

    def line_up(self, line: Line, conn: Connection) -> None:
        """The line is connected and subscribed to every topic."""

    def line_down(self, line: Line, reason: str) -> None:
        """The line's connection ended (after :meth:`line_up`)."""

    def line_frame(self, line: Line, frame: DataFrame) -> None:
        """A frame for the caller (data, or anything the session did not consume)."""


def reconnect_delay(backoff: Backoff, *, healthy: bool, rng: random.Random) -> float:
    """Seconds before the next attempt: at once (jittered) after a healthy session, else
    the backoff's next delay (module doc)."""
    if healthy:
        backoff.reset()
        return rng.uniform(0.0, min(HEALTHY_JITTER_S, backoff.initial))
    return backoff.next_delay()


class Line:
    """Connection ``index`` of the feed (see the module docstring)."""

    def __init__(self, index: int, ws: WsClient, shards: Sequence[Sequence[str]],
                 owner: LineOwner, *, backoff: Backoff, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.name = f"line-{index}"
        self._ws = ws
        #: The topics of each of the line's connections (level3_topics: 100 symbols each).
        self._shards = [list(topics) for topics in shards]
        self._owner = owner
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._clock = clock
        self.connect_id: str | None = None
        self.subscribed = False
        #: Connections subscribed so far, and reconnections after an ended one.
        self.connections = 0
        self.reconnects = 0
        #: Data frames delivered on the current connection.
        self.frames = 0
        self.since: float | None = None
        self.last_error = ""
        self.last_delay = 0.0

    def status(self) -> dict[str, object]:
        """For ``/readyz``."""
        return {"line": self.index, "connected": self.subscribed, "connectId": self.connect_id,
                "connections": self.connections, "reconnects": self.reconnects,
                "lastError": self.last_error[:200], "retryIn": round(self.last_delay, 3)}

    async def run(self) -> None:
        """Connect, read, reconnect, forever (cancel to stop). Raises only on a bug."""
        owner = self._owner
        while True:
            reason = "connection ended"
            healthy = False
            try:
                async with contextlib.AsyncExitStack() as stack:
                    conns = [await stack.enter_async_context(self._ws.connect(topics))
                             for topics in self._shards]
                    self.connect_id = ",".join(c.connect_id for c in conns)
                    self.subscribed = True
                    self.connections += 1
                    self.frames = 0
                    self.since = self._clock()
                    owner.line_up(self, conns[0])
                    if len(conns) == 1:
                        await self._read(conns[0])
                    else:
                        await self._read_all(conns)
            except asyncio.CancelledError:
                reason = "the feed is stopping"
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if not is_retryable(exc):
                    raise
            finally:
                healthy = self.subscribed and self.frames > 0
                if self.subscribed:
                    self.subscribed = False
                    owner.line_down(self, reason)
            self.last_error = reason
            self.reconnects += 1
            delay = self.last_delay = reconnect_delay(self._backoff, healthy=healthy,
                                                      rng=self._rng)
            log = _log.info if healthy else _log.warning
            log("exchange connection ended; reconnecting", extra=kv(
                line=self.index, error=reason[:300], retry_in=f"{delay:.2f}s",
                attempt=self._backoff.attempts))
            await asyncio.sleep(delay)

    async def _read(self, conn: Connection) -> None:
        owner = self._owner
        while True:
            frame = await conn.recv_frame()
            self.frames += 1
            owner.line_frame(self, frame)

    async def _read_all(self, conns: Sequence[Connection]) -> None:
        """Read every connection of the line; the line is up while all of them are, so the
        first to end ends the others (and its error is the line's)."""
        tasks = [asyncio.create_task(self._read(conn), name=f"{self.name}-{i}")
                 for i, conn in enumerate(conns)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*tasks)
        for task in done:
            task.result()
