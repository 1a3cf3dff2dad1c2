"""Every bad input to the HTTP API: its status, its error body, and that no row is left.

The app runs in process (httpx's ASGI transport, which streams request bodies chunk by
chunk); the provider that a ``verify`` request reaches is a real server on 127.0.0.1.
Providers are defined inline here, so the tests do not depend on the shipped catalog.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.config import Settings
from broker.integrations import GROUP_ID_PATTERN
from broker.runtime import Broker
from broker.store.models import Connection
from broker.web import create_app
from broker.web.bodies import MAX_BODY_BYTES
from tests.support import serve

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_PLUGIN = "examples.openweathermap:plugin"
KEY = "0123456789abcdef0123456789abcdef"
AUTH = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
NAME = "hexkey"
TRIGGER = f"/groups/g1/integrations/custom/{NAME}"
PROVIDERS: dict[str, Any] = {
    NAME: {
        "display_name": "Hex Key Service",
        "auth_type": "apikey",
        "fields": {
            "api_key": {"title": "API key", "pattern": "^[0-9a-f]{32}$", "example": "f" * 32},
            "region": {
                "title": "Region",
                "secret": False,
                "required": False,
                "pattern": "^[a-z]{2}$",
            },
        },
    }
}


# --- helpers and fixtures ------------------------------------------------------------------


async def rows(broker: Broker) -> int:
    """How many rows the connections table holds."""
    async with broker.session() as db:
        return int((await db.execute(select(func.count()).select_from(Connection))).scalar_one())


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    return error


@asynccontextmanager
async def open_broker(settings: Settings) -> AsyncIterator[Broker]:
    b = await Broker.open(settings)
    try:
        yield b
    finally:
        await b.close()


@asynccontextmanager
async def app_client(
    broker: Broker, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(broker)),
        base_url="http://broker.test",
        headers=AUTH if headers is None else headers,
    ) as c:
        yield c




@pytest.fixture
def seed_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository root (home of ``examples``) first on sys.path, for this test only."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))


@pytest.fixture
async def api(
    store_url: str, make_settings: Callable[..., Settings], seed_importable: None
) -> AsyncIterator[Broker]:
    """A broker with an inline provider (``hexkey``) and the seed example plugin."""
    settings = make_settings(database_url=store_url, providers=PROVIDERS, plugins=[SEED_PLUGIN])
    async with open_broker(settings) as b:
        yield b


@pytest.fixture
async def http(api: Broker) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(api) as c:
        yield c


# --- authorization -----------------------------------------------------------------------

BAD_AUTHORIZATION: dict[str, dict[str, Any]] = {
    "missing": {},
    "wrong token": {"Authorization": "Bearer not-the-service-token-at-all"},
    "token with one character changed": {"Authorization": f"Bearer {SERVICE_TOKEN[:-1]}X"},
    "token prefix": {"Authorization": f"Bearer {SERVICE_TOKEN[:-1]}"},
    "empty": {"Authorization": ""},
    "scheme only": {"Authorization": "Bearer"},
    "scheme and spaces": {"Authorization": "Bearer    "},
    "basic scheme": {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
    "right token, wrong scheme": {"Authorization": f"Token {SERVICE_TOKEN}"},
    "right token, no scheme": {"Authorization": SERVICE_TOKEN},
    "no space after scheme": {"Authorization": f"Bearer{SERVICE_TOKEN}"},
    "non-ascii bytes": {"Authorization": "Bearer t\xf6k\xe9n-0123456789".encode("latin-1")},
}

ROUTES: list[tuple[str, str]] = [
    ("GET", "/groups/g1/integrations"),
    ("POST", TRIGGER),
    ("POST", f"{TRIGGER}/disconnect"),
    ("GET", f"/groups/g1/integrations/{NAME}/credentials"),
    ("POST", "/groups/g1/integrations/custom/openweathermap"),
    ("GET", "/groups/g1/integrations/nosuch/credentials"),
    ("GET", "/no/such/route"),
    ("POST", "/healthz/extra"),
    ("GET", "/groups/bad%20group/integrations"),
    ("DELETE", "/groups/g1/integrations"),
]


@pytest.mark.parametrize("headers", BAD_AUTHORIZATION.values(), ids=BAD_AUTHORIZATION.keys())
async def test_bad_authorization_gets_the_same_401_on_every_route_and_writes_nothing(
    api: Broker, http: httpx.AsyncClient, headers: dict[str, Any]
) -> None:
    # A stored connection that an unauthenticated disconnect must not remove.
    r = await http.post(TRIGGER, json={"api_key": KEY})
    assert r.status_code == 200

    seen = set()
    async with app_client(api, headers=headers) as anonymous:
        for method, path in ROUTES:
            r = await anonymous.request(method, path, json={"api_key": KEY})
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == 'Bearer realm="broker"'
            assert r.headers["cache-control"] == "no-store"
            assert error_of(r)["code"] == "unauthorized"
            seen.add(r.content)
        health = await anonymous.get("/healthz")
    assert len(seen) == 1, seen
    assert KEY not in seen.pop().decode()
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}

    assert await rows(api) == 1
    r = await http.get(f"/groups/g1/integrations/{NAME}/credentials")
    assert r.json() == {"credentials": {"api_key": KEY}}


async def test_unauthenticated_connect_for_a_new_group_leaves_no_row(api: Broker) -> None:
    async with app_client(api, headers={}) as anonymous:
        r = await anonymous.post("/groups/g2/integrations/custom/hexkey", json={"api_key": KEY})
        assert r.status_code == 401
        r = await anonymous.post(
            "/groups/g2/integrations/custom/openweathermap", json={"api_key": KEY}
        )
        assert r.status_code == 401
    assert await rows(api) == 0


async def test_healthz_needs_no_token(api: Broker) -> None:
    async with app_client(api, headers={}) as anonymous:
        r = await anonymous.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_authorized_unknown_route_and_wrong_method_are_json_errors(
    http: httpx.AsyncClient,
) -> None:
    r = await http.get("/no/such/route")
    assert r.status_code == 404
    assert error_of(r)["code"] == "not_found"
    r = await http.get(TRIGGER)
    assert r.status_code == 405
    assert error_of(r)["code"] == "method_not_allowed"


# --- request bodies ------------------------------------------------------------------------

BAD_BODIES: dict[str, tuple[bytes, str]] = {
    "not json": (b"api_key=0123456789abcdef0123456789abcdef", "invalid_json"),
    "truncated json": (b'{"api_key": "0123456789abcdef', "invalid_json"),
    "not utf-8": (b'{"api_key": "\xff\xfe"}', "invalid_json"),
    "deeply nested": (b"[" * 30000 + b"]" * 30000, "invalid_json"),
    "NaN value": (b'{"api_key": NaN}', "invalid_json"),
    "infinite number": (b'{"api_key": 1e999}', "invalid_json"),
    "lone surrogate": (b'{"api_key": "0123456789abcdef0123456789abcde\\ud800"}', "invalid_json"),
    "empty": (b"", "empty"),
    "whitespace only": (b" \r\n\t ", "empty"),
    "array": (b'[{"api_key": "0123456789abcdef0123456789abcdef"}]', "not_an_object"),
    "string": (b'"0123456789abcdef0123456789abcdef"', "not_an_object"),
    "number": (b"42", "not_an_object"),
    "null": (b"null", "not_an_object"),
}


@pytest.mark.parametrize("integration", [NAME, "openweathermap"])
@pytest.mark.parametrize(
    ("body", "reason"), BAD_BODIES.values(), ids=BAD_BODIES.keys()
)
async def test_body_that_is_not_a_json_object_is_422_and_stores_nothing(
    api: Broker, http: httpx.AsyncClient, integration: str, body: bytes, reason: str
) -> None:
    r = await http.post(
        f"/groups/g1/integrations/custom/{integration}",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    error = error_of(r)
    assert error["code"] == "invalid_input"
    assert error["reason"] == reason
    assert "field" not in error
    assert KEY not in r.text
    assert await rows(api) == 0


BAD_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "api_key is a number": ({"api_key": 1234567890}, "api_key"),
    "api_key is a list": ({"api_key": [KEY]}, "api_key"),
    "api_key is an object": ({"api_key": {"value": KEY}}, "api_key"),
    "api_key is a boolean": ({"api_key": True}, "api_key"),
    "api_key missing": ({"region": "eu"}, "api_key"),
    "empty object": ({}, "api_key"),
    "api_key null": ({"api_key": None}, "api_key"),
    "api_key empty": ({"api_key": ""}, "api_key"),
    "unknown field": ({"api_key": KEY, "apikey": KEY}, "apikey"),
    "api_key pattern mismatch": ({"api_key": "0123456789ABCDEF0123456789ABCDEF"}, "api_key"),
    "api_key one character short": ({"api_key": KEY[:-1]}, "api_key"),
    "api_key too long": ({"api_key": "a" * 5000}, "api_key"),
    "optional field pattern mismatch": ({"api_key": KEY, "region": "Europe"}, "region"),
    "optional field wrong type": ({"api_key": KEY, "region": 7}, "region"),
}


@pytest.mark.parametrize(("body", "field"), BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
async def test_fields_that_do_not_fit_the_provider_spec_are_422_naming_the_field(
    api: Broker, http: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    r = await http.post(TRIGGER, json=body)
    assert r.status_code == 422, r.text
    error = error_of(r)
    assert error["code"] == "invalid_input"
    assert error["field"] == field
    assert field in {e["field"] for e in error["errors"]}
    # Messages never repeat what was submitted.
    submitted = [v for v in body.values() if isinstance(v, str) and v]
    for value in submitted:
        assert value not in r.text
    assert await rows(api) == 0


async def test_every_field_problem_is_listed_with_the_first_in_field(
    api: Broker, http: httpx.AsyncClient
) -> None:
    r = await http.post(TRIGGER, json={"extra": 1, "api_key": 5, "region": "xyz"})
    assert r.status_code == 422
    error = error_of(r)
    assert error["field"] == "extra"
    assert [e["field"] for e in error["errors"]] == ["extra", "api_key", "region"]
    assert await rows(api) == 0


async def test_a_valid_body_with_any_content_type_connects(
    api: Broker, http: httpx.AsyncClient
) -> None:
    """Control for the 422 cases: the same route accepts a well-formed body."""
    r = await http.post(
        TRIGGER,
        content=f'  {{"api_key": " {KEY} ", "region": "eu"}}\n'.encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"integration": NAME, "status": "connected"}
    assert await rows(api) == 1
    r = await http.get(f"/groups/g1/integrations/{NAME}/credentials")
    assert r.json() == {"credentials": {"api_key": KEY, "region": "eu"}}


# --- body size -------------------------------------------------------------------------------


def padded_body(size: int) -> bytes:
    """A valid JSON object of exactly ``size`` bytes."""
    head = f'{{"api_key": "{KEY}"'.encode()
    body = head + b" " * (size - len(head) - 1) + b"}"
    assert len(body) == size
    return body


async def test_body_of_exactly_64_kib_is_accepted(api: Broker, http: httpx.AsyncClient) -> None:
    r = await http.post(TRIGGER, content=padded_body(MAX_BODY_BYTES))
    assert r.status_code == 200, r.text
    assert await rows(api) == 1


@pytest.mark.parametrize("integration", [NAME, "openweathermap"])
@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 10 * MAX_BODY_BYTES])
async def test_body_over_64_kib_with_content_length_is_413(
    api: Broker, http: httpx.AsyncClient, integration: str, size: int
) -> None:
    r = await http.post(
        f"/groups/g1/integrations/custom/{integration}", content=padded_body(size)
    )
    assert r.request.headers["content-length"] == str(size)
    assert r.status_code == 413
    assert error_of(r)["code"] == "payload_too_large"
    assert await rows(api) == 0


@pytest.mark.parametrize("integration", [NAME, "openweathermap"])
async def test_streamed_body_over_64_kib_without_content_length_is_413_while_reading(
    api: Broker, http: httpx.AsyncClient, integration: str
) -> None:
    chunk = 8 * 1024
    total_chunks = 64  # 512 KiB
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield f'{{"api_key": "{KEY}", "pad": "'.encode()
        for _ in range(total_chunks):
            sent += 1
            yield b"x" * chunk
        yield b'"}'

    r = await http.post(f"/groups/g1/integrations/custom/{integration}", content=body())
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413
    assert error_of(r)["code"] == "payload_too_large"
    # The limit is enforced while reading: the rest of the stream is never pulled.
    assert sent <= MAX_BODY_BYTES // chunk + 1 < total_chunks
    assert await rows(api) == 0


# --- unknown integrations and bad group ids ---------------------------------------------------

UNKNOWN_NAMES = ["nosuch", "OpenWeatherMap", "hexkey.yaml", "x" * 200, "hex%20key"]


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
async def test_unknown_integration_is_404_on_every_route_and_stores_nothing(
    api: Broker, http: httpx.AsyncClient, name: str
) -> None:
    for method, path in [
        ("POST", f"/groups/g1/integrations/custom/{name}"),
        ("POST", f"/groups/g1/integrations/custom/{name}/disconnect"),
        ("GET", f"/groups/g1/integrations/{name}/credentials"),
    ]:
        r = await http.request(method, path, json={"api_key": KEY})
        assert r.status_code == 404, (path, r.text)
        error = error_of(r)
        assert error["code"] == "unknown_integration"
        assert len(error["integration"]) <= 64
    assert await rows(api) == 0


BAD_GROUP_IDS = {
    "200 characters": "g" * 200,
    "129 characters": "g" * 129,
    "space": "team%20one",
    "dot dot": "%2E%2E",
    "leading dot": ".hidden",
    "leading dash": "-team",
    "non-ascii": "%C3%A9quipe",
    "semicolon": "team%3Bdrop",
    "quote": "team%22",
    "encoded newline": "team%0A",
}


@pytest.mark.parametrize("group", BAD_GROUP_IDS.values(), ids=BAD_GROUP_IDS.keys())
async def test_group_id_outside_the_documented_pattern_is_422_on_every_route(
    api: Broker, http: httpx.AsyncClient, group: str
) -> None:
    for method, path in [
        ("GET", f"/groups/{group}/integrations"),
        ("POST", f"/groups/{group}/integrations/custom/{NAME}"),
        ("POST", f"/groups/{group}/integrations/custom/openweathermap"),
        ("POST", f"/groups/{group}/integrations/custom/{NAME}/disconnect"),
        ("GET", f"/groups/{group}/integrations/{NAME}/credentials"),
    ]:
        r = await http.request(method, path, json={"api_key": KEY})
        assert r.status_code == 422, (path, r.text)
        error = error_of(r)
        assert error["code"] == "invalid_input"
        assert error["field"] == "group_id"
    assert await rows(api) == 0


async def test_group_id_of_128_characters_is_accepted(
    api: Broker, http: httpx.AsyncClient
) -> None:
    group = "G" + "a1._:@-" * 18 + "z" * 1
    assert len(group) == 128
    r = await http.post(f"/groups/{group}/integrations/custom/{NAME}", json={"api_key": KEY})
    assert r.status_code == 200, r.text
    r = await http.get(f"/groups/{group}/integrations/{NAME}/credentials")
    assert r.json() == {"credentials": {"api_key": KEY}}
    assert GROUP_ID_PATTERN.endswith("{0,127}$")


# --- not connected, disconnect ----------------------------------------------------------------


@pytest.mark.parametrize("integration", [NAME, "openweathermap"])
async def test_credentials_of_an_unconnected_integration_is_404_not_connected(
    http: httpx.AsyncClient, integration: str
) -> None:
    r = await http.get(f"/groups/g1/integrations/{integration}/credentials")
    assert r.status_code == 404
    error = error_of(r)
    assert error["code"] == "integration_not_connected"
    assert error["missing"] == [integration]


@pytest.mark.parametrize("integration", [NAME, "openweathermap"])
async def test_disconnect_is_idempotent(
    api: Broker, http: httpx.AsyncClient, integration: str
) -> None:
    disconnect = f"/groups/g1/integrations/custom/{integration}/disconnect"
    expected = {"integration": integration, "status": "not_connected"}
    r = await http.post(disconnect)
    assert (r.status_code, r.json()) == (200, expected)  # never connected

    r = await http.post(f"/groups/g1/integrations/custom/{integration}", json={"api_key": KEY})
    assert r.status_code == 200
    assert await rows(api) == 1
    for _ in range(2):
        r = await http.post(disconnect)
        assert (r.status_code, r.json()) == (200, expected)
        assert await rows(api) == 0
    r = await http.get(f"/groups/g1/integrations/{integration}/credentials")
    assert error_of(r)["code"] == "integration_not_connected"


# --- the seed plugin reading data["api_key"] ------------------------------------------------


@pytest.mark.parametrize(
    "body", [{}, {"apikey": KEY}, {"API_KEY": KEY}], ids=["empty", "misspelt", "uppercase"]
)
async def test_seed_plugin_with_api_key_missing_is_422_naming_api_key_and_stores_nothing(
    api: Broker, http: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    r = await http.post("/groups/g1/integrations/custom/openweathermap", json=body)
    assert r.status_code == 422, r.text
    error = error_of(r)
    assert error["code"] == "invalid_input"
    assert error["field"] == "api_key"
    assert KEY not in r.text
    assert await rows(api) == 0


# --- a provider with a verify request -----------------------------------------------------

GOOD_KEY = "live-key-0123456789abcdefghij"


class FakeProvider:
    """``GET /v1/me``: 200 for GOOD_KEY in X-Api-Key, 403 for keys starting ``revoked``,
    401 otherwise. ``GET /v1/broken``: always 500."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.app = Starlette(
            routes=[Route("/v1/me", self.me), Route("/v1/broken", self.broken)]
        )

    async def me(self, request: Request) -> Response:
        key = request.headers.get("x-api-key")
        self.seen.append(key)
        if key == GOOD_KEY:
            return JSONResponse({"id": "acct_1"})
        status = 403 if (key or "").startswith("revoked") else 401
        return JSONResponse({"error": f"bad key {key}"}, status_code=status)

    async def broken(self, request: Request) -> Response:
        self.seen.append(request.headers.get("x-api-key"))
        return JSONResponse({"error": "upstream exploded"}, status_code=500)


def verified_providers(base_url: str) -> dict[str, Any]:
    def provider(display: str, path: str) -> dict[str, Any]:
        return {
            "display_name": display,
            "auth_type": "apikey",
            "fields": {"api_key": {"title": "API key"}},
            "apply": {"headers": {"X-Api-Key": "{api_key}"}},
            "verify": {"url": f"{base_url}{path}", "timeout_seconds": 5},
        }

    return {"checked": provider("Checked", "/v1/me"), "flaky": provider("Flaky", "/v1/broken")}


@pytest.fixture
async def provider() -> AsyncIterator[tuple[FakeProvider, str]]:
    fake = FakeProvider()
    async with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
async def verifying(
    store_url: str,
    make_settings: Callable[..., Settings],
    provider: tuple[FakeProvider, str],
) -> AsyncIterator[Broker]:
    settings = make_settings(database_url=store_url, providers=verified_providers(provider[1]))
    async with open_broker(settings) as b:
        yield b


async def test_verify_request_carries_the_key_and_a_key_the_provider_accepts_is_stored(
    verifying: Broker, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    async with app_client(verifying) as http:
        r = await http.post("/groups/g1/integrations/custom/checked", json={"api_key": GOOD_KEY})
        assert r.status_code == 200, r.text
        r = await http.get("/groups/g1/integrations/checked/credentials")
        assert r.json() == {"credentials": {"api_key": GOOD_KEY}}
    assert fake.seen == [GOOD_KEY]
    assert await rows(verifying) == 1


@pytest.mark.parametrize(
    ("bad_key", "provider_status"),
    [("wrong-key-0123456789abcdefghij", 401), ("revoked-key-0123456789abcdefgh", 403)],
)
async def test_key_the_provider_rejects_is_422_credential_rejected_and_not_stored(
    verifying: Broker, provider: tuple[FakeProvider, str], bad_key: str, provider_status: int
) -> None:
    fake, _ = provider
    async with app_client(verifying) as http:
        r = await http.post("/groups/g1/integrations/custom/checked", json={"api_key": bad_key})
        assert r.status_code == 422, r.text
        error = error_of(r)
        assert error["code"] == "credential_rejected"
        assert error["field"] == "api_key"
        assert f"HTTP {provider_status}" in error["message"]
        assert bad_key not in r.text
        assert fake.seen == [bad_key]
        assert await rows(verifying) == 0

        # A rejected replacement leaves the working credential in place.
        r = await http.post("/groups/g1/integrations/custom/checked", json={"api_key": GOOD_KEY})
        assert r.status_code == 200
        r = await http.post("/groups/g1/integrations/custom/checked", json={"api_key": bad_key})
        assert error_of(r)["code"] == "credential_rejected"
        r = await http.get("/groups/g1/integrations/checked/credentials")
        assert r.json() == {"credentials": {"api_key": GOOD_KEY}}
    assert await rows(verifying) == 1


async def test_provider_answering_500_is_502_provider_unreachable_and_not_stored(
    verifying: Broker, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    async with app_client(verifying) as http:
        r = await http.post("/groups/g1/integrations/custom/flaky", json={"api_key": GOOD_KEY})
    assert r.status_code == 502, r.text
    assert error_of(r)["code"] == "provider_unreachable"
    assert GOOD_KEY not in r.text
    assert url not in r.text
    assert fake.seen == [GOOD_KEY]
    assert await rows(verifying) == 0


async def test_provider_down_is_502_provider_unreachable_and_not_stored(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    fake = FakeProvider()
    async with serve(fake.app) as url:
        settings = make_settings(database_url=store_url, providers=verified_providers(url))
    # The server is shut down: its port now refuses connections.
    async with open_broker(settings) as b, app_client(b) as http:
        r = await http.post("/groups/g1/integrations/custom/checked", json={"api_key": GOOD_KEY})
        assert r.status_code == 502, r.text
        error = error_of(r)
        assert error["code"] == "provider_unreachable"
        assert GOOD_KEY not in r.text
        assert url not in r.text
        assert await rows(b) == 0
    assert fake.seen == []


# --- the list route and group isolation --------------------------------------------------------


def listed(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {i["name"]: i for i in response.json()["integrations"]}


async def test_list_shows_connected_then_not_connected_with_the_group_filled_in(
    http: httpx.AsyncClient,
) -> None:
    group = "team.one:eu@acme-1"
    before = listed(await http.get(f"/groups/{group}/integrations"))
    assert set(before) == {NAME, "openweathermap"}
    assert {i["status"] for i in before.values()} == {"not_connected"}
    for name, item in before.items():
        assert item["config"]["trigger"] == f"/groups/{group}/integrations/custom/{name}"
        assert item["config"]["delete"] == (
            f"/groups/{group}/integrations/custom/{name}/disconnect"
        )
        # The trigger URL it gives is the one that works.
        r = await http.post(item["config"]["trigger"], json={"api_key": KEY})
        assert r.status_code == 200, r.text

    connected = listed(await http.get(f"/groups/{group}/integrations"))
    assert {i["status"] for i in connected.values()} == {"connected"}
    assert KEY not in (await http.get(f"/groups/{group}/integrations")).text

    for item in connected.values():
        r = await http.post(item["config"]["delete"])
        assert r.status_code == 200
    after = listed(await http.get(f"/groups/{group}/integrations"))
    assert {i["status"] for i in after.values()} == {"not_connected"}


async def test_one_group_never_sees_another_groups_connection(
    api: Broker, http: httpx.AsyncClient
) -> None:
    r = await http.post("/groups/g1/integrations/custom/hexkey", json={"api_key": KEY})
    assert r.status_code == 200
    r = await http.post("/groups/g1/integrations/custom/openweathermap", json={"api_key": KEY})
    assert r.status_code == 200

    for other in ["g2", "G1", "g1.", "g10"]:
        items = listed(await http.get(f"/groups/{other}/integrations"))
        assert {i["status"] for i in items.values()} == {"not_connected"}, other
        for name in (NAME, "openweathermap"):
            r = await http.get(f"/groups/{other}/integrations/{name}/credentials")
            assert r.status_code == 404
            assert error_of(r)["code"] == "integration_not_connected"
            assert KEY not in r.text

    # Disconnecting in g2 leaves g1's connections alone.
    r = await http.post("/groups/g2/integrations/custom/hexkey/disconnect")
    assert r.status_code == 200
    assert await rows(api) == 2
    items = listed(await http.get("/groups/g1/integrations"))
    assert {i["status"] for i in items.values()} == {"connected"}


@pytest.mark.parametrize(
    "integrations", [None, "openweathermap", [1], {"name": "openweathermap"}, ["nope"]]
)
async def test_a_connect_session_with_a_bad_allow_list_is_422_and_opens_nothing(
    api: Broker, http: httpx.AsyncClient, integrations: Any
) -> None:
    """``integrations`` is a list of names, or absent (every integration): ``null`` is
    neither, as the OpenAPI schema says (schemathesis found ``null`` accepted)."""
    from broker.store.models import ConnectSession

    r = await http.post("/connect-sessions", json={"group_id": "g1", "integrations": integrations})
    assert r.status_code == 422, r.text
    error = error_of(r)
    assert (error["code"], error["field"]) == ("invalid_input", "integrations")
    async with api.session() as db:
        assert (await db.execute(select(func.count()).select_from(ConnectSession))).scalar() == 0
    for ok in ({"group_id": "g1"}, {"group_id": "g1", "integrations": ["openweathermap"]}):
        assert (await http.post("/connect-sessions", json=ok)).status_code == 201


async def test_readyz_says_ready_when_the_database_answers_and_the_schema_is_current(
    api: Broker,
) -> None:
    async with app_client(api, headers={}) as anonymous:
        r = await anonymous.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


async def test_readyz_is_503_with_the_reason_when_the_schema_is_behind(
    api: Broker,
) -> None:
    from sqlalchemy import text

    async with api.database.write() as db:  # as if an older broker had made this database
        await db.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    async with app_client(api, headers={}) as anonymous:
        r = await anonymous.get("/readyz")
        health = await anonymous.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    assert "migration(s) behind" in r.json()["reason"] and "broker db upgrade" in r.json()["reason"]
    assert health.status_code == 200  # liveness is not readiness


async def test_readyz_is_503_when_the_database_does_not_answer(
    make_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    from tests.serve_support import free_port

    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    async with open_broker(settings) as broker:
        # The database goes away under a running broker: point it at a server that is not
        # there (a PostgreSQL port nobody listens on), as a lost database looks.
        from broker.store.database import Database

        real = broker.database
        broker.database = Database(
            f"postgresql+asyncpg://broker:secret-password@127.0.0.1:{free_port()}/nothing")
        try:
            async with app_client(broker, headers={}) as anonymous:
                r = await anonymous.get("/readyz")
        finally:
            await broker.database.dispose()
            broker.database = real
    assert r.status_code == 503 and "does not answer" in r.json()["reason"]
    assert "secret-password" not in r.text and "127.0.0.1" not in r.text
