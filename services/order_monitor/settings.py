"""Settings of the order monitor: :class:`CommonSettings` plus ``MONITOR_*`` variables.

Shared (see :class:`kumex_l3.config.CommonSettings`): ``REDIS_URL``,
``KUMEX_SYMBOLS``, ``KUMEX_BASE_URL``, ``KUMEX_API_KEY``, ``KUMEX_API_SECRET``,
``KUMEX_API_PASSPHRASE`` (without them reconciliation is off: a warning at
start), ``LOG_LEVEL``.

The monitor's own, with their defaults:

=================================  ===============  ===========================================
variable                           default          meaning
=================================  ===============  ===========================================
``MONITOR_GROUP``                  order_monitor    consumer group on ``kumex:{SYM}:l3``
``MONITOR_CONSUMER``               <host>-<pid>     consumer name in the group
``MONITOR_REPLICA_ID``             <host>-<port>    identity in the symbol leases (stable, so
                                                    a restarted replica takes its leases back)
``MONITOR_BATCH_SIZE``             500              entries per XREADGROUP
``MONITOR_BLOCK_MS``               1000             XREADGROUP BLOCK (also the idle tick)
``MONITOR_FINISHED_TTL_S``         86400            seconds a finished order stays readable
``MONITOR_UNSEEN_GRACE_MS``        10000            stream time after submission without a
                                                    ``received`` before ``rejected``/``unseen``
``MONITOR_LEASE_TTL_S``            10.0             symbol lease TTL (renewed every third)
``MONITOR_HTTP_HOST``              127.0.0.1        address of /healthz /readyz /metrics
``MONITOR_HTTP_PORT``              8082             port of the same (0: any free port)
``MONITOR_EVENTS_MAXLEN``          100000           ``MAXLEN ~`` of ``kumex:{SYM}:order-events``
                                                    (0: unbounded)
``MONITOR_RECONCILE_ON_START``     true             reconcile active orders on taking a symbol
``MONITOR_RECONCILE_CONCURRENCY``  4                REST lookups in flight during a reconcile
``MONITOR_REFRESH_S``              5.0              reload the orderId index from Redis
``MONITOR_HTTP_TIMEOUT``           10.0             seconds per REST call
``MONITOR_REDIS_TIMEOUT``          5.0              seconds per Redis command (plus BLOCK)
``MONITOR_PRIVATE_CHANNEL``        true             with credentials: also apply the private
                                                    order channel (``/contractMarket/
                                                    tradeOrders``), a second source
=================================  ===============  ===========================================
"""

from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from kumex_l3.config import CommonSettings

__all__ = ["ENV_PREFIX", "ROLE", "MonitorSettings"]

ENV_PREFIX = "MONITOR_"
#: The lease role of this service (``kumex:{SYM}:owner:order_monitor``).
ROLE = "order_monitor"


class MonitorSettings(CommonSettings):
    """Settings of ``python -m services.order_monitor`` (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      populate_by_name=True)

    group: str = Field("order_monitor", min_length=1, max_length=200)
    consumer: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
                          min_length=1, max_length=200)
    replica_id: str | None = Field(None, min_length=1, max_length=200)
    batch_size: int = Field(500, ge=1, le=100_000)
    block_ms: int = Field(1000, ge=1, le=60_000)
    finished_ttl_s: int = Field(86_400, ge=1)
    unseen_grace_ms: int = Field(10_000, ge=0)
    lease_ttl_s: float = Field(10.0, gt=0, le=300)
    #: Loopback by default: set a wider address (compose: 0.0.0.0) to be reached from afar.
    http_host: str = "127.0.0.1"
    http_port: int = Field(8082, ge=0, le=65535)
    events_maxlen: int = Field(100_000, ge=0)
    reconcile_on_start: bool = True
    reconcile_concurrency: int = Field(4, ge=1, le=100)
    refresh_s: float = Field(5.0, gt=0)
    http_timeout: float = Field(10.0, gt=0)
    redis_timeout: float = Field(5.0, gt=0)
    private_channel: bool = True

    @model_validator(mode="after")
    def _default_replica(self) -> MonitorSettings:
        if self.replica_id is None:
            suffix = self.http_port if self.http_port else os.getpid()
            self.replica_id = f"{socket.gethostname()}-{suffix}"
        return self

    @property
    def replica(self) -> str:
        """The replica id (always set after validation)."""
        assert self.replica_id is not None
        return self.replica_id

    @property
    def has_credentials(self) -> bool:
        """True when the API key, secret and passphrase are all set."""
        return all(v is not None and v.get_secret_value()
                   for v in (self.api_key, self.api_secret, self.api_passphrase))
