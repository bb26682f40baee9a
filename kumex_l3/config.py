"""Settings shared by every service, validated at start (pydantic-settings).

Each service subclasses :class:`CommonSettings` with its own prefix for its own
knobs (``FEED_``, ``BOOK_``, ...); the shared variables keep their names
(``REDIS_URL``, ``KUMEX_SYMBOLS``, ``KUMEX_BASE_URL``, ``KUMEX_API_KEY``,
``KUMEX_API_SECRET``, ``KUMEX_API_PASSPHRASE``). Build the settings in
``main()`` and pass them down: nothing reads the environment at import time.
A bad value stops the service with a message naming the variable
(:func:`load_settings`).
"""

from __future__ import annotations

import ssl
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ALL_SYMBOLS", "DEFAULT_BASE_URL", "CommonSettings", "OptionalSecret",
           "check_http_url", "check_redis_url", "load_settings", "redact_url", "tls_context",
           "venue_symbols"]

#: The local sandbox exchange: the default target (the real venue withdrew public L3).
DEFAULT_BASE_URL = "http://127.0.0.1:8090"

#: ``KUMEX_SYMBOLS=all``: every open contract the venue lists, read at start-up.
ALL_SYMBOLS = "all"

_S = TypeVar("_S", bound=BaseSettings)

#: A secret that may be left unset: an empty variable (``TOKEN=`` in ``.env``) is none.
OptionalSecret = Annotated[SecretStr | None,
                           BeforeValidator(lambda value: None if value == "" else value)]


def check_http_url(value: str) -> str:
    """``value`` without its trailing ``/``, if it is an ``http://`` or ``https://`` URL.

    Raises ``ValueError`` otherwise (a settings validator shows it with the variable).
    """
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


def _shared(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class CommonSettings(BaseSettings):
    """The variables every service reads."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    #: ``REDIS_URL`` names nodes of a Redis Cluster (one or more, comma-separated: the
    #: seeds the client learns the cluster from; name several, so that a client
    #: started while one is down still finds the others).
    redis_cluster: bool = Field(False, validation_alias=_shared("REDIS_CLUSTER"))
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_shared("REDIS_URL"),
                           repr=False)  # may hold a password
    symbols: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["XBTUSDM"], validation_alias=_shared("KUMEX_SYMBOLS"))
    base_url: str = Field(DEFAULT_BASE_URL, validation_alias=_shared("KUMEX_BASE_URL"))
    api_key: SecretStr | None = Field(None, validation_alias=_shared("KUMEX_API_KEY"))
    api_secret: SecretStr | None = Field(None, validation_alias=_shared("KUMEX_API_SECRET"))
    api_passphrase: SecretStr | None = Field(
        None, validation_alias=_shared("KUMEX_API_PASSPHRASE"))
    #: A PEM file of CA certificates trusted beside the system's, for a venue (or the
    #: sandbox) whose certificate a private CA signed. Verification is never turned off.
    ca_file: Path | None = Field(None, validation_alias=_shared("KUMEX_CA_FILE"))
    log_level: str = Field("INFO", validation_alias=_shared("LOG_LEVEL"))
    #: ``auto``: uvloop when installed, else asyncio's loop (kumex_l3.service).
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", validation_alias=_shared("KUMEX_EVENT_LOOP"))

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == ALL_SYMBOLS:
            return [ALL_SYMBOLS]  # resolved by load_settings from the venue's contract list
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list):
            if not value:
                raise ValueError("at least one symbol is required")
            for s in value:
                if not isinstance(s, str) or not s.isalnum() or not s.isupper():
                    raise ValueError(f"symbol {s!r} must be upper-case letters and digits")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str, info: ValidationInfo) -> str:
        urls = [url.strip() for url in value.split(",")]
        for url in urls:
            check_redis_url(url)
        if not info.data.get("redis_cluster"):
            if len(urls) > 1:
                raise ValueError("several servers are a Redis Cluster's seeds: set "
                                 "REDIS_CLUSTER=true, or name one server")
            return value
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme == "unix" or parts.path.strip("/") not in ("", "0"):
                raise ValueError("a Redis Cluster is reached over TCP and has database 0 "
                                 "alone")
        return value

    @field_validator("ca_file")
    @classmethod
    def _check_ca_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            tls_context(value)  # a file that is not PEM certificates fails here, named
        return value

    def tls(self) -> ssl.SSLContext:
        """The TLS context of every connection to the venue (:func:`tls_context`)."""
        return tls_context(self.ca_file)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return check_http_url(value)


def tls_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """A verifying TLS client context: the system's CAs, and those of ``ca_file``.

    Raises ``ValueError`` naming the file when it cannot be read as PEM certificates.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA certificates from {ca_file}: {exc}") from None
    return context


def check_redis_url(value: str) -> str:
    """``value`` if it is a Redis URL a client can use, else ``ValueError`` saying why.

    Checked at start, so that a bad port or database is a message naming the
    variable rather than a traceback at the first command. The message never
    repeats the URL (it may hold a password).
    """
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    parts = urlsplit(value)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path")
        return value
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if not parts.hostname:
        raise ValueError("the host is missing")
    database = parts.path.lstrip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError("the database (the path) must be a number, e.g. redis://host:6379/0")
    return value


def redact_url(url: str) -> str:
    """A URL fit for a log line: any password replaced by ``***`` (each of a Redis
    Cluster's comma-separated seeds)."""
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://***@{host}"


def load_settings(cls: type[_S]) -> _S:
    """Build ``cls`` from the environment, or exit with a message naming each bad variable.

    ``KUMEX_SYMBOLS=all`` becomes every open contract the venue lists
    (:func:`venue_symbols`).
    """
    try:
        settings = cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix") or "")
        # A shared variable (REDIS_URL...) is reported under its own name, not prefixed;
        # pydantic gives either the field's name or the alias it was read from.
        shared: dict[str, str] = {}
        for field_name, info in cls.model_fields.items():
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                for choice in (field_name, *alias.choices):
                    if isinstance(choice, str):
                        shared[choice] = str(alias.choices[0])
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            name = shared.get(field) or (prefix + field).upper()
            lines.append(f"  {name}: {err['msg']}")
        sys.stderr.write(f"invalid configuration for {cls.__name__}:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
    if isinstance(settings, CommonSettings) and settings.symbols == [ALL_SYMBOLS]:
        try:
            listed = venue_symbols(settings.base_url, settings.tls())
        except (httpx.HTTPError, ValueError) as exc:
            sys.stderr.write(f"KUMEX_SYMBOLS=all: cannot read the contract list of "
                             f"{settings.base_url}: {exc}\n")
            raise SystemExit(2) from None
        settings = settings.model_copy(update={"symbols": listed})
    return settings


def venue_symbols(base_url: str, verify: ssl.SSLContext | bool = True, *,
                  attempts: int = 30, wait_s: float = 1.0) -> list[str]:
    """Every open contract of ``GET /api/v1/contracts/active``, in the venue's order.

    Tried ``attempts`` times ``wait_s`` apart (a venue, or a sandbox started
    beside the service, may not answer yet), saying so on stderr; the last
    error is raised.
    """
    url = base_url.rstrip("/") + "/api/v1/contracts/active"
    for attempt in range(1, attempts + 1):
        try:
            reply = httpx.get(url, verify=verify, timeout=10.0)
            reply.raise_for_status()
            data = reply.json().get("data")
            if not isinstance(data, list):
                raise ValueError("the reply has no list of contracts")
            symbols = [c["symbol"] for c in data
                       if isinstance(c, dict) and isinstance(c.get("symbol"), str)
                       and c.get("status", "Open") == "Open"]
            if not symbols:
                raise ValueError("the venue lists no open contract")
            return symbols
        except httpx.TransportError as exc:
            if attempt == attempts:
                raise
            sys.stderr.write(f"KUMEX_SYMBOLS=all: {url} not reachable yet ({exc}); "
                             f"attempt {attempt} of {attempts}\n")
            time.sleep(wait_s)
    raise AssertionError("unreachable")
