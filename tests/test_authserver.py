"""The test authorization server itself, driven by hand-written protocol requests.

These tests check the fixture (tests/authserver), so plain httpx requests are right here.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.oauth2 import rfc8414, rfc9207

from tests.authserver import AuthServer, Client, pkce_pair

pytest_plugins = ["tests.authserver.fixture"]

Factory = Callable[..., AuthServer]


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:  # one client: building one costs ~50 ms
        yield client


class Proto:
    """The client side of the protocol, by hand."""

    def __init__(self, srv: AuthServer, http: httpx.Client) -> None:
        self.srv, self.http = srv, http

    def token(self, client: Client, data: dict[str, str], **kw: Any) -> httpx.Response:
        """POST to the token endpoint with the client's registered auth method."""
        data = dict(data)
        auth: tuple[str, str] | None = None
        if client.token_endpoint_auth_method == "client_secret_basic":
            auth = (client.client_id, client.client_secret or "")
        elif client.token_endpoint_auth_method == "client_secret_post":
            data |= {"client_id": client.client_id, "client_secret": client.client_secret or ""}
        else:
            data["client_id"] = client.client_id
        return self.http.post(
            self.srv.token_endpoint, data=data, auth=auth or httpx.USE_CLIENT_DEFAULT, **kw
        )

    def consent(self, url: str, username: str = "alice", approve: bool = True) -> str:
        return self.srv.consent(url, username, approve=approve, http=self.http)

    def code(
        self,
        client: Client,
        username: str = "alice",
        scope: str = "read",
        challenge: str | None = None,
    ) -> str:
        url = self.srv.authorize_url(client, scope=scope, state="st4te", code_challenge=challenge)
        redirect = query(self.consent(url, username))
        assert redirect["state"] == "st4te"
        return redirect["code"]

    def exchange(
        self,
        client: Client,
        code: str,
        verifier: str | None = None,
        redirect_uri: str | None = None,
    ) -> httpx.Response:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri or client.redirect_uris[0],
        }
        if verifier:
            data["code_verifier"] = verifier
        return self.token(client, data)

    def login(self, client: Client, username: str = "alice", scope: str = "read") -> dict[str, Any]:
        """Authorization code + PKCE, returning the token response."""
        verifier, challenge = pkce_pair()
        r = self.exchange(client, self.code(client, username, scope, challenge), verifier)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def refresh(self, client: Client, refresh_token: str, **kw: Any) -> httpx.Response:
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return self.token(client, data, **kw)

    def cc(self, client: Client, **extra: str) -> httpx.Response:
        return self.token(client, {"grant_type": "client_credentials", **extra})

    def me(self, access_token: str) -> httpx.Response:
        return self.http.get(
            self.srv.userinfo_endpoint, headers={"Authorization": f"Bearer {access_token}"}
        )


@pytest.fixture
def p(authserver: AuthServer, http: httpx.Client) -> Proto:
    return Proto(authserver, http)


# ---------------------------------------------------------------- authorization code + PKCE


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_code_with_pkce_happy_path(p: Proto, method: str) -> None:
    srv = p.srv
    client = srv.register_client(
        token_endpoint_auth_method=method, redirect_uris=["http://127.0.0.1:9/cb"]
    )
    verifier, challenge = pkce_pair()
    url = srv.authorize_url(client, scope="read write", state="s1", code_challenge=challenge)

    page = p.http.get(url)  # a real consent page with a login field and Allow/Deny
    assert page.status_code == 200
    assert 'name="username"' in page.text and 'value="allow"' in page.text

    redirect = p.consent(url, "bob")
    assert redirect.startswith("http://127.0.0.1:9/cb?")
    params = query(redirect)
    assert params["state"] == "s1"
    assert params["iss"] == srv.issuer  # RFC 9207

    r = p.exchange(client, params["code"], verifier)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    tok = r.json()
    assert tok["token_type"] == "Bearer"
    assert tok["scope"] == "read write"
    assert tok["expires_in"] == 3600
    assert tok["refresh_token"]
    assert srv.requests_seen("token")[-1].client_auth == method.removeprefix("client_secret_")

    r = p.me(tok["access_token"])
    assert r.status_code == 200
    assert r.json()["sub"] == "bob"

    # the other auth method is refused for this client
    other = dataclasses.replace(
        client,
        token_endpoint_auth_method=(
            "client_secret_post" if method == "client_secret_basic" else "client_secret_basic"
        ),
    )
    r = p.refresh(other, tok["refresh_token"])
    assert r.status_code in (400, 401)
    assert r.json()["error"] == "invalid_client"


def test_deny_redirects_with_access_denied(p: Proto) -> None:
    client = p.srv.register_client()
    _, challenge = pkce_pair()
    url = p.srv.authorize_url(client, state="s2", code_challenge=challenge)
    params = query(p.consent(url, "alice", approve=False))
    assert params["error"] == "access_denied"
    assert params["state"] == "s2"
    assert params["iss"] == p.srv.issuer
    assert "code" not in params


def test_allow_without_username_rerenders_the_form(p: Proto) -> None:
    client = p.srv.register_client()
    _, challenge = pkce_pair()
    url = p.srv.authorize_url(client, code_challenge=challenge)
    r = p.http.post(url, data={"username": "", "decision": "allow"})
    assert r.status_code == 400 and 'name="username"' in r.text


async def test_async_consent_and_auto_approve(authserver: AuthServer) -> None:
    client = authserver.register_client()
    _, challenge = pkce_pair()
    url = authserver.authorize_url(client, code_challenge=challenge)
    async with httpx.AsyncClient() as http:
        assert "code" in query(await authserver.aconsent(url, "carol", http=http))

        authserver.config.auto_approve = True
        r = await http.get(
            authserver.authorize_url(client, code_challenge=challenge, login_hint="dave")
        )
    assert r.status_code == 302 and "code" in query(r.headers["location"])


def test_wrong_verifier_is_invalid_grant(p: Proto) -> None:
    client = p.srv.register_client()
    _, challenge = pkce_pair()
    wrong, _ = pkce_pair()
    r = p.exchange(client, p.code(client, challenge=challenge), wrong)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    assert p.srv.invalid_grant_count == 1


def test_pkce_required_and_s256_only(p: Proto) -> None:
    client = p.srv.register_client()
    params = query(p.consent(p.srv.authorize_url(client, state="x")))
    assert params["error"] == "invalid_request" and params["state"] == "x"

    _, challenge = pkce_pair()
    url = p.srv.authorize_url(client, code_challenge=challenge, code_challenge_method="plain")
    assert query(p.consent(url))["error"] == "invalid_request"

    relaxed = p.srv.register_client(require_pkce=False)
    r = p.exchange(relaxed, p.code(relaxed))
    assert r.status_code == 200, r.text


def test_code_reuse_is_invalid_grant_and_revokes_its_tokens(p: Proto) -> None:
    client = p.srv.register_client()
    verifier, challenge = pkce_pair()
    code = p.code(client, challenge=challenge)
    first = p.exchange(client, code, verifier)
    assert first.status_code == 200
    second = p.exchange(client, code, verifier)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    assert p.me(first.json()["access_token"]).status_code == 401


def test_short_lived_code(p: Proto) -> None:
    p.srv.config.code_lifetime = 0.05
    client = p.srv.register_client(require_pkce=False)
    code = p.code(client)
    time.sleep(0.1)
    assert p.exchange(client, code).json()["error"] == "invalid_grant"


def test_redirect_uri_exact_match(p: Proto) -> None:
    client = p.srv.register_client(redirect_uris=["http://127.0.0.1:9/cb"], require_pkce=False)
    for bad in ("http://127.0.0.1:9/cb/", "http://127.0.0.1:9/cb?x=1", "http://evil/cb"):
        r = p.http.get(p.srv.authorize_url(client, redirect_uri=bad))
        assert r.status_code == 400  # an error page, never a redirect to an unknown URI
        assert "location" not in r.headers

    r = p.exchange(client, p.code(client), redirect_uri="http://127.0.0.1:9/cb/")
    assert r.json()["error"] == "invalid_grant"


def test_unknown_scope_is_invalid_scope(p: Proto) -> None:
    client = p.srv.register_client(scopes=["read"])
    _, challenge = pkce_pair()
    url = p.srv.authorize_url(client, scope="read admin", code_challenge=challenge)
    assert query(p.consent(url))["error"] == "invalid_scope"


# ---------------------------------------------------------------- refresh tokens


def test_refresh_rotation_and_reuse_detection(p: Proto) -> None:
    srv = p.srv
    client = srv.register_client()
    tok1 = p.login(client)
    r = p.refresh(client, tok1["refresh_token"])
    assert r.status_code == 200, r.text
    tok2 = r.json()
    assert tok2["refresh_token"] != tok1["refresh_token"]
    assert tok2["access_token"] != tok1["access_token"]
    assert tok2["scope"] == "read"
    assert p.me(tok2["access_token"]).status_code == 200

    # replaying the rotated refresh token revokes the whole family
    r = p.refresh(client, tok1["refresh_token"])
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    assert srv.reuse_detections == 1
    assert srv.is_grant_revoked(tok2["refresh_token"])
    assert p.refresh(client, tok2["refresh_token"]).json()["error"] == "invalid_grant"
    assert p.me(tok2["access_token"]).status_code == 401

    assert srv.refresh_requests_for(tok1["access_token"]) == 3
    assert srv.invalid_grant_count == 2
    assert srv.token_requests == {"authorization_code": 1, "refresh_token": 3}


def test_reuse_grace_accepts_the_last_rotated_token_for_a_while(p: Proto) -> None:
    """The answer to a refresh is lost (as if the client died): within the grace period the
    old refresh token still works, once it is over it is a replay; only the token rotated
    out last gets the grace, never an older one."""
    srv = p.srv
    srv.config.refresh_token_reuse_grace = 0.5
    client = srv.register_client()
    tok1 = p.login(client)
    lost = p.refresh(client, tok1["refresh_token"]).json()  # the answer the client lost
    retry = p.refresh(client, tok1["refresh_token"])
    assert retry.status_code == 200, retry.text
    tok3 = retry.json()
    assert tok3["refresh_token"] not in (tok1["refresh_token"], lost["refresh_token"])
    assert srv.grace_reuses == 1 and srv.reuse_detections == 0
    assert p.me(tok3["access_token"]).status_code == 200
    # What the server can tell: which answers to a refresh were never used since.
    unused = {t.refresh_token for t in srv.unused_refresh_answers()}
    assert unused == {lost["refresh_token"], tok3["refresh_token"]}
    tok4 = p.refresh(client, tok3["refresh_token"]).json()
    assert {t.refresh_token for t in srv.unused_refresh_answers()} == {
        lost["refresh_token"], tok4["refresh_token"],
    }
    # tok1 is no longer the token rotated out last: a replay, the grant is revoked.
    assert p.refresh(client, tok1["refresh_token"]).json()["error"] == "invalid_grant"
    assert srv.reuse_detections == 1 and srv.is_grant_revoked(tok4["refresh_token"])

    # After the grace period the token rotated out last is a replay too.
    tok1 = p.login(client)
    p.refresh(client, tok1["refresh_token"])
    time.sleep(0.6)
    assert p.refresh(client, tok1["refresh_token"]).json()["error"] == "invalid_grant"
    assert srv.reuse_detections == 2 and srv.grace_reuses == 1


def test_refresh_without_rotation(p: Proto) -> None:
    p.srv.config.rotate_refresh_tokens = False
    client = p.srv.register_client()
    tok = p.login(client)
    for _ in range(2):
        r = p.refresh(client, tok["refresh_token"])
        assert r.status_code == 200, r.text
        assert "refresh_token" not in r.json()
    assert p.srv.refresh_requests_for(tok["refresh_token"]) == 2


def test_refresh_token_of_another_client_is_invalid_grant(p: Proto) -> None:
    a, b = p.srv.register_client(), p.srv.register_client()
    tok = p.login(a)
    assert p.refresh(b, tok["refresh_token"]).json()["error"] == "invalid_grant"


# ---------------------------------------------------------------- client credentials


def test_client_credentials(p: Proto) -> None:
    client = p.srv.register_client(
        grant_types=["client_credentials"],
        scopes=["jobs"],
        token_endpoint_auth_method="client_secret_post",
    )
    r = p.cc(client, scope="jobs")
    assert r.status_code == 200, r.text
    tok = r.json()
    assert tok["scope"] == "jobs" and "refresh_token" not in tok
    assert p.me(tok["access_token"]).json()["sub"] == client.client_id

    assert p.cc(client, scope="admin").json()["error"] == "invalid_scope"
    code_only = p.srv.register_client()
    assert p.cc(code_only).json()["error"] == "unauthorized_client"


# ---------------------------------------------------------------- token lifetime / shapes


def test_expired_access_token_is_401(authserver_factory: Factory, http: httpx.Client) -> None:
    p = Proto(authserver_factory(access_token_lifetime=0.3), http)
    client = p.srv.register_client()
    tok = p.login(client)
    assert tok["expires_in"] == 1  # ceiling of the real lifetime
    assert p.me(tok["access_token"]).status_code == 200
    time.sleep(0.35)
    r = p.me(tok["access_token"])
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"
    assert r.headers["www-authenticate"].startswith("Bearer ")
    assert p.me("nonsense").status_code == 401
    assert http.get(p.srv.userinfo_endpoint).status_code == 401

    p.srv.config.access_token_lifetime = 3600
    fresh = p.refresh(client, tok["refresh_token"]).json()
    p.srv.expire_access_tokens()
    assert p.me(fresh["access_token"]).status_code == 401


def test_omitted_expires_in_and_extra_fields(
    authserver_factory: Factory, http: httpx.Client
) -> None:
    srv = authserver_factory(
        include_expires_in=False, extra_token_fields={"instance_url": "https://na1.example"}
    )
    tok = Proto(srv, http).login(srv.register_client())
    assert "expires_in" not in tok
    assert tok["instance_url"] == "https://na1.example"


def test_slack_shape(authserver_factory: Factory, http: httpx.Client) -> None:
    p = Proto(authserver_factory(response_shape="slack", slack_errors_as_200=True), http)
    client = p.srv.register_client()
    body = p.login(client, "erin")
    assert body["ok"] is True
    assert body["team"]["id"] == "T0TEST"
    user = body["authed_user"]
    assert user["id"] == "U_erin" and user["access_token"] and user["refresh_token"]
    assert "access_token" not in body
    r = p.refresh(client, "rt_unknown")
    assert r.status_code == 200 and r.json() == {"ok": False, "error": "invalid_grant"}
    assert p.srv.invalid_grant_count == 1


def test_json_token_requests_only_when_enabled(p: Proto) -> None:
    client = p.srv.register_client(
        grant_types=["client_credentials"], token_endpoint_auth_method="client_secret_post"
    )
    body = {
        "grant_type": "client_credentials",
        "client_id": client.client_id,
        "client_secret": client.client_secret,
    }
    assert p.http.post(p.srv.token_endpoint, json=body).status_code == 400
    p.srv.config.accept_json_token_requests = True
    r = p.http.post(p.srv.token_endpoint, json=body)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- revocation


def test_revocation_endpoint(p: Proto) -> None:
    client = p.srv.register_client()
    tok = p.login(client)
    auth = (client.client_id, client.client_secret or "")
    url = p.srv.revocation_endpoint
    r = p.http.post(
        url, auth=auth, data={"token": tok["access_token"], "token_type_hint": "access_token"}
    )
    assert r.status_code == 200
    assert p.me(tok["access_token"]).status_code == 401
    tok2 = p.refresh(client, tok["refresh_token"]).json()  # the grant is still alive

    assert p.http.post(url, auth=auth, data={"token": tok2["refresh_token"]}).status_code == 200
    assert p.me(tok2["access_token"]).status_code == 401
    assert p.refresh(client, tok2["refresh_token"]).json()["error"] == "invalid_grant"
    # unknown tokens are fine (RFC 7009 §2.2)
    assert p.http.post(url, auth=auth, data={"token": "nope"}).status_code == 200


def test_server_side_revocation_of_a_users_grant(p: Proto) -> None:
    client = p.srv.register_client()
    tok = p.login(client, "frank")
    other = p.login(client, "grace")
    assert p.srv.revoke_user_grants("frank") == 1
    assert p.refresh(client, tok["refresh_token"]).json()["error"] == "invalid_grant"
    assert p.me(tok["access_token"]).status_code == 401
    assert p.refresh(client, other["refresh_token"]).status_code == 200


# ---------------------------------------------------------------- metadata


def test_metadata_document(p: Proto) -> None:
    srv = p.srv
    srv.register_client()
    doc = p.http.get(srv.metadata_url).json()
    rfc8414.AuthorizationServerMetadata(doc).validate(
        metadata_classes=[rfc9207.AuthorizationServerMetadata]
    )
    assert doc["issuer"] == srv.issuer
    assert doc["token_endpoint"] == srv.token_endpoint
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["authorization_response_iss_parameter_supported"] is True

    srv.config.include_iss = False
    client = srv.register_client(require_pkce=False)
    assert "iss" not in query(p.consent(srv.authorize_url(client)))
    doc = p.http.get(srv.metadata_url).json()
    assert doc["authorization_response_iss_parameter_supported"] is False


# ---------------------------------------------------------------- fault injection


def test_fault_500_then_recovers(p: Proto) -> None:
    client = p.srv.register_client()
    tok = p.login(client)
    p.srv.fail_next(2, grant_type="refresh_token")
    assert p.refresh(client, tok["refresh_token"]).status_code == 500
    assert p.refresh(client, tok["refresh_token"]).status_code == 500
    assert p.refresh(client, tok["refresh_token"]).status_code == 200  # never processed
    assert p.srv.refresh_requests_for(tok["refresh_token"]) == 3
    assert [rec.fault for rec in p.srv.requests_seen("token")] == [None, "error", "error", None]


def test_fault_429_with_retry_after(p: Proto) -> None:
    client = p.srv.register_client(grant_types=["client_credentials"])
    p.srv.rate_limit_next(retry_after=7)
    r = p.cc(client)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert p.cc(client).status_code == 200


def test_fault_timeout(p: Proto) -> None:
    client = p.srv.register_client()
    tok = p.login(client)
    p.srv.timeout_next(seconds=3)
    with pytest.raises(httpx.ReadTimeout):
        p.refresh(client, tok["refresh_token"], timeout=0.2)
    assert p.refresh(client, tok["refresh_token"]).status_code == 200


def test_fault_timeout_after_processing_loses_the_rotated_token(p: Proto) -> None:
    client = p.srv.register_client()
    tok = p.login(client)
    p.srv.timeout_next(seconds=3, process=True)
    with pytest.raises(httpx.ReadTimeout):
        p.refresh(client, tok["refresh_token"], timeout=0.2)
    # the server rotated it although the client never saw the answer
    assert p.refresh(client, tok["refresh_token"]).json()["error"] == "invalid_grant"
    assert p.srv.reuse_detections == 1


def test_fault_delay(p: Proto) -> None:
    client = p.srv.register_client(grant_types=["client_credentials"])
    p.srv.delay_next(seconds=0.2)
    t0 = time.monotonic()
    assert p.cc(client).status_code == 200
    assert time.monotonic() - t0 >= 0.2


def test_fault_on_the_protected_resource(p: Proto) -> None:
    tok = p.login(p.srv.register_client())
    p.srv.fail_next(endpoint="api", status=503)
    assert p.me(tok["access_token"]).status_code == 503
    assert p.me(tok["access_token"]).status_code == 200


# ---------------------------------------------------------------- counters / log


def test_counters_and_concurrent_request_log(p: Proto) -> None:
    srv = p.srv
    client = srv.register_client(
        grant_types=["authorization_code", "refresh_token", "client_credentials"]
    )
    tok = p.login(client)
    results: list[int] = []

    def hit() -> None:
        results.append(p.cc(client).status_code)

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    p.refresh(client, tok["refresh_token"])
    assert srv.token_requests == {
        "authorization_code": 1,
        "client_credentials": 8,
        "refresh_token": 1,
    }
    seen = srv.requests_seen("token")
    assert len(seen) == 10 and all(r.status == 200 for r in seen)
    assert seen[-1].grant_type == "refresh_token"
    assert seen[-1].family_id == srv.family_of(tok["access_token"])

    srv.reset_counters()
    assert srv.token_requests == {} and srv.requests_seen() == []
