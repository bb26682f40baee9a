"""Request signing (kumex-api.md §2): the pure verifier, vectors, and over real HTTP.

Expected signatures are computed inline with ``hmac``/``hashlib`` (and, when
the package is installed, by the official ``kucoin-futures-python`` client's
own code path), never by the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from typing import Any

import httpx
import pytest

from kumex_l3.testing.sandbox_proc import DEMO_KEY_1, DEMO_KEY_2, KcAuth, SandboxProcess
from services.sandbox.auth import (
    ApiCredential,
    AuthRefused,
    sign,
    sign_passphrase,
    signed_headers,
    verify,
)

SECRET = "f03a5284-5c39-4aaa-9b20-dea10bdcf8e3"
PASSPHRASE = "my-passphrase"
KEYS = {"k1": ApiCredential(key="k1", secret=SECRET, passphrase=PASSPHRASE, user_id="u1")}
NOW_MS = 1547015186532

#: The worked example of the official docs: the exact string to sign.
WORKED_EXAMPLE = '1547015186532POST/api/v1/deposit-address{"currency":"XBT"}'


def _b64_hmac(secret: str, text: str) -> str:
    digest = hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def _headers(
    *,
    key: str = "k1",
    secret: str = SECRET,
    timestamp: int = NOW_MS,
    method: str = "GET",
    path: str = "/api/v1/orders?status=active",
    body: str = "",
    passphrase: str | None = None,
    version: str | None = "2",
) -> dict[str, str]:
    headers = {
        "KC-API-KEY": key,
        "KC-API-SIGN": _b64_hmac(secret, f"{timestamp}{method}{path}{body}"),
        "KC-API-TIMESTAMP": str(timestamp),
        "KC-API-PASSPHRASE": passphrase
        if passphrase is not None
        else _b64_hmac(secret, PASSPHRASE),
    }
    if version is not None:
        headers["KC-API-KEY-VERSION"] = version
    return headers


# ---------------------------------------------------------------------- vectors


def test_worked_example_signature_matches_an_inline_hmac() -> None:
    expected = _b64_hmac(SECRET, WORKED_EXAMPLE)
    got = sign(SECRET, "1547015186532", "POST", "/api/v1/deposit-address", '{"currency":"XBT"}')
    assert got == expected
    # Same result from bytes and an int timestamp; the method is upper-cased.
    again = sign(SECRET, 1547015186532, "post", "/api/v1/deposit-address", b'{"currency":"XBT"}')
    assert again == expected
    assert len(base64.b64decode(got)) == 32


def test_passphrase_of_key_version_2_is_an_hmac_of_the_passphrase() -> None:
    assert sign_passphrase(SECRET, PASSPHRASE) == _b64_hmac(SECRET, PASSPHRASE)
    assert sign_passphrase(SECRET, PASSPHRASE) != PASSPHRASE


def test_signed_headers_pass_verify() -> None:
    headers = signed_headers(KEYS["k1"], "POST", "/api/v1/orders", b'{"a":1}', NOW_MS)
    result = verify(headers, "POST", "/api/v1/orders", b'{"a":1}', NOW_MS, KEYS)
    assert (result.key, result.user_id, result.key_version) == ("k1", "u1", 2)


def test_official_client_signing_is_accepted() -> None:
    """The headers ``kucoin-futures-python`` builds pass our verifier (an independent signer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_request = pytest.importorskip("kucoin_futures.base_request.base_request")

    captured: dict[str, Any] = {}

    class _Session:
        def request(self, method: str, url: str, **kwargs: Any) -> Any:
            captured.update(method=method, url=url, **kwargs)

            class _Response:
                status_code = 200

                @staticmethod
                def json() -> dict[str, Any]:
                    return {"code": "200000", "data": {"ok": True}}

            return _Response()

    api = base_request.KucoinFuturesBaseRestApi(
        key="k1", secret=SECRET, passphrase=PASSPHRASE, url="http://sandbox.invalid"
    )
    api.session = _Session()
    params = {"clientOid": "abc", "side": "buy", "symbol": "XBTUSDM", "size": 1}
    api._request("POST", "/api/v1/orders", params=params)
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in captured["headers"].items()}
    body = captured["data"].encode()
    now_ms = int(headers["KC-API-TIMESTAMP"])
    assert verify(headers, "POST", "/api/v1/orders", body, now_ms, KEYS).user_id == "u1"

    api._request("GET", "/api/v1/orders", params={"status": "active", "symbol": "XBTUSDM"})
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in captured["headers"].items()}
    path = captured["url"].removeprefix("http://sandbox.invalid")
    assert path == "/api/v1/orders?status=active&symbol=XBTUSDM"
    now_ms = int(headers["KC-API-TIMESTAMP"])
    assert verify(headers, "GET", path, b"", now_ms, KEYS).key == "k1"


# ---------------------------------------------------------------------- verify()


def test_verify_accepts_a_good_request_with_any_header_case() -> None:
    headers = {k.lower(): v for k, v in _headers().items()}
    result = verify(headers, "GET", "/api/v1/orders?status=active", b"", NOW_MS + 4999, KEYS)
    assert result.user_id == "u1"


@pytest.mark.parametrize(
    "missing", ["KC-API-KEY", "KC-API-SIGN", "KC-API-TIMESTAMP", "KC-API-PASSPHRASE"]
)
def test_missing_header_is_400001(missing: str) -> None:
    headers = _headers()
    del headers[missing]
    with pytest.raises(AuthRefused) as info:
        verify(headers, "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert (info.value.code, info.value.http_status) == ("400001", 401)


def test_unknown_key_version_is_400001() -> None:
    with pytest.raises(AuthRefused) as info:
        verify(_headers(version="9"), "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert info.value.code == "400001"


@pytest.mark.parametrize("offset_ms", [5001, -5001, 3_600_000])
def test_timestamp_more_than_5_s_off_is_400002(offset_ms: int) -> None:
    headers = _headers(timestamp=NOW_MS + offset_ms)
    with pytest.raises(AuthRefused) as info:
        verify(headers, "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert info.value.code == "400002"


def test_timestamp_not_a_number_is_400002() -> None:
    headers = _headers()
    headers["KC-API-TIMESTAMP"] = "soon"
    with pytest.raises(AuthRefused) as info:
        verify(headers, "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert info.value.code == "400002"


def test_unknown_key_is_400003() -> None:
    with pytest.raises(AuthRefused) as info:
        verify(_headers(key="nope"), "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert info.value.code == "400003"


def test_wrong_passphrase_is_400004() -> None:
    wrong = _b64_hmac(SECRET, "not-the-passphrase")
    with pytest.raises(AuthRefused) as info:
        verify(_headers(passphrase=wrong), "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert info.value.code == "400004"


def test_version_2_refuses_a_plain_passphrase_and_version_1_wants_one() -> None:
    path = "/api/v1/orders?status=active"
    with pytest.raises(AuthRefused) as info:
        verify(_headers(passphrase=PASSPHRASE), "GET", path, b"", NOW_MS, KEYS)
    assert info.value.code == "400004"
    plain = _headers(passphrase=PASSPHRASE, version="1")
    assert verify(plain, "GET", path, b"", NOW_MS, KEYS).key_version == 1
    # No version header at all means version 1 (plain passphrase), as on the venue.
    assert verify(_headers(passphrase=PASSPHRASE, version=None), "GET", path, b"", NOW_MS, KEYS)


@pytest.mark.parametrize(
    ("signed", "sent"),
    [
        # body changed after signing
        (("POST", "/api/v1/orders", '{"size":1}'), ("POST", "/api/v1/orders", '{"size":2}')),
        # query string left out of the signature
        (("GET", "/api/v1/orders", ""), ("GET", "/api/v1/orders?status=active", "")),
        # another method
        (("DELETE", "/api/v1/orders/abc", ""), ("GET", "/api/v1/orders/abc", "")),
    ],
)
def test_bad_signature_is_400005(signed: tuple[str, str, str], sent: tuple[str, str, str]) -> None:
    headers = _headers(method=signed[0], path=signed[1], body=signed[2])
    with pytest.raises(AuthRefused) as info:
        verify(headers, sent[0], sent[1], sent[2].encode(), NOW_MS, KEYS)
    assert info.value.code == "400005"


def test_signature_with_another_secret_is_400005() -> None:
    headers = _headers()
    headers["KC-API-SIGN"] = _b64_hmac("other", f"{NOW_MS}GET/api/v1/orders?status=active")
    with pytest.raises(AuthRefused) as info:
        verify(headers, "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert info.value.code == "400005"


def test_alternative_path_spelling_is_accepted() -> None:
    headers = _headers(path="/api/v1/orders/byClientOid?clientOid=a b")
    raw = "/api/v1/orders/byClientOid?clientOid=a%20b"
    with pytest.raises(AuthRefused):
        verify(headers, "GET", raw, b"", NOW_MS, KEYS)
    alt = ("/api/v1/orders/byClientOid?clientOid=a b",)
    assert verify(headers, "GET", raw, b"", NOW_MS, KEYS, alt_paths=alt).key == "k1"


# ---------------------------------------------------------------------- over HTTP


def _error(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"code", "msg"}
    return response.status_code, body["code"]


def test_http_auth_failures_are_401_with_the_venue_codes(sandbox: SandboxProcess) -> None:
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as http:
        url = "/api/v1/orders?status=active"
        assert _error(http.get(url)) == (401, "400001")
        assert _error(http.get(url, auth=KcAuth(DEMO_KEY_1, skew_ms=-60_000))) == (401, "400002")
        stranger = type(DEMO_KEY_1)("no-such-key", "s", "p")
        assert _error(http.get(url, auth=KcAuth(stranger))) == (401, "400003")
        wrong_pass = type(DEMO_KEY_1)(DEMO_KEY_1.key, DEMO_KEY_1.secret, "wrong")
        assert _error(http.get(url, auth=KcAuth(wrong_pass))) == (401, "400004")
        wrong_secret = type(DEMO_KEY_1)(DEMO_KEY_1.key, "wrong", DEMO_KEY_1.passphrase)
        # Version 1 sends the passphrase in clear, so a wrong secret shows in the signature.
        assert _error(http.get(url, auth=KcAuth(wrong_secret, key_version=1))) == (401, "400005")

        # A signature over the path without its query string is refused.
        auth = KcAuth(DEMO_KEY_1)
        headers = auth.headers("GET", "/api/v1/orders", b"")
        assert _error(http.get(url, headers=headers)) == (401, "400005")
        # A POST whose body differs from the signed one is refused.
        headers = auth.headers("POST", "/api/v1/bullet-private", b'{"a":1}')
        response = http.post("/api/v1/bullet-private", content=b'{"a":2}', headers=headers)
        assert _error(response) == (401, "400005")


def test_http_good_signatures_pass_for_both_key_versions(sandbox: SandboxProcess) -> None:
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as http:
        for auth in (KcAuth(DEMO_KEY_1), KcAuth(DEMO_KEY_2, key_version=1)):
            response = http.get("/api/v1/orders?status=active&symbol=XBTUSDM", auth=auth)
            assert response.status_code == 200, response.text
            assert response.json()["code"] == "200000"
        body = json.dumps({"x": 1}, separators=(",", ":")).encode()
        response = http.post("/api/v1/bullet-private", content=body, auth=KcAuth(DEMO_KEY_1))
        assert response.status_code == 200, response.text
        assert response.json()["data"]["token"]
        assert response.json()["data"]["instanceServers"][0]["protocol"] == "websocket"


def test_time_of_the_worked_example_is_far_in_the_past() -> None:
    """The documented timestamp would be refused today: 400002, not a signature error."""
    now_ms = time.time_ns() // 1_000_000
    headers = _headers(method="POST", path="/api/v1/deposit-address", body='{"currency":"XBT"}')
    with pytest.raises(AuthRefused) as info:
        verify(headers, "POST", "/api/v1/deposit-address", b'{"currency":"XBT"}', now_ms, KEYS)
    assert info.value.code == "400002"


def test_a_timestamp_of_thousands_of_digits_is_400002_not_a_crash(
        sandbox: SandboxProcess) -> None:
    """Python will not turn 5,000 digits into an int: checked before, a clean 400002."""
    headers = _headers()
    headers["KC-API-TIMESTAMP"] = "9" * 5000
    with pytest.raises(AuthRefused) as info:
        verify(headers, "GET", "/api/v1/orders?status=active", b"", NOW_MS, KEYS)
    assert info.value.code == "400002"
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as http:
        auth = KcAuth(DEMO_KEY_1).headers("GET", "/api/v1/orders?status=active", b"")
        auth["KC-API-TIMESTAMP"] = "1" * 5000
        assert _error(http.get("/api/v1/orders?status=active", headers=auth)) == (401,
                                                                                   "400002")


def test_a_signature_for_a_query_never_authenticates_another_meaning_of_it(
        sandbox: SandboxProcess) -> None:
    """Signed: ``?symbol=XBTUSDM``. Sent: ``?symbol%3DXBTUSDM``, which for the server has no
    ``symbol`` at all (a cancel-all of every symbol): refused, 400005, nothing cancelled."""
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as http:
        placed = http.post("/api/v1/orders", auth=KcAuth(DEMO_KEY_2), json={
            "clientOid": "keep-me-" + str(NOW_MS), "symbol": "ETHUSDTM", "side": "buy",
            "price": "1000.0", "size": 1, "leverage": 5}).json()
        order_id = placed["data"]["orderId"]
        signed = KcAuth(DEMO_KEY_2).headers("DELETE", "/api/v1/orders?symbol=XBTUSDM", b"")
        forged = http.build_request("DELETE", sandbox.base_url + "/api/v1/orders",
                                    headers=signed)
        forged.url = forged.url.copy_with(raw_path=b"/api/v1/orders?symbol%3DXBTUSDM")
        assert _error(http.send(forged)) == (401, "400005")
        record = http.get(f"/api/v1/orders/{order_id}", auth=KcAuth(DEMO_KEY_2)).json()
        assert record["data"]["isActive"] is True
        http.delete(f"/api/v1/orders/{order_id}", auth=KcAuth(DEMO_KEY_2))
    # The legitimate spelling of the same request still passes.
    headers = _headers(path="/api/v1/orders?symbol=XBT USDM")
    assert verify(headers, "GET", "/api/v1/orders?symbol=XBT%20USDM", b"", NOW_MS, KEYS,
                  alt_paths=("/api/v1/orders?symbol=XBT USDM",)).key == "k1"
