"""Configuration of the sandbox exchange: one validated class, built in ``main()``.

Every value comes from an environment variable with the ``SANDBOX_`` prefix
(``SANDBOX_PORT``, ``SANDBOX_FLOW_RATE``...). Nothing here reads the
environment at import time: :func:`load_settings` does, and a bad value
raises :class:`SettingsError` whose message names the variable.

The default API keys (:data:`DEMO_API_KEYS`) are demo credentials, published
on purpose so that examples and tests can sign requests against a local
sandbox; they mean nothing anywhere else.

Accounts (one per API key's user):

=============================  ===================================================
variable                       meaning (default)
=============================  ===================================================
``SANDBOX_STARTING_BALANCES``  each account's balance per settlement currency
                               before it trades, a JSON object (``{"XBT": 10,
                               "USDT": 100000}``; a currency left out starts at
                               0): where ``GET /api/v1/account-overview`` starts
=============================  ===================================================
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from services.sandbox.contracts import CONTRACTS

__all__ = [
    "DEMO_API_KEYS",
    "ENV_PREFIX",
    "ApiKeyConfig",
    "SandboxSettings",
    "SettingsError",
    "load_settings",
]

ENV_PREFIX = "SANDBOX_"


class SettingsError(ValueError):
    """The environment holds a bad value; the message names the variable(s)."""


class ApiKeyConfig(BaseModel):
    """One API key the sandbox accepts. ``user`` scopes orders (default: the key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1)
    secret: str = Field(min_length=1, repr=False)
    passphrase: str = Field(min_length=1, repr=False)
    user: str | None = None

    @property
    def user_id(self) -> str:
        """The user owning orders placed with this key."""
        return self.user or self.key


#: Demo keys accepted by default: two users, so tests can check that orders
#: are scoped to the key's user. Public on purpose; override with
#: ``SANDBOX_API_KEYS`` (a JSON list of ``{key, secret, passphrase[, user]}``).
DEMO_API_KEYS: tuple[ApiKeyConfig, ...] = (
    ApiKeyConfig(
        key="demo-key-1", secret="demo-secret-1", passphrase="demo-passphrase-1", user="demo-1"
    ),
    ApiKeyConfig(
        key="demo-key-2", secret="demo-secret-2", passphrase="demo-passphrase-2", user="demo-2"
    ),
)


class SandboxSettings(BaseSettings):
    """Settings of ``python -m services.sandbox`` (env prefix ``SANDBOX_``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    #: Comma-separated contract symbols to list and trade; ``all`` for every contract of the
    #: catalog (services.sandbox.contracts: 102, the three defaults first).
    symbols: str = "XBTUSDM,XBTUSDTM,ETHUSDTM"
    #: Seed of the synthetic flow, the WS fault dice and the order ids.
    seed: int = 0
    #: First sequence of every symbol; unset = the start time in Unix ms, so a
    #: restarted sandbox never reuses the sequences of the previous run.
    start_sequence: int | None = Field(default=None, ge=0)
    #: Synthetic flow actions per second: 0 = paused, < 0 (or "max") = as fast as possible.
    flow_rate: float = 20.0
    #: Delay added to every /api reply after the engine has acted (the L3 push overtakes it).
    rest_latency_ms: float = Field(default=30.0, ge=0)
    #: L3 snapshots allowed per client (IP) a minute; 0 = unlimited.
    snapshot_rate_per_min: float = Field(default=1.0, ge=0)
    api_keys: tuple[ApiKeyConfig, ...] = DEMO_API_KEYS
    #: Each account's balance per settlement currency before it trades (module doc).
    starting_balances: dict[str, Decimal] = Field(
        default_factory=lambda: {"XBT": Decimal(10), "USDT": Decimal(100_000)})
    #: Advertised by bullet-public/private; unset = ws://{Host the client used}/endpoint
    #: (wss:// when the sandbox serves TLS).
    public_url: str | None = None
    #: PEM certificate chain and private key: serve HTTPS and WSS (as the venue does), so
    #: that clients built for ``wss://`` with ``encrypt: true`` connect unchanged.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ws_ping_interval_ms: int = Field(default=18_000, gt=0)
    ws_ping_timeout_ms: int = Field(default=10_000, gt=0)
    #: A client that sends nothing (no ping) for this long is dropped.
    ws_idle_timeout_s: float = Field(default=60.0, gt=0)
    #: Messages queued for one WS client before it is dropped as too slow.
    client_queue_limit: int = Field(default=10_000, gt=0)
    #: Open orders a user may have per contract (the real venue's limit).
    max_active_orders: int = Field(default=100, gt=0)
    #: Engine messages kept per symbol, before any fault, for ``/sandbox/journal``
    #: (tests rebuild the true book at every sequence from it); 0 = off.
    journal_size: int = Field(default=0, ge=0)
    # Fault injection at start-up (changeable at run time through /sandbox/faults).
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    duplicate_rate: float = Field(default=0.0, ge=0, le=1)
    reorder_rate: float = Field(default=0.0, ge=0, le=1)
    delay_ms: float = Field(default=0.0, ge=0)
    delay_jitter_ms: float = Field(default=0.0, ge=0)
    #: Each connection is closed after a lifetime drawn in [every, every_max] (per
    #: connection; every_max 0 = twice every); 0 = never.
    disconnect_every_s: float = Field(default=0.0, ge=0)
    disconnect_every_max_s: float = Field(default=0.0, ge=0)
    #: A venue-wide outage (every connection closed, new ones refused for outage_s).
    outage_every_s: float = Field(default=0.0, ge=0)
    outage_s: float = Field(default=5.0, ge=0)
    refuse_snapshots: bool = False
    #: A capture file to replay instead of the synthetic flow.
    replay: str | None = None
    #: Replay pace: 1.0 = as recorded, 2.0 = twice as fast, 0 = as fast as clients take it.
    replay_speed: float = Field(default=1.0, ge=0)
    log_level: str = "info"
    access_log: bool = False
    #: The event loop (see :func:`kumex_l3.service.loop_name`). asyncio's by default, unlike
    #: the services: the synthetic flow paces itself with sub-millisecond sleeps, which
    #: uvloop's millisecond timers turn into bursts (the book's apply delay p99 at 5,000
    #: msg/s went from ~5.5 to ~9 ms with the sandbox on uvloop).
    event_loop: Literal["auto", "uvloop", "asyncio"] = "asyncio"

    @field_validator("symbols")
    @classmethod
    def _known_symbols(cls, value: str) -> str:
        if value.strip().lower() == "all":
            return ",".join(CONTRACTS)
        names = [s.strip() for s in value.split(",") if s.strip()]
        if not names:
            raise ValueError("at least one symbol is required")
        unknown = [s for s in names if s not in CONTRACTS]
        if unknown:
            raise ValueError(f"unknown symbol(s) {unknown}; known: {sorted(CONTRACTS)}")
        if len(set(names)) != len(names):
            raise ValueError("a symbol is listed twice")
        return ",".join(names)

    @field_validator("flow_rate", mode="before")
    @classmethod
    def _max_rate(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "max":
            return -1.0
        return value

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, value: tuple[ApiKeyConfig, ...]) -> tuple[ApiKeyConfig, ...]:
        if not value:
            raise ValueError("at least one API key is required")
        if len({k.key for k in value}) != len(value):
            raise ValueError("an API key is listed twice")
        return value

    @field_validator("starting_balances")
    @classmethod
    def _balances(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for currency, amount in value.items():
            if not currency or currency != currency.strip().upper():
                raise ValueError(f"currency {currency!r} must be upper case, e.g. XBT or USDT")
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"the balance of {currency} must be a number >= 0")
        return value

    @field_validator("public_url")
    @classmethod
    def _ws_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return value or None

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _tls_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> SandboxSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("SANDBOX_TLS_CERT and SANDBOX_TLS_KEY go together")
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("must be one of critical, error, warning, info, debug")
        return level

    @property
    def symbol_list(self) -> list[str]:
        """The configured symbols, in order."""
        return self.symbols.split(",")

    @property
    def tls(self) -> bool:
        """Whether the sandbox serves HTTPS and WSS."""
        return self.tls_cert is not None

    @property
    def ws_endpoint(self) -> str:
        """The WS endpoint to advertise when the client's Host is not known."""
        if self.public_url:
            return self.public_url
        host = "127.0.0.1" if self.host in {"0.0.0.0", "", "::"} else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}/endpoint"

    @property
    def flow_max(self) -> bool:
        """True when the flow runs as fast as it can."""
        return self.flow_rate < 0


def load_settings() -> SandboxSettings:
    """Build the settings from the process environment.

    Raises :class:`SettingsError` naming each bad ``SANDBOX_*`` variable (never
    echoing its value: it may be a secret).
    """
    try:
        return SandboxSettings()
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from exc
    except PydanticSettingsError as exc:  # a complex value that is not JSON
        match = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{match.group(1).upper()}" if match else f"a {ENV_PREFIX}* variable"
        raise SettingsError(f"invalid sandbox settings: {name}: not valid JSON") from exc


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = err.get("loc") or ("?",)
        name = f"{ENV_PREFIX}{str(loc[0]).upper()}"
        detail = ".".join(str(p) for p in loc[1:])
        where = f"{name}[{detail}]" if detail else name
        lines.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "invalid sandbox settings: " + "; ".join(lines)
