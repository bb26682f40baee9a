"""Settings of the book service: :class:`CommonSettings` plus ``BOOK_*`` variables.

Built in ``main()`` with :func:`kumex_l3.config.load_settings` (a bad value
stops the service with a message naming the variable), then passed down.
"""

from __future__ import annotations

import re
import socket

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from kumex_l3.config import CommonSettings, OptionalSecret, check_http_url

__all__ = ["ROLE", "BookSettings"]

#: The lease role of this service (``kumex:{SYM}:owner:book``).
ROLE = "book"

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


class BookSettings(CommonSettings):
    """``python -m services.book``: shared variables plus ``BOOK_*`` (see each field)."""

    model_config = SettingsConfigDict(env_prefix="BOOK_", extra="ignore", populate_by_name=True)

    #: Address the HTTP server binds (``0.0.0.0`` in a container).
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    #: URL other replicas use to reach this one (proxying); default ``http://host:port``,
    #: with the machine's host name when ``host`` is a wildcard address.
    public_url: str | None = None
    #: Identity in the symbol leases; default ``<hostname>-<port>`` (stable across restarts,
    #: so a restarted replica takes its own leases back at once).
    replica_id: str | None = Field(None, min_length=1, max_length=200)
    #: Checkpoint after this many applied messages...
    checkpoint_messages: int = Field(10_000, ge=1)
    #: ...or this many seconds, whichever comes first (only while synced).
    checkpoint_seconds: float = Field(5.0, gt=0)
    #: Lease TTL; renewed every third of it (at most every 2 s). A dead replica's
    #: symbols are taken over within ``ttl + min(ttl / 3, 2 s)`` plus the time to sync.
    lease_ttl_seconds: float = Field(10.0, gt=0, le=60)
    #: Minimum interval between two WebSocket pushes to one client.
    ws_throttle_seconds: float = Field(0.1, ge=0)
    #: A WebSocket client that cannot take a push within this time is dropped.
    ws_send_timeout_seconds: float = Field(5.0, gt=0)
    #: Messages kept while waiting for a snapshot (the oldest are dropped beyond).
    buffer_max: int = Field(100_000, ge=1)
    #: Stream entries read per XREAD.
    read_batch: int = Field(1000, ge=1, le=100_000)
    #: XREAD BLOCK timeout (also the idle tick of the consumer loop).
    read_block_seconds: float = Field(0.25, gt=0, le=10)
    #: While waiting for a snapshot, ask the feed again (and look at the key) this often.
    snapshot_retry_seconds: float = Field(3.0, gt=0)
    #: Without any snapshot or checkpoint, start reading this many entries before the
    #: stream's end (they wait in the buffer for the snapshot asked for).
    lookback_entries: int = Field(10_000, ge=0)
    #: Entries scanned backwards from the end to find where a stored snapshot starts.
    scan_max_entries: int = Field(1_000_000, ge=0)
    #: Approximate bound of the DLQ stream.
    dlq_maxlen: int = Field(10_000, ge=1)
    #: While a book is served, check the feed's heartbeat key ``kumex:{SYM}:feed`` this
    #: often; once it has lapsed the book is not served until shown current. 0 turns the
    #: check off (a stream written by something other than the feed).
    feed_check_seconds: float = Field(1.0, ge=0)
    #: ``/readyz`` turns false when an owned book that was served has not been for longer
    #: than this (a wedged book); a shorter resync keeps the replica ready.
    ready_max_unserved_seconds: float = Field(60.0, gt=0)
    #: The book is served only while its consumer confirmed it current (a stream read
    #: completed) at most this long ago, by this process's own clock: a replica paused
    #: (SIGSTOP, a stalled VM) or cut off from Redis never serves an old book as fresh.
    max_age_seconds: float = Field(3.0, gt=0, le=600)
    #: Deadline of a whole request proxied to the owning replica (connect, wait, body).
    proxy_timeout_seconds: float = Field(5.0, gt=0)
    #: Connections to one owner at most (one slow owner cannot take them all).
    proxy_connections: int = Field(20, ge=1, le=1000)
    #: Largest body relayed from an owner, bytes (past it: 502, nothing relayed).
    proxy_max_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    #: The URLs an owner may advertise in its lease (a regular expression matched in
    #: full): anything else in Redis is never proxied to. The default takes a scheme,
    #: a host and a port, nothing more (no user, path or query).
    peer_url_pattern: str = r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?"
    #: Token the WebSocket's ``own`` list (the user's resting orders) asks for
    #: (``?token=`` or ``Authorization: Bearer``); without it ``own`` is pushed only
    #: when the book listens on a loopback address (:mod:`kumex_l3.access`).
    api_token: OptionalSecret = None
    #: WebSocket clients per replica at most; past it a new one is closed with 1013.
    ws_max_clients: int = Field(256, ge=1)
    #: A relayed owner's WebSocket that answers no ping for this long is dropped.
    ws_relay_ping_seconds: float = Field(5.0, gt=0)

    @field_validator("peer_url_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return check_http_url(value)

    @model_validator(mode="after")
    def _defaults(self) -> BookSettings:
        host = self.host if self.host not in _WILDCARD_HOSTS else socket.gethostname()
        if self.public_url is None:
            shown = f"[{host}]" if ":" in host else host
            self.public_url = f"http://{shown}:{self.port}"
        if self.replica_id is None:
            self.replica_id = f"{socket.gethostname()}-{self.port}"
        if not re.fullmatch(self.peer_url_pattern, self.public_url):
            raise ValueError(f"the replica's URL {self.public_url!r} does not match "
                             "BOOK_PEER_URL_PATTERN: the other replicas would refuse it")
        if self.read_block_seconds >= self.max_age_seconds:
            # A quiet book is confirmed current by the read that ends its block time: a
            # block as long as the age limit would make every quiet book answer 503.
            raise ValueError(f"BOOK_READ_BLOCK_SECONDS ({self.read_block_seconds:g}) must be "
                             f"less than BOOK_MAX_AGE_SECONDS ({self.max_age_seconds:g})")
        return self

    @property
    def url(self) -> str:
        """The public URL (always set after validation)."""
        assert self.public_url is not None
        return self.public_url

    @property
    def replica(self) -> str:
        """The replica id (always set after validation)."""
        assert self.replica_id is not None
        return self.replica_id
