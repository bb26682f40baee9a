"""Settings of the feed: the shared variables plus its own, prefixed ``FEED_``.

Shared (see :class:`kumex_l3.config.CommonSettings`): ``REDIS_URL``,
``KUMEX_SYMBOLS``, ``KUMEX_BASE_URL``, ``LOG_LEVEL`` (and the API secrets,
which the feed does not use: it reads public data only).

The feed's own, with their defaults:

==============================  ========  ==================================================
variable                        default   meaning
==============================  ========  ==================================================
``FEED_LINES``                  2         independent WebSocket connections (lines), each
                                          subscribed to every symbol, arbitrated by
                                          sequence; 1 = one connection
``FEED_ARBITRATION_WAIT_MS``    50        how long a hole in one line's sequence may wait
                                          for another line's copy before it is declared
                                          a gap (docs/BENCHMARKS.md: what decided it)
``FEED_LEASE_TTL_SECONDS``      2.0       writer lease of each symbol (and of the snapshot
                                          scheduler): a standby feed takes over within it
``FEED_REPLAY_BUFFER``          20000     messages kept per symbol, written from memory
                                          when this feed takes a symbol over
``FEED_ID``                     (auto)    this process's id in the leases (default
                                          ``feed-<host>-<pid>-<random>``)
``FEED_STREAM_MAXLEN``          100000    ``XADD ... MAXLEN ~ N`` of each symbol's stream
``FEED_BATCH_SIZE``             500       entries per Redis pipeline
``FEED_BUFFER_MAX``             100000    messages held in memory while Redis is slow or
                                          down; past it they are dropped (``ctl=gap``)
``FEED_SNAPSHOT_PER_MIN``       1         L3 snapshot budget a minute, for all symbols
                                          together (the real venue's limit per IP);
                                          0 = unlimited
``FEED_SNAPSHOT_BURST``         (auto)    snapshots that may be fetched back to back after
                                          a quiet while (default: the budget a minute,
                                          at least 1)
``FEED_BACKOFF_INITIAL``        1.0       first reconnect/retry delay, seconds
``FEED_BACKOFF_FACTOR``         2.0       growth of the delay per failed attempt
``FEED_BACKOFF_MAX``            30.0      largest delay, seconds
``FEED_HTTP_HOST``              127.0.0.1 address of /healthz, /readyz, /metrics
``FEED_HTTP_PORT``              8081      port of the same (0 = any free port, logged)
``FEED_CAPTURE``                (none)    file to append each raw data frame to, one a
                                          line (gzip when it ends with ``.gz``);
                                          the sandbox can replay it
``FEED_WELCOME_TIMEOUT``        10.0      seconds to wait for ``welcome``
``FEED_SUBSCRIBE_TIMEOUT``      10.0      seconds to wait for the subscribe acks
``FEED_HTTP_TIMEOUT``           10.0      seconds for a REST call (token, snapshot)
``FEED_REDIS_TIMEOUT``          5.0       seconds for a Redis command
``FEED_SHUTDOWN_TIMEOUT``       10.0      seconds to flush the buffer on stop
==============================  ========  ==================================================
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from kumex_l3.config import CommonSettings

__all__ = ["ENV_PREFIX", "FeedSettings"]

ENV_PREFIX = "FEED_"


class FeedSettings(CommonSettings):
    """Settings of ``python -m services.feed`` (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      populate_by_name=True)

    lines: int = Field(2, ge=1, le=8)
    arbitration_wait_ms: float = Field(50.0, ge=0, le=10_000)
    lease_ttl_seconds: float = Field(2.0, ge=0.3, le=60)
    replay_buffer: int = Field(20_000, ge=0, le=10_000_000)
    id: str | None = Field(None, min_length=1, max_length=200)
    stream_maxlen: int = Field(100_000, gt=0)
    batch_size: int = Field(500, gt=0, le=100_000)
    buffer_max: int = Field(100_000, gt=0)
    snapshot_per_min: float = Field(1.0, ge=0)
    snapshot_burst: float | None = Field(None, ge=1)
    backoff_initial: float = Field(1.0, gt=0)
    backoff_factor: float = Field(2.0, ge=1)
    backoff_max: float = Field(30.0, gt=0)
    #: Loopback by default: set a wider address (compose: 0.0.0.0) to be reached from afar.
    http_host: str = "127.0.0.1"
    http_port: int = Field(8081, ge=0, le=65535)
    capture: Path | None = None
    welcome_timeout: float = Field(10.0, gt=0)
    subscribe_timeout: float = Field(10.0, gt=0)
    #: Ask the exchange for permessage-deflate (worth it over a slow link only).
    ws_compression: bool = False
    http_timeout: float = Field(10.0, gt=0)
    redis_timeout: float = Field(5.0, gt=0)
    shutdown_timeout: float = Field(10.0, ge=0)
    #: Lifetime of the heartbeat key ``kumex:{SYM}:feed``, set again every fifth of it
    #: while subscribed: a feed silent this long is taken as gone by the book.
    heartbeat_ttl_seconds: float = Field(5.0, ge=0.5)

    @field_validator("backoff_max")
    @classmethod
    def _max_not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("backoff_initial")
        if isinstance(initial, int | float) and value < initial:
            raise ValueError("must be >= FEED_BACKOFF_INITIAL")
        return value

    @field_validator("capture", mode="before")
    @classmethod
    def _empty_capture(cls, value: object) -> object:
        return None if value == "" else value
