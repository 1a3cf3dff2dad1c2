"""auth_type ``jwt_bearer`` (RFC 7523) against the test authorization server's JWT-bearer
grant (Authlib's ``JWTBearerGrant``), which checks each assertion's signature against the
public key registered for its ``iss``, its ``aud``, its times (60 s leeway) and its
``sub``: connect with a service-account key file, what a node gets, ctx.client and the
proxy against the API server, renewal by a new assertion (one for many callers), bad keys
and refusals storing nothing, and clock skew. The pure parts without I/O."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.auth.jwt_bearer import GRANT_TYPE, JwtBearerProvider, fill
from broker.catalog import parse_provider
from broker.errors import InvalidInput
from broker.nodes import ExecutionContext
from broker.runtime import Broker
from tests import oauth_support
from tests.apiserver import ApiServer
from tests.authserver import AuthServer
from tests.oauth_support import Live
from tests.support import pem, public_pem

live_factory = oauth_support.live_factory

EMAIL = "robot@project.iam.example"
USER = "alice@example.com"


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_file(key: Any, email: str = EMAIL) -> str:
    """A Google-style service account key file."""
    return json.dumps({
        "type": "service_account", "project_id": "project", "private_key_id": "kid-1",
        "private_key": pem(key), "client_email": email, "token_uri": "ignored",
    })


def service_account(authserver: AuthServer, apiserver: ApiServer, **extra: Any) -> dict[str, Any]:
    return {
        "display_name": "Robot",
        "auth_type": "jwt_bearer",
        "fields": {
            "key_file": {"title": "Key file", "format": "json", "max_length": 16384},
            "subject": {"title": "Act as", "secret": False, "required": False},
        },
        "private_key_from": "key_file.private_key",
        "key_id": "{key_file.private_key_id}",
        "claims": {"iss": "{key_file.client_email}", "sub": "{subject}",
                   "aud": authserver.token_endpoint, "scope": "read"},
        "token_url": authserver.token_endpoint,
        "api": {"base_url": f"{apiserver.url}/bearer"},
        **extra,
    }


def registered(authserver: AuthServer, key: Any) -> None:
    authserver.register_client(
        EMAIL, redirect_uris=[], grant_types=[GRANT_TYPE], scopes=["read"],
        token_endpoint_auth_method="none", public_key=public_pem(key), subjects=[USER],
    )


def jwt_requests(live: Live) -> list[Any]:
    return [r for r in live.server.requests_seen("token") if r.grant_type == GRANT_TYPE]


def claims_of(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = assertion.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (json.loads(base64.urlsafe_b64decode(pad(head))),
            json.loads(base64.urlsafe_b64decode(pad(body))))


def advance(broker: Broker, seconds: float) -> None:
    base = broker.clock
    broker.clock = lambda: base() + timedelta(seconds=seconds)


async def connect(live: Live, body: dict[str, Any]) -> Any:
    return await live.service.post("/groups/g1/integrations/custom/robot", json=body)


async def stored(live: Live) -> Any:
    async with live.broker.session() as db:
        return await live.broker.repository.get(db, "g1", "robot")


async def test_a_service_account_connects_calls_and_renews(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer,
    rsa_key: Any,
) -> None:
    registered(authserver, rsa_key)
    authserver.config.access_token_lifetime = 5
    spec = service_account(authserver, apiserver)
    async with live_factory(extra_providers={"robot": spec}) as live:
        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}["robot"]
        assert listed["fields"]["key_file"]["format"] == "json"
        before = datetime.now(UTC).timestamp()
        r = await connect(live, {"key_file": key_file(rsa_key), "subject": USER})
        assert r.status_code == 200, r.text

        (sent,) = jwt_requests(live)
        header, claims = claims_of(sent.params["assertion"])
        assert header == {"alg": "RS256", "typ": "JWT", "kid": "kid-1"}
        assert (claims["iss"], claims["sub"], claims["aud"], claims["scope"]) == (
            EMAIL, USER, authserver.token_endpoint, "read")
        # Issued a little before now (servers whose clocks run behind), valid one hour.
        assert before - 31 <= claims["iat"] <= before - 29
        assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]

        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("robot")
        assert got["subject"] == USER and got["access_token"].startswith("at_")
        assert "key_file" not in got and "PRIVATE KEY" not in json.dumps(got)
        async with ctx.client("robot") as api:
            r = await api.get("/echo")
        assert r.status_code == 200 and r.json()["principal"] == USER
        r = await live.service.get("/groups/g1/integrations/robot/proxy/echo")
        assert r.status_code == 200 and r.json()["principal"] == USER
        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}["robot"]
        assert listed["hint"] == {"subject": USER, "account": USER}  # who it acts as
        assert "PRIVATE KEY" not in r.text

        # Past the token's refresh point (it lives 5 s here: refreshed in its second half),
        # 20 callers at once: one new assertion, one new token.
        await asyncio.sleep(3)
        tokens = await asyncio.gather(*(ctx.custom_integration("robot") for _ in range(20)))
        assert len({t["access_token"] for t in tokens}) == 1
        assert tokens[0]["access_token"] != got["access_token"]
        assert len(jwt_requests(live)) == 2
        _, renewed = claims_of(jwt_requests(live)[1].params["assertion"])
        assert renewed["jti"] != claims["jti"] and renewed["iat"] >= claims["iat"] + 3


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"key_file": "not json"}, "key_file", "invalid_input"),
        ({"key_file": json.dumps({"client_email": EMAIL, "private_key": "-----BEGIN junk"})},
         "key_file", "invalid_input"),
        ({"key_file": json.dumps({"private_key": "x"})}, "key_file", "invalid_input"),
    ],
)
async def test_a_key_that_cannot_sign_sends_nothing_and_stores_nothing(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer,
    rsa_key: Any, body: dict[str, Any], field: str, code: str,
) -> None:
    registered(authserver, rsa_key)
    async with live_factory(
        extra_providers={"robot": service_account(authserver, apiserver)}
    ) as live:
        r = await connect(live, body)
        assert r.status_code == 422, r.text
        assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, field)
        assert "junk" not in r.text and jwt_requests(live) == []
        assert await stored(live) is None


async def test_a_refused_assertion_stores_nothing(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer,
    rsa_key: Any,
) -> None:
    registered(authserver, rsa_key)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with live_factory(
        extra_providers={"robot": service_account(authserver, apiserver)}
    ) as live:
        for body in (
            {"key_file": key_file(other)},  # signed by a key the server does not know
            {"key_file": key_file(rsa_key), "subject": "mallory@example.com"},
            {"key_file": key_file(rsa_key, email="nobody@project.iam.example")},
        ):
            r = await connect(live, body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "credential_rejected"
            assert r.json()["error"]["field"] == "key_file"
            assert "PRIVATE KEY" not in r.text
        assert [x.status for x in jwt_requests(live)] == [400, 400, 400]
        assert await stored(live) is None


@pytest.mark.parametrize(("skew", "accepted"), [(80, True), (-600, True), (200, False)])
async def test_clock_skew_within_the_margin_is_absorbed(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer,
    rsa_key: Any, skew: int, accepted: bool,
) -> None:
    """The broker's clock ``skew`` seconds off the token server's: an assertion issued
    30 s early, and the server's 60 s leeway, absorb 90 s ahead; far ahead is refused
    (its iat is in the server's future) and stores nothing."""
    registered(authserver, rsa_key)
    async with live_factory(
        extra_providers={"robot": service_account(authserver, apiserver)}
    ) as live:
        advance(live.broker, skew)
        r = await connect(live, {"key_file": key_file(rsa_key)})
        if accepted:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 422 and r.json()["error"]["code"] == "credential_rejected"
            assert await stored(live) is None


# ---------------------------------------------------------------- pure parts

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _spec(**data: Any) -> JwtBearerProvider:
    base: dict[str, Any] = {
        "name": "j", "display_name": "J", "auth_type": "jwt_bearer",
        "fields": {"key_file": {"title": "Key", "format": "json"}},
        "private_key_from": "key_file.private_key",
        "claims": {"iss": "{key_file.client_email}", "aud": "https://t.example/token"},
        "token_url": "https://t.example/token",
    }
    spec = parse_provider({**base, **data})
    assert isinstance(spec, JwtBearerProvider)
    return spec


def test_templates_reach_into_json_fields() -> None:
    values = {"key": {"a": {"b": "x"}, "n": 5}, "plain": "p"}
    assert fill("{key.a.b}-{plain}", values) == "x-p"
    for template in ("{key.n}", "{key.missing}", "{plain.x}", "{nobody}"):
        with pytest.raises(KeyError):
            fill(template, values)


def test_an_es256_assertion_and_the_operators_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spec = _spec(fields={"user": {"title": "User", "secret": False}},
                 private_key_from=None, private_key=pem(key), algorithm="ES256",
                 claims={"iss": "consumer-key", "sub": "{user}", "aud": "https://t.example"})
    request = spec.request({"user": "ada"}, NOW)
    form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
    assert form["grant_type"] == "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
    header, claims = claims_of(form["assertion"])
    assert header["alg"] == "ES256" and "kid" not in header
    assert (claims["iss"], claims["sub"]) == ("consumer-key", "ada")
    assert claims["iat"] == int(NOW.timestamp()) - 30
    # An RSA key cannot sign ES256: refused naming no field (it is the operator's).
    wrong = _spec(fields={"user": {"title": "User", "secret": False}},
                  private_key_from=None, private_key=pem(rsa.generate_private_key(65537, 2048)),
                  algorithm="ES256", claims={"iss": "c", "aud": "https://t.example"})
    with pytest.raises(InvalidInput) as caught:
        wrong.assertion({"user": "ada"}, NOW)
    assert caught.value.field is None and "PRIVATE" not in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        {"private_key_from": None},  # no key at all
        {"private_key": "pem"},  # two keys
        {"claims": {"iss": "x"}},  # no aud
        {"claims": {"iss": "{nobody}", "aud": "a"}},
        {"token_url": "https://{key_file}.example/token"},  # a secret in a URL
        {"verify": {"url": "https://t.example/me"}},
        {"fields": {"key_file": {"title": "Key", "secret": False, "format": "json"}}},
        {"assertion_lifetime_seconds": 7200},
    ],
)
def test_the_schema_refuses(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _spec(**data)


def test_the_catalogs_service_account_files_sign_what_their_docs_ask(
    tmp_path: Any, rsa_key: Any,
) -> None:
    from broker.config import load_settings
    from tests.support import pem, yaml_text

    path = tmp_path / "config.yaml"
    path.write_text(yaml_text({
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
        "providers": {
            "google-service-account": {},
            "salesforce-jwt": {"client_id": "3MVG9-consumer-key", "private_key": pem(rsa_key)},
        },
    }))
    specs = load_settings(path, env={}).resolved_providers
    google = specs["google-service-account"]
    assert isinstance(google, JwtBearerProvider)
    request = google.request({"key_file": key_file(rsa_key)}, NOW)
    assert str(request.url) == "https://oauth2.googleapis.com/token"
    form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
    _, claims = claims_of(form["assertion"])
    assert (claims["iss"], claims["aud"]) == (EMAIL, "https://oauth2.googleapis.com/token")
    assert "sub" not in claims and claims["exp"] - claims["iat"] == 3600
    assert "https://www.googleapis.com/auth/spreadsheets" in claims["scope"].split()

    salesforce = specs["salesforce-jwt"]
    assert isinstance(salesforce, JwtBearerProvider)
    request = salesforce.request({"username": "ada@acme.com", "login_host": "test.salesforce.com"},
                                 NOW)
    assert str(request.url) == "https://test.salesforce.com/services/oauth2/token"
    form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
    _, claims = claims_of(form["assertion"])
    assert (claims["iss"], claims["sub"], claims["aud"]) == (
        "3MVG9-consumer-key", "ada@acme.com", "https://test.salesforce.com")
    assert claims["exp"] - claims["iat"] <= 180  # Salesforce: at most three minutes
