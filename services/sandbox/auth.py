"""Request signing of KuCoin Futures private endpoints (kumex-api.md §2). Pure.

``KC-API-SIGN`` = base64(HMAC-SHA256(secret, timestamp + METHOD + requestPath + body)),
where requestPath includes the query string. Key versions 2 and 3 send
``KC-API-PASSPHRASE`` as base64(HMAC-SHA256(secret, passphrase)); version 1
(retired, and the default when ``KC-API-KEY-VERSION`` is absent) sends it in
plain text.

:func:`verify` checks a request in the venue's order and raises
:class:`AuthRefused` with the venue's code: 400001 a header missing, 400002
timestamp more than 5 s off, 400003 unknown key, 400004 wrong passphrase,
400005 bad signature. The clock comes in as an argument.

The HMACs themselves (:func:`sign`, :func:`sign_passphrase`) and the header
names are :mod:`kumex_l3.signing`'s, re-exported here; what the venue checks,
in which order and with which code, is the sandbox's own.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from kumex_l3.signing import (
    HEADER_KEY,
    HEADER_KEY_VERSION,
    HEADER_PASSPHRASE,
    HEADER_SIGN,
    HEADER_TIMESTAMP,
    sign,
    sign_passphrase,
)

__all__ = [
    "HEADER_KEY",
    "HEADER_KEY_VERSION",
    "HEADER_PASSPHRASE",
    "HEADER_SIGN",
    "HEADER_TIMESTAMP",
    "MAX_SKEW_MS",
    "ApiCredential",
    "AuthRefused",
    "AuthResult",
    "sign",
    "sign_passphrase",
    "signed_headers",
    "verify",
]

#: The largest accepted distance between the request's timestamp and server time.
MAX_SKEW_MS = 5_000

_REQUIRED = (HEADER_KEY, HEADER_SIGN, HEADER_TIMESTAMP, HEADER_PASSPHRASE)


class AuthRefused(Exception):
    """A private request failed authentication: ``code``, ``msg``, ``http_status`` (401)."""

    def __init__(self, code: str, msg: str, http_status: int = 401) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class ApiCredential:
    """An API key the exchange knows, and the user whose orders it trades."""

    key: str
    secret: str = field(repr=False)
    passphrase: str = field(repr=False)
    user_id: str


@dataclass(frozen=True, slots=True)
class AuthResult:
    """A request that passed :func:`verify`."""

    key: str
    user_id: str
    key_version: int


def signed_headers(
    credential: ApiCredential,
    method: str,
    request_path: str,
    body: str | bytes,
    now_ms: int,
    *,
    key_version: int = 2,
) -> dict[str, str]:
    """The five ``KC-API-*`` headers of a request signed with ``credential``."""
    passphrase = (
        credential.passphrase
        if key_version == 1
        else sign_passphrase(credential.secret, credential.passphrase)
    )
    return {
        HEADER_KEY: credential.key,
        HEADER_SIGN: sign(credential.secret, now_ms, method, request_path, body),
        HEADER_TIMESTAMP: str(now_ms),
        HEADER_PASSPHRASE: passphrase,
        HEADER_KEY_VERSION: str(key_version),
    }


#: Digits a millisecond timestamp may have (year 2286 is 13; anything longer is not one).
_TIMESTAMP_DIGITS: Final = 16


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def verify(
    headers: Mapping[str, str],
    method: str,
    path_with_query: str,
    body: bytes,
    now_ms: int,
    keys: Mapping[str, ApiCredential],
    *,
    alt_paths: Iterable[str] = (),
) -> AuthResult:
    """Check the ``KC-API-*`` headers of a request against ``keys`` (by key).

    ``path_with_query`` is the request path as sent, with its query string;
    ``alt_paths`` are other spellings of it to accept too (e.g. percent-decoded),
    since clients sign the path before their HTTP library quotes it.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    values: dict[str, str] = {}
    for name in _REQUIRED:
        value = lowered.get(name.lower(), "").strip()
        if not value:
            raise AuthRefused("400001", f"Please check the header of your request for {name}")
        values[name] = value
    version_text = lowered.get(HEADER_KEY_VERSION.lower(), "1").strip() or "1"
    if version_text not in {"1", "2", "3"}:
        raise AuthRefused("400001", f"Invalid {HEADER_KEY_VERSION}")
    version = int(version_text)

    timestamp = values[HEADER_TIMESTAMP]
    # Bounded before int(): Python refuses to convert more than 4300 digits (a 500).
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= _TIMESTAMP_DIGITS) \
            or abs(now_ms - int(timestamp)) > MAX_SKEW_MS:
        raise AuthRefused("400002", f"Invalid {HEADER_TIMESTAMP}")

    credential = keys.get(values[HEADER_KEY])
    if credential is None:
        raise AuthRefused("400003", f"{HEADER_KEY} not exists")

    expected_passphrase = (
        credential.passphrase
        if version == 1
        else sign_passphrase(credential.secret, credential.passphrase)
    )
    if not _equal(values[HEADER_PASSPHRASE], expected_passphrase):
        raise AuthRefused("400004", f"Invalid {HEADER_PASSPHRASE}")

    given = values[HEADER_SIGN]
    for path in (path_with_query, *alt_paths):
        if _equal(given, sign(credential.secret, timestamp, method, path, body)):
            return AuthResult(key=credential.key, user_id=credential.user_id, key_version=version)
    raise AuthRefused("400005", "Signature verification failed")
