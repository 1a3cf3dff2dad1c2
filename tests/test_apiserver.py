"""The test provider API itself (tests/apiserver), over real HTTP on loopback.

Bearer tokens are real: issued by the test authorization server through the authorization
code flow, then validated by the API server at the authorization server's ``/api/me``.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.apiserver import ApiServer, expected_sha256, iter_pattern
from tests.authserver import AuthServer, pkce_pair

FIVE_MB = 5 * 1024 * 1024


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def issue_token(authserver: AuthServer, http: httpx.Client, username: str) -> str:
    """A real access token for ``username``: consent, then code exchange with PKCE."""
    client = authserver.register_client(scopes=["read"])
    verifier, challenge = pkce_pair()
    url = authserver.authorize_url(client, scope="read", state="s", code_challenge=challenge)
    code = parse_qs(urlsplit(authserver.consent(url, username, http=http)).query)["code"][0]
    r = http.post(
        authserver.token_endpoint,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": client.redirect_uris[0],
            "code_verifier": verifier,
        },
        auth=(client.client_id, client.client_secret or ""),
    )
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


def test_bearer_accepts_a_real_token_and_rejects_others(
    apiserver: ApiServer, authserver: AuthServer, http: httpx.Client
) -> None:
    token = issue_token(authserver, http, "alice")
    r = http.get(apiserver.url + "/bearer/echo", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json()["principal"] == "alice"
    assert r.json()["headers"]["authorization"] == f"Bearer {token}"

    bad = http.get(apiserver.url + "/bearer/echo", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert bad.json() == {"error": "invalid_token"}

    missing = http.get(apiserver.url + "/bearer/echo")
    assert (missing.status_code, missing.headers["www-authenticate"]) == (401, "Bearer")

    authserver.expire_access_tokens("alice")  # checked live at the authserver, no cache
    expired = http.get(apiserver.url + "/bearer/echo", headers={"Authorization": f"Bearer {token}"})
    assert expired.status_code == 401

    apiserver.config.reject_status = 403
    assert http.get(apiserver.url + "/bearer/echo").status_code == 403

    statuses = [(rec.principal, rec.status) for rec in apiserver.requests]
    assert statuses == [("alice", 200), (None, 401), (None, 401), (None, 401), (None, 403)]


def test_rejection_comes_before_route_logic(apiserver: ApiServer, http: httpx.Client) -> None:
    assert http.get(apiserver.url + "/bearer/flaky/k").status_code == 401
    assert apiserver.attempts("k") == 0
    assert http.get(apiserver.url + "/bearer/no-such-route").status_code == 401
    assert http.get(apiserver.url + "/open/no-such-route").status_code == 404


def test_api_keys_in_header_and_query(apiserver: ApiServer, http: httpx.Client) -> None:
    apiserver.config.api_keys = {"k-123"}
    base = apiserver.url
    r = http.get(base + "/key-header/echo", headers={"X-Api-Key": "k-123"})
    assert (r.status_code, r.json()["principal"]) == (200, "k-123")
    assert http.get(base + "/key-header/echo", headers={"X-Api-Key": "k-999"}).status_code == 401
    assert http.get(base + "/key-header/echo", params={"api_key": "k-123"}).status_code == 401

    r = http.get(base + "/key-query/echo", params={"api_key": "k-123", "q": "x"})
    assert (r.status_code, r.json()["principal"]) == (200, "k-123")
    assert r.json()["query"] == [["api_key", "k-123"], ["q", "x"]]
    assert http.get(base + "/key-query/echo", headers={"X-Api-Key": "k-123"}).status_code == 401


def test_basic(apiserver_factory: Callable[..., ApiServer], http: httpx.Client) -> None:
    srv = apiserver_factory(basic_users={"bob": "s3cret:with-colon"})
    r = http.get(srv.url + "/basic/echo", auth=("bob", "s3cret:with-colon"))
    assert (r.status_code, r.json()["principal"]) == (200, "bob")
    for auth in [("bob", "wrong"), ("eve", "s3cret:with-colon")]:
        r = http.get(srv.url + "/basic/echo", auth=auth)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Basic realm="apiserver"'
    garbled = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
    assert http.get(srv.url + "/basic/echo", headers=garbled).status_code == 401


def test_echo_reports_the_request_as_received(apiserver: ApiServer, http: httpx.Client) -> None:
    body = b"x" * 1000
    r = http.put(
        apiserver.url + "/open/echo?a=1&a=2&empty=&sp=a%20b",
        content=body,
        headers={"Cookie": "c=1", "X-Trace": "t"},
    )
    echo = r.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/open/echo"
    assert echo["query"] == [["a", "1"], ["a", "2"], ["empty", ""], ["sp", "a b"]]
    assert echo["headers"]["cookie"] == "c=1" and echo["headers"]["x-trace"] == "t"
    assert echo["body_len"] == 1000
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["principal"] is None

    rec = apiserver.requests[-1]
    assert (rec.method, rec.path, rec.query, rec.status) == (
        "PUT",
        "/open/echo",
        "a=1&a=2&empty=&sp=a%20b",
        200,
    )
    assert rec.headers["x-trace"] == "t"

    for method in ["GET", "POST", "PATCH", "DELETE", "OPTIONS"]:
        assert http.request(method, apiserver.url + "/open/echo").json()["method"] == method
    head = http.head(apiserver.url + "/open/echo")
    assert (head.status_code, head.content) == (200, b"")

    deep = http.get(apiserver.url + "/open/echo/repos/a%2Fb/issues").json()
    assert deep["path"] == "/open/echo/repos/a/b/issues"
    assert deep["raw_path"] == "/open/echo/repos/a%2Fb/issues"


def test_status(apiserver: ApiServer, http: httpx.Client) -> None:
    r = http.post(apiserver.url + "/open/status/418", content=b"ignored")
    assert (r.status_code, r.json()) == (418, {"status": 418})
    assert http.get(apiserver.url + "/open/status/204").status_code == 204


def test_flaky_counts_per_key(apiserver: ApiServer, http: httpx.Client) -> None:
    url = apiserver.url + "/open/flaky/a"
    params = {"fail": "2", "retry_after": "3"}
    first, second, third = (http.post(url, params=params) for _ in range(3))
    assert (first.status_code, first.headers["retry-after"]) == (429, "3")
    assert second.status_code == 429
    assert (third.status_code, third.json()) == (200, {"attempt": 3})
    assert apiserver.attempts("a") == 3

    other = {"status": "503", "retry_after": "60", "header": "X-RateLimit-Reset"}
    r = http.get(apiserver.url + "/open/flaky/b", params=other)
    assert (r.status_code, r.headers["x-ratelimit-reset"]) == (503, "60")
    assert "retry-after" not in r.headers
    assert http.get(apiserver.url + "/open/flaky/c").status_code == 429  # default: once
    assert apiserver.attempts("b") == 1 and apiserver.attempts("zzz") == 0

    apiserver.reset()
    assert apiserver.attempts("a") == 0 and apiserver.requests == []
    assert http.get(url).status_code == 429  # counting starts over


def test_redirect_is_not_followed_by_default(apiserver: ApiServer, http: httpx.Client) -> None:
    r = http.get(apiserver.url + "/open/redirect", params={"to": "https://example.test/x"})
    assert (r.status_code, r.headers["location"]) == (302, "https://example.test/x")


def test_bytes_streams_the_pattern_intact(apiserver: ApiServer, http: httpx.Client) -> None:
    n = FIVE_MB + 123
    digest, size = hashlib.sha256(), 0
    with http.stream("GET", apiserver.url + "/open/bytes/" + str(n)) as r:
        assert r.headers["content-length"] == str(n)
        for chunk in r.iter_raw():
            digest.update(chunk)
            size += len(chunk)
    assert size == n
    assert digest.hexdigest() == expected_sha256(n)
    assert b"".join(iter_pattern(300)) == bytes(range(256)) + bytes(range(44))


def test_upload_hashes_a_streamed_body(apiserver: ApiServer, http: httpx.Client) -> None:
    r = http.post(apiserver.url + "/open/upload", content=iter_pattern(FIVE_MB))
    assert r.json() == {"size": FIVE_MB, "sha256": expected_sha256(FIVE_MB)}
    assert apiserver.requests[-1].headers["transfer-encoding"] == "chunked"


def test_slow_and_set_cookie(apiserver: ApiServer, http: httpx.Client) -> None:
    start = time.monotonic()
    r = http.get(apiserver.url + "/open/slow", params={"seconds": "0.2"})
    assert r.status_code == 200 and time.monotonic() - start >= 0.2
    with pytest.raises(httpx.ReadTimeout):
        http.get(apiserver.url + "/open/slow", params={"seconds": "5"}, timeout=0.1)

    r = http.get(apiserver.url + "/open/set-cookie")
    assert r.headers["set-cookie"] == "session=apiserver-cookie; Path=/; HttpOnly"
