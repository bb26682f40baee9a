"""One-line logs shared by every service, with secrets redacted.

Each record is one line on stderr::

    2024-05-01T12:00:00.123Z INFO feed connected to the exchange connectId=f3a9 symbols=XBTUSDM

``ts level service message key=value...``: the timestamp is UTC with
milliseconds; ``key=value`` pairs come from :func:`kv` passed as ``extra``::

    log.info("connected to the exchange", extra=kv(connectId=cid, symbols="XBTUSDM"))

Values holding spaces, quotes or ``=`` are written as JSON strings; newlines
anywhere (message, values, tracebacks) are escaped so that a record never
spans two lines (and a crafted value cannot forge a log line).

:class:`RedactFilter` replaces every configured secret (API secret, passphrase,
the Redis password...) by ``***`` wherever it appears: message, arguments,
fields, exception text; and the value of every ``token=`` in a URL's query (a
WebSocket token is a bearer credential: a private one reads an account's
order flow), whatever logged it (an access log line of ``/endpoint?token=...``).
It is a last line of defence; code still never logs a secret on purpose.
:func:`setup_logging` installs both on the root logger (uvicorn's and the
libraries' records go through it too).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any, Final
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

__all__ = [
    "FIELDS_ATTR",
    "LineFormatter",
    "RedactFilter",
    "kv",
    "secrets_of",
    "setup_logging",
]

#: The ``LogRecord`` attribute holding the ``key=value`` fields (set by :func:`kv`).
FIELDS_ATTR: Final = "kv_fields"
_MASK: Final = "***"
_LEVELS: Final = frozenset({"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"})
#: The value of a ``token`` query parameter (up to the next ``&``, quote or space).
_TOKEN_QUERY: Final = re.compile(r"([?&]token=)[^&\s\"']+")


def kv(**fields: object) -> dict[str, Any]:
    """``extra=`` for a log call: the ``key=value`` pairs appended to the line."""
    return {FIELDS_ATTR: fields}


def _value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(c in text for c in ' "=\n\r\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class LineFormatter(logging.Formatter):
    """``ts level service message key=value...`` on one line (see the module docstring)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        parts = [self.formatTime(record), record.levelname, self.service, record.getMessage()]
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, Mapping):
            parts.extend(f"{key}={_value(val)}" for key, val in fields.items())
        if record.levelno >= logging.WARNING and record.name and record.name != "root":
            parts.append(f"logger={record.name}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(f"exc={_value(record.exc_text)}")
        if record.stack_info:
            parts.append(f"stack={_value(self.formatStack(record.stack_info))}")
        return _one_line(" ".join(parts))


class RedactFilter(logging.Filter):
    """Replaces each secret by ``***`` in a record before any handler formats it.

    The message is rendered once (``msg % args``) and stored back, so secrets
    passed as arguments are caught too. Empty secrets are ignored; longer
    secrets are replaced first (one may contain another).
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str | None]) -> None:
        """Replace the set of secrets to redact."""
        unique = {s for s in secrets if s}
        self._secrets = tuple(sorted(unique, key=len, reverse=True))

    def redact(self, text: str) -> str:
        """``text`` with every secret, and every ``token=`` query value, replaced by
        ``***``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _MASK)
        if "token=" in text:
            text = _TOKEN_QUERY.sub(r"\1" + _MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = self.redact(record.getMessage())
        record.msg, record.args = message, None
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, Mapping):
            setattr(record, FIELDS_ATTR,
                    {k: self.redact(v if isinstance(v, str) else str(v))
                     for k, v in fields.items()})
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def secrets_of(settings: object) -> list[str]:
    """The secret values held by a settings object, for :class:`RedactFilter`.

    Every ``SecretStr`` attribute (API key, secret, passphrase) and the password
    of a ``redis_url`` attribute, when there is one.
    """
    found: list[str] = []
    names = getattr(type(settings), "model_fields", None) or vars(settings)
    for name in names:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
    url = getattr(settings, "redis_url", None)
    if isinstance(url, str):
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password)]
    return [s for s in found if s]


def setup_logging(
    level: str | int,
    service: str,
    *,
    secrets: Iterable[str | None] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send every log record, one line each, to ``stream`` (stderr), secrets redacted.

    Replaces the root logger's handlers (idempotent: calling it again
    reconfigures). ``level`` is a name (``"info"``, case-insensitive) or a
    number; a bad name raises ``ValueError``. Returns the installed handler.
    """
    if isinstance(level, str):
        name = level.strip().upper()
        if name not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        numeric = logging.getLevelName(name)
    else:
        numeric = level
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LineFormatter(service))
    handler.addFilter(RedactFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # Libraries that chat at INFO about every request or frame.
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    return handler
