"""Settings of the grid strategy: the shared variables plus its own, prefixed ``STRATEGY_``.

Shared (see :class:`kumex_l3.config.CommonSettings`): ``REDIS_URL``,
``KUMEX_SYMBOLS``, ``KUMEX_BASE_URL``, ``KUMEX_API_KEY``, ``KUMEX_API_SECRET``,
``KUMEX_API_PASSPHRASE`` (required unless dry-run), ``LOG_LEVEL``.

The strategy's own, with their defaults:

===============================  ======================  ===========================================
variable                         default                 meaning
===============================  ======================  ===========================================
``STRATEGY_SYMBOL``              first of KUMEX_SYMBOLS  the contract traded
``STRATEGY_CENTRE_PRICE``        (none)                  grid centre; unset = the one stored by a
                                                         previous run, else the book's mid at start
``STRATEGY_STEP_TICKS``          10                      distance between levels, in ticks
``STRATEGY_LEVELS``              3                       orders on each side of the centre
``STRATEGY_SIZE``                1                       contracts per grid order
``STRATEGY_MAX_POSITION``        10                      limit of abs(position) if every open order
                                                         of one side filled
``STRATEGY_MAX_OPEN_ORDERS``     20                      limit of open (or pending) own orders
``STRATEGY_LEVERAGE``            5                       leverage sent with each order
``STRATEGY_DRY_RUN``             false                   decide and log, send and write nothing
``STRATEGY_CLIENT_OID_PREFIX``   grid                    clientOids are ``{prefix}-{16 chars}``
                                                         (unguessable); ``[A-Za-z0-9_]``, at
                                                         most 23
``BOOK_URL``                     http://127.0.0.1:8080   the book service, for the centre price
                                                         (also ``STRATEGY_BOOK_URL``)
``STRATEGY_HTTP_HOST``           127.0.0.1               address of /healthz, /metrics, /state
``STRATEGY_API_TOKEN``           (none)                  token /state asks for; without one,
                                                         /state only on a loopback address
``STRATEGY_HTTP_PORT``           8083                    port of the same (0 = any free port)
``STRATEGY_REQUEST_TIMEOUT``     10.0                    seconds for one REST call
``STRATEGY_RESOLVE_AFTER``       5.0                     seconds after a timed-out order before
                                                         asking the exchange by clientOid
``STRATEGY_READ_BLOCK``          1.0                     XREAD BLOCK of the event loop, seconds
``STRATEGY_SHUTDOWN_TIMEOUT``    10.0                    seconds to wait for cancels to be
                                                         confirmed on exit
``STRATEGY_POSITION_CHECK_S``    5.0                     read the account's position at the
                                                         exchange this often (the risk limit
                                                         uses it when it is beyond the grid's
                                                         own count); 0 = never
===============================  ======================  ===========================================
"""

from __future__ import annotations

import re
from decimal import Decimal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from kumex_l3.config import CommonSettings, OptionalSecret, check_http_url

__all__ = ["ENV_PREFIX", "StrategySettings"]

ENV_PREFIX = "STRATEGY_"
_PREFIX = re.compile(r"[A-Za-z0-9_]{1,23}")


class StrategySettings(CommonSettings):
    """Settings of ``python -m services.strategy`` (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      populate_by_name=True)

    symbol: str | None = Field(None, validate_default=True)
    centre_price: Decimal | None = Field(None, gt=0)
    step_ticks: int = Field(10, ge=1)
    levels: int = Field(3, ge=1, le=100)
    size: int = Field(1, ge=1)
    max_position: int = Field(10, ge=0)
    max_open_orders: int = Field(20, ge=0, le=200)
    leverage: int = Field(5, ge=1, le=125)
    dry_run: bool = Field(False, validate_default=True)
    client_oid_prefix: str = "grid"
    book_url: str = Field("http://127.0.0.1:8080",
                          validation_alias=AliasChoices("STRATEGY_BOOK_URL", "BOOK_URL",
                                                        "book_url"))
    #: Loopback by default: set a wider address (compose: 0.0.0.0) to be reached from afar.
    http_host: str = "127.0.0.1"
    http_port: int = Field(8083, ge=0, le=65535)
    #: Token ``/state`` asks for (``Authorization: Bearer`` or ``?token=``); without it
    #: ``/state`` is served on a loopback address only (:mod:`kumex_l3.access`).
    api_token: OptionalSecret = None
    request_timeout: float = Field(10.0, gt=0)
    resolve_after: float = Field(5.0, ge=0)
    read_block: float = Field(1.0, gt=0, le=10)
    shutdown_timeout: float = Field(10.0, ge=0)
    position_check_s: float = Field(5.0, ge=0)

    @field_validator("client_oid_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX.fullmatch(value):
            raise ValueError("must be 1 to 23 characters of [A-Za-z0-9_]")
        return value

    @field_validator("book_url")
    @classmethod
    def _check_book_url(cls, value: str) -> str:
        return check_http_url(value)

    @field_validator("symbol")
    @classmethod
    def _check_symbol(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            symbols = info.data.get("symbols")
            return symbols[0] if symbols else None
        if not (value.isalnum() and value.isupper()):
            raise ValueError("must be upper-case letters and digits")
        return value

    @field_validator("dry_run")
    @classmethod
    def _credentials_unless_dry_run(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and any(info.data.get(name) is None
                             for name in ("api_key", "api_secret", "api_passphrase")):
            raise ValueError("KUMEX_API_KEY, KUMEX_API_SECRET and KUMEX_API_PASSPHRASE are "
                             "required unless STRATEGY_DRY_RUN is true")
        return value

    @property
    def trade_symbol(self) -> str:
        """The contract traded (``symbol``, resolved)."""
        if self.symbol is None:  # only when KUMEX_SYMBOLS itself was invalid
            raise ValueError("no symbol")
        return self.symbol
