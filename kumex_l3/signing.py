"""Signing of KuCoin Futures private REST requests (kumex-api.md §2). Pure: no I/O, no clock.

``KC-API-SIGN`` = base64(HMAC-SHA256(secret, timestamp + METHOD + requestPath + body)):
``requestPath`` carries the query string for GET and DELETE
(``/api/v1/orders?status=active``), ``body`` is the exact JSON text sent (empty
for GET and DELETE). With key version 2 (the default here; 3 signs the same
way) ``KC-API-PASSPHRASE`` is base64(HMAC-SHA256(secret, passphrase)) rather
than the passphrase itself. The timestamp is Unix milliseconds and comes in as
an argument: the caller owns the clock (and any offset to server time).

:class:`Credentials` holds the key, secret and passphrase; its ``repr`` shows
the key only, so that a credential that ends up in a log line or a traceback
leaks nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Final

from pydantic import SecretStr

__all__ = [
    "HEADER_KEY",
    "HEADER_KEY_VERSION",
    "HEADER_PASSPHRASE",
    "HEADER_SIGN",
    "HEADER_TIMESTAMP",
    "Credentials",
    "sign",
    "sign_passphrase",
    "signed_headers",
    "string_to_sign",
]

HEADER_KEY: Final = "KC-API-KEY"
HEADER_SIGN: Final = "KC-API-SIGN"
HEADER_TIMESTAMP: Final = "KC-API-TIMESTAMP"
HEADER_PASSPHRASE: Final = "KC-API-PASSPHRASE"
HEADER_KEY_VERSION: Final = "KC-API-KEY-VERSION"

_SUPPORTED_VERSIONS: Final = frozenset({2, 3})


def _reveal(value: str | SecretStr) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class Credentials:
    """An API key with its secret and passphrase (kept as :class:`SecretStr`).

    ``key_version`` is 2 (default) or 3: both HMAC the passphrase. Version 1
    (passphrase in plain text) was retired by the venue in 2021 and is refused.
    """

    __slots__ = ("_passphrase", "_secret", "key", "key_version")

    def __init__(
        self,
        key: str | SecretStr,
        secret: str | SecretStr,
        passphrase: str | SecretStr,
        *,
        key_version: int = 2,
    ) -> None:
        key_text = _reveal(key)
        if not key_text:
            raise ValueError("the API key is empty")
        if not _reveal(secret):
            raise ValueError("the API secret is empty")
        if not _reveal(passphrase):
            raise ValueError("the API passphrase is empty")
        if key_version not in _SUPPORTED_VERSIONS:
            raise ValueError(f"key version {key_version} is not supported (use 2 or 3)")
        self.key = key_text
        self._secret = SecretStr(_reveal(secret))
        self._passphrase = SecretStr(_reveal(passphrase))
        self.key_version = key_version

    @property
    def secret(self) -> SecretStr:
        """The API secret (call ``get_secret_value()`` only to sign)."""
        return self._secret

    @property
    def passphrase(self) -> SecretStr:
        """The API passphrase."""
        return self._passphrase

    def __repr__(self) -> str:
        return f"Credentials(key={self.key!r}, secret='**********', passphrase='**********', " \
               f"key_version={self.key_version})"

    __str__ = __repr__


def _hmac_b64(secret: str, data: bytes) -> str:
    digest = hmac.new(secret.encode("utf-8"), data, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def string_to_sign(timestamp_ms: int | str, method: str, request_path: str,
                   body: str | bytes = b"") -> bytes:
    """``timestamp + METHOD + requestPath + body``, the bytes that are HMAC'd."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return f"{timestamp_ms}{method.upper()}{request_path}".encode() + raw


def sign(secret: str | SecretStr, timestamp_ms: int | str, method: str, request_path: str,
         body: str | bytes = b"") -> str:
    """``KC-API-SIGN`` of one request."""
    return _hmac_b64(_reveal(secret), string_to_sign(timestamp_ms, method, request_path, body))


def sign_passphrase(secret: str | SecretStr, passphrase: str | SecretStr) -> str:
    """``KC-API-PASSPHRASE`` for key versions 2 and 3."""
    return _hmac_b64(_reveal(secret), _reveal(passphrase).encode("utf-8"))


def signed_headers(credentials: Credentials, method: str, request_path: str,
                   body: str | bytes, timestamp_ms: int) -> dict[str, str]:
    """The five ``KC-API-*`` headers of one request.

    ``request_path`` is the path with its query string exactly as sent;
    ``body`` the exact text of a POST body ("" otherwise).
    """
    secret = credentials.secret
    return {
        HEADER_KEY: credentials.key,
        HEADER_SIGN: sign(secret, timestamp_ms, method, request_path, body),
        HEADER_TIMESTAMP: str(timestamp_ms),
        HEADER_PASSPHRASE: sign_passphrase(secret, credentials.passphrase),
        HEADER_KEY_VERSION: str(credentials.key_version),
    }
