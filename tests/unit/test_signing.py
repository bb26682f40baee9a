"""Request signing (kumex-api.md §2): vectors computed here with hmac/hashlib directly."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from pydantic import SecretStr

from kumex_l3.signing import (
    HEADER_KEY,
    HEADER_KEY_VERSION,
    HEADER_PASSPHRASE,
    HEADER_SIGN,
    HEADER_TIMESTAMP,
    Credentials,
    sign,
    sign_passphrase,
    signed_headers,
    string_to_sign,
)

SECRET = "test-secret"
PASSPHRASE = "test-passphrase"


def _expected(secret: str, text: str) -> str:
    return base64.b64encode(
        hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()).decode()


def test_documented_worked_example() -> None:
    # The official docs' example: the string to sign of a POST with a JSON body.
    text = '1547015186532POST/api/v1/deposit-address{"currency":"XBT"}'
    assert string_to_sign(1547015186532, "POST", "/api/v1/deposit-address",
                          '{"currency":"XBT"}') == text.encode()
    assert sign(SECRET, 1547015186532, "post", "/api/v1/deposit-address",
                '{"currency":"XBT"}') == _expected(SECRET, text)
    # Same from bytes, and from a SecretStr.
    assert sign(SecretStr(SECRET), "1547015186532", "POST", "/api/v1/deposit-address",
                b'{"currency":"XBT"}') == _expected(SECRET, text)


def test_get_signs_path_with_query_and_empty_body() -> None:
    got = sign(SECRET, 1700000000000, "GET", "/api/v1/orders?status=active&symbol=XBTUSDM")
    assert got == _expected(SECRET, "1700000000000GET/api/v1/orders?status=active&symbol=XBTUSDM")


def test_passphrase_is_hmacd_for_key_version_2() -> None:
    assert sign_passphrase(SECRET, PASSPHRASE) == _expected(SECRET, PASSPHRASE)
    assert sign_passphrase(SECRET, PASSPHRASE) != PASSPHRASE


def test_signed_headers() -> None:
    creds = Credentials("k1", SECRET, SecretStr(PASSPHRASE))
    headers = signed_headers(creds, "DELETE", "/api/v1/orders?symbol=XBTUSDM", "", 1234567890123)
    assert headers == {
        HEADER_KEY: "k1",
        HEADER_SIGN: _expected(SECRET, "1234567890123DELETE/api/v1/orders?symbol=XBTUSDM"),
        HEADER_TIMESTAMP: "1234567890123",
        HEADER_PASSPHRASE: _expected(SECRET, PASSPHRASE),
        HEADER_KEY_VERSION: "2",
    }
    assert signed_headers(Credentials("k1", SECRET, PASSPHRASE, key_version=3),
                          "GET", "/x", "", 1)[HEADER_KEY_VERSION] == "3"


def test_credentials_never_show_secrets() -> None:
    creds = Credentials("k1", SECRET, PASSPHRASE)
    for text in (repr(creds), str(creds), f"{creds}"):
        assert SECRET not in text and PASSPHRASE not in text
        assert "k1" in text
    assert creds.secret.get_secret_value() == SECRET
    assert SECRET not in repr(creds.secret)


@pytest.mark.parametrize(("key", "secret", "passphrase", "version"), [
    ("", "s", "p", 2), ("k", "", "p", 2), ("k", "s", "", 2), ("k", "s", "p", 1),
])
def test_credentials_refuse_bad_values(key: str, secret: str, passphrase: str,
                                       version: int) -> None:
    with pytest.raises(ValueError):
        Credentials(key, secret, passphrase, key_version=version)
