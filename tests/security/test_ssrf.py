"""SSRF through provider URLs (issue 11, item 3): a value a user gives never chooses where
the broker sends a credential, and a verify answer is never read into memory.

The attacks run against real servers on 127.0.0.1 (``listeners.listen``: raw sockets that
record every connection). The broker runs in process on SQLite and PostgreSQL; bad values
go through the real trigger route. Load-time refusals go through the real config loader.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.catalog import OAuth2Provider, parse_provider
from broker.config import Settings, load_settings
from broker.errors import ConfigError, InvalidInput, TokenEndpointError
from broker.oauth import client
from broker.oauth.decisions import Outcome
from broker.runtime import Broker
from tests.security import security_support as sec
from tests.security.listeners import Answer, Listener, Received, listen

KEY = "live-key-0123456789abcdefghij"


def apikey_provider(verify_url: str, **fields: dict[str, Any]) -> dict[str, Any]:
    """An apikey provider whose key goes in X-Api-Key, checked at ``verify_url``."""
    return {
        "display_name": "Target",
        "auth_type": "apikey",
        "fields": {"api_key": {"title": "API key"}, **fields},
        "apply": {"headers": {"X-Api-Key": "{api_key}"}},
        "verify": {"url": verify_url, "timeout_seconds": 10},
    }


@asynccontextmanager
async def broker_with(
    make_settings: Callable[..., Settings], store_url: str, provider: dict[str, Any]
) -> AsyncIterator[Broker]:
    broker = await Broker.open(
        make_settings(database_url=store_url, providers={"target": provider})
    )
    try:
        yield broker
    finally:
        await broker.close()


async def connect(broker: Broker, body: dict[str, str]) -> Any:
    async with sec.app_client(broker) as http:
        return await http.post("/groups/g1/integrations/custom/target", json=body)


async def connections(broker: Broker) -> int:
    return len((await sec.snapshot(broker))["connections"])


def load_error(tmp_path: Path, provider: dict[str, Any]) -> str:
    """The config loader's complaint about ``provider`` (fails the test if it loads)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"providers": {"target": provider}}), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    lines = [p for p in caught.value.problems if "providers.target" in p]
    assert lines, caught.value.problems
    return lines[0]


# --- a user's value steering the verify request ------------------------------------------------


async def test_a_value_cannot_steer_verify_to_another_host_and_port(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """``http://{account}.example.test/me`` with a careless pattern (``:``, ``/``, ``#``
    but no dot): the raw value ``localhost:<port>/steal#`` used to send the key to
    127.0.0.1:<port>/steal."""
    async with listen() as elsewhere:
        provider = apikey_provider(
            "http://{account}.example.test/me",
            account={"title": "Account", "secret": False, "pattern": "^[a-z0-9:/#-]+$"},
        )
        async with broker_with(make_settings, store_url, provider) as broker:
            value = f"localhost:{elsewhere.port}/steal#"
            r = await connect(broker, {"api_key": KEY, "account": value})
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert (error["code"], error["field"]) == ("invalid_input", "account")
            assert KEY not in r.text and value not in r.text
            assert await connections(broker) == 0
        await elsewhere.settle()
    assert elsewhere.connections == 0


async def test_a_value_cannot_climb_the_verify_path(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """``/v1/{account}/me``: ``..`` used to turn the request into ``GET /me``; a value with
    slashes stays one segment under ``/v1/``."""
    async with listen() as provider_server:
        provider = apikey_provider(
            f"{provider_server.url}/v1/{{account}}/me",
            account={"title": "Account", "secret": False, "pattern": r"^[a-z0-9./-]+$"},
        )
        async with broker_with(make_settings, store_url, provider) as broker:
            for value in ("..", "."):
                r = await connect(broker, {"api_key": KEY, "account": value})
                assert r.status_code == 422, r.text
                assert r.json()["error"]["field"] == "account"
            await provider_server.settle()
            assert provider_server.connections == 0
            assert await connections(broker) == 0

            r = await connect(broker, {"api_key": KEY, "account": "../../steal"})
            assert r.status_code == 200, r.text
    assert [q.target for q in provider_server.requests] == ["/v1/..%2F..%2Fsteal/me"]


async def test_a_url_field_without_a_pattern_is_refused_at_load(tmp_path: Path) -> None:
    line = load_error(
        tmp_path,
        apikey_provider(
            "https://api.example.com/accounts/{account}/me",
            account={"title": "Account", "secret": False},
        ),
    )
    assert "no pattern" in line


# --- templates that let a value form the host ----------------------------------------------------

LABEL = {"title": "Value", "secret": False, "pattern": "^[a-z0-9-]{1,63}$"}

HOST_FORMING = [
    "http://{value}/me",
    "http://{value}:8080/me",
    "https://api.{value}.com/me",
    "https://{value}zendesk.com/me",
    "http://127.0.0.{value}/me",
    "https://example.com{value}/me",
]
NEVER_TEMPLATED = [
    "https://example.com:{value}/me",
    "https://{value}@example.com/me",
    "{value}://example.com/me",
]


@pytest.mark.parametrize("url", HOST_FORMING + NEVER_TEMPLATED)
def test_a_verify_url_that_lets_a_value_form_the_host_is_refused_at_load(
    tmp_path: Path, url: str
) -> None:
    load_error(tmp_path, apikey_provider(url, value=LABEL))


@pytest.mark.parametrize("url", HOST_FORMING + NEVER_TEMPLATED)
def test_an_oauth2_url_that_lets_a_setting_form_the_host_is_refused_at_load(
    tmp_path: Path, url: str
) -> None:
    provider = {
        "display_name": "Target",
        "auth_type": "oauth2",
        "client_id": "id",
        "client_secret": "secret",
        "authorization_url": "https://example.com/authorize",
        "token_url": url,
        "settings": {"value": LABEL},
    }
    load_error(tmp_path, provider)


def test_a_client_credentials_token_url_takes_no_placeholder(tmp_path: Path) -> None:
    provider = {
        "display_name": "Target",
        "auth_type": "oauth2_cc",
        "token_url": "https://{client_id}.example.com/token",
    }
    assert "not fields" in load_error(tmp_path, provider)


@pytest.mark.parametrize(
    "url", ["https://{value}.zendesk.com/api/v2/users/me.json", "https://api.{value}.example.com/"]
)
def test_a_dotted_pattern_on_a_host_label_is_refused_at_load(tmp_path: Path, url: str) -> None:
    dotted = {"title": "Value", "secret": False, "pattern": "^[a-z.]+$"}
    line = load_error(tmp_path, apikey_provider(url, value=dotted))
    assert "admits a dot" in line
    # The same template with a single-label pattern is fine, and so is the dotted one
    # when the provider lists where its hosts may be.
    assert parse_provider({"name": "t", **apikey_provider(url, value=LABEL)})
    allowed = {"allowed_hosts": ["*.zendesk.com", "*.example.com"]}
    assert parse_provider({"name": "t", **apikey_provider(url, value=dotted), **allowed})


async def test_allowed_hosts_admit_a_host_forming_template_and_refuse_other_hosts(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """``http://{host}:<port>/me`` loads with ``allowed_hosts: [127.0.0.1]``; ``localhost``
    (which would reach the same server) is refused at render time, before any request."""
    async with listen() as server:
        provider = apikey_provider(
            f"http://{{host}}:{server.port}/me",
            host={"title": "Host", "secret": False, "pattern": "^[a-z0-9.]+$"},
        )
        provider["allowed_hosts"] = ["127.0.0.1"]
        async with broker_with(make_settings, store_url, provider) as broker:
            r = await connect(broker, {"api_key": KEY, "host": "localhost"})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == "host"
            await server.settle()
            assert server.connections == 0
            assert await connections(broker) == 0

            r = await connect(broker, {"api_key": KEY, "host": "127.0.0.1"})
            assert r.status_code == 200, r.text
            assert await connections(broker) == 1
    assert [q.headers["x-api-key"] for q in server.requests] == [KEY]


def token_answer(request: Received) -> Answer:
    body = json.dumps({"access_token": "at", "token_type": "Bearer", "expires_in": 3600})
    return Answer(200, {"Content-Type": "application/json"}, [body.encode()])


@pytest.fixture
async def token_server() -> AsyncIterator[Listener]:
    async with listen(token_answer) as server:
        yield server


def host_templated_oauth2(server: Listener) -> OAuth2Provider:
    spec = parse_provider(
        {
            "name": "target",
            "display_name": "Target",
            "auth_type": "oauth2",
            "client_id": "id",
            "client_secret": "secret",
            "authorization_url": f"http://{{host}}:{server.port}/authorize",
            "token_url": f"http://{{host}}:{server.port}/token",
            "settings": {"host": {"title": "Host", "secret": False, "pattern": "^[a-z0-9.]+$"}},
            "allowed_hosts": ["127.0.0.1"],
        }
    )
    assert isinstance(spec, OAuth2Provider)
    return spec


async def test_refresh_and_code_exchange_check_the_token_url_host_every_time(
    token_server: Listener,
) -> None:
    """A connection's stored setting that renders outside ``allowed_hosts`` (the operator
    narrowed them since) sends nothing: the refresh token and the client secret stay."""
    spec = host_templated_oauth2(token_server)
    stray = {"host": "localhost"}
    with pytest.raises(TokenEndpointError) as caught:
        await client.refresh(spec, refresh_token="rt-secret", settings=stray)
    assert caught.value.outcome == Outcome.operator
    with pytest.raises(TokenEndpointError):
        await client.exchange_code(
            spec, code="c", code_verifier=None, redirect_uri="http://b/cb", settings=stray
        )
    await token_server.settle()
    assert token_server.connections == 0

    good = {"host": "127.0.0.1"}
    assert (await client.refresh(spec, refresh_token="rt", settings=good))["access_token"]
    assert [q.target for q in token_server.requests] == ["/token"]


def test_the_authorization_url_host_is_checked_too(token_server: Listener) -> None:
    spec = host_templated_oauth2(token_server)
    with pytest.raises(InvalidInput) as caught:
        spec.render_url(spec.authorization_url, {"host": "localhost"})
    assert caught.value.field == "host"
    assert spec.render_url(spec.authorization_url, {"host": "127.0.0.1"}).startswith(
        "http://127.0.0.1:"
    )


# --- the verify answer ---------------------------------------------------------------------------

HUGE = 64 * 1024 * 1024
CHUNK = 64 * 1024


def huge_answer(request: Received) -> Answer:
    def chunks() -> Iterator[bytes]:
        for _ in range(HUGE // CHUNK):
            yield b"x" * CHUNK

    return Answer(200, {"Content-Length": str(HUGE)}, chunks())


async def test_a_huge_verify_answer_is_not_read(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """The provider answers 200 with a 64 MiB body: the status is all the broker needs; it
    closes the connection, so the server gets to send only what the sockets' buffers hold
    (it used to send, and the broker to hold in memory, all 64 MiB)."""
    async with listen(huge_answer, send_buffer=64 * 1024) as server:
        async with broker_with(
            make_settings, store_url, apikey_provider(f"{server.url}/me")
        ) as broker:
            r = await connect(broker, {"api_key": KEY})
            assert r.status_code == 200, r.text
        await server.settle()
    assert server.connections == 1
    assert server.body_bytes_sent < 4 * 1024 * 1024, server.body_bytes_sent


async def test_a_verify_redirect_is_not_followed(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    async with listen() as elsewhere:

        def redirect(request: Received) -> Answer:
            return Answer(302, {"Location": f"{elsewhere.url}/steal", "Content-Length": "0"})

        async with listen(redirect) as server, broker_with(
            make_settings, store_url, apikey_provider(f"{server.url}/me")
        ) as broker:
            r = await connect(broker, {"api_key": KEY})
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "provider_unreachable"
            assert server.url not in r.text and elsewhere.url not in r.text
            assert await connections(broker) == 0
        await elsewhere.settle()
    assert elsewhere.connections == 0


async def test_a_verify_answer_dripped_a_byte_at_a_time_is_cut_off_at_the_timeout(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """httpx's timeout is per read: a status line and headers sent a byte every 50 ms would
    have held the connect open for as long as the server liked (here about 20 s). The whole
    verify request gets ``timeout_seconds`` (1 s)."""
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 400 + b"\r\nContent-Length: 0\r\n\r\n"
    sent = 0
    finished = asyncio.Event()

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            await reader.readuntil(b"\r\n\r\n")
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            finished.set()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        provider = apikey_provider(f"http://127.0.0.1:{port}/me")
        provider["verify"]["timeout_seconds"] = 1
        async with broker_with(make_settings, store_url, provider) as broker:
            r = await connect(broker, {"api_key": KEY})
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "provider_unreachable"
            assert await connections(broker) == 0
        await asyncio.wait_for(finished.wait(), 10)  # the server saw the client go
    finally:
        server.close()
        await server.wait_closed()
    assert 0 < sent < len(head) // 2, sent
