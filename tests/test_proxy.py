"""Calling a provider's API through the broker: the proxy route and ``ctx.client``.

Against real servers on 127.0.0.1: the test authorization server (tokens, refresh,
revocation) and the test API server (``tests/apiserver``), which checks a bearer token by
asking the authorization server on every request, API keys in a header or the query,
and can answer 429 with Retry-After, redirect, stream large bodies and echo what it got.
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from broker.errors import (
    ApiNotDescribed,
    IntegrationNeedsReauth,
    IntegrationNotConnected,
    InvalidInput,
)
from broker.nodes import ExecutionContext
from tests import logging_support, oauth_support
from tests.apiserver import ApiServer, noise
from tests.conftest import SERVICE_TOKEN
from tests.oauth_support import Live
from tests.test_refresh import connected

live_factory = oauth_support.live_factory
served_logging = logging_support.served_logging
output = logging_support.output

KEY = "key-0123456789abcdef"
PROXY = "/groups/g1/integrations/{name}/proxy/"


def apikey_provider(apiserver: ApiServer, prefix: str, apply: dict[str, Any]) -> dict[str, Any]:
    return {
        "display_name": f"Keyed {prefix}",
        "auth_type": "apikey",
        "fields": {"api_key": {"title": "API key"}},
        "apply": apply,
        "api": {"base_url": f"{apiserver.url}/{prefix}"},
    }


@asynccontextmanager
async def proxied(
    live_factory: Callable[..., Any], apiserver: ApiServer, *,
    api: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
) -> AsyncIterator[Live]:
    """A broker whose ``acme`` (OAuth2) calls ``/bearer`` of the API server, with API-key
    providers ``keyh`` (header) and ``keyq`` (query), all connected for group g1."""
    apiserver.config.api_keys = {KEY}
    async with live_factory(
        provider={"api": {"base_url": f"{apiserver.url}/bearer", **(api or {})}},
        extra_providers={
            "keyh": apikey_provider(
                apiserver, "key-header", {"headers": {"X-Api-Key": "{api_key}"}}
            ),
            "keyq": apikey_provider(apiserver, "key-query", {"query": {"api_key": "{api_key}"}}),
        },
        settings=settings,
    ) as live:
        await connected(live)
        for name in ("keyh", "keyq"):
            r = await live.service.post(
                f"/groups/g1/integrations/custom/{name}", json={"api_key": KEY}
            )
            assert r.status_code == 200, r.text
        apiserver.reset()
        yield live


async def stored_token(live: Live) -> str:
    async with live.broker.session() as db:
        found = await live.broker.repository.get(db, "g1", "acme")
    assert found is not None
    return str(found.data["access_token"])


async def test_the_credential_is_applied_for_each_auth_type(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        ctx = ExecutionContext.local(live.broker, "g1")
        for name, principal in (("acme", "alice"), ("keyh", KEY), ("keyq", KEY)):
            r = await live.service.get(PROXY.format(name=name) + "echo", params={"x": "1"})
            assert r.status_code == 200, r.text
            assert r.json()["principal"] == principal
            assert ["x", "1"] in r.json()["query"]
            async with ctx.client(name) as api:
                r = await api.get("/echo", params={"x": "2"})
            assert r.status_code == 200, r.text
            assert r.json()["principal"] == principal
        # The caller cannot replace the credential's own query parameter.
        r = await live.service.get(PROXY.format(name="keyq") + "echo?api_key=forged&y=2")
        assert r.status_code == 200 and r.json()["principal"] == KEY
        assert ["api_key", "forged"] not in r.json()["query"]
        assert ["y", "2"] in r.json()["query"]


async def test_a_revoked_token_is_refreshed_once_for_50_concurrent_calls(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        before = live.server.token_requests["refresh_token"]
        assert live.server.revoke_access_token(await stored_token(live))
        results = await asyncio.gather(*(
            live.service.get(PROXY.format(name="acme") + "echo") for _ in range(50)
        ))
        assert [r.status_code for r in results] == [200] * 50
        assert {r.json()["principal"] for r in results} == {"alice"}
        assert live.server.token_requests["refresh_token"] == before + 1
        refused = [x for x in apiserver.requests if x.status == 401]
        assert 1 <= len(refused) <= 50  # each call refused at most once, then retried

        # The same through ctx.client, in process.
        assert live.server.revoke_access_token(await stored_token(live))
        ctx = ExecutionContext.local(live.broker, "g1")

        async def call() -> int:
            async with ctx.client("acme") as api:
                return (await api.get("/echo")).status_code

        assert await asyncio.gather(*(call() for _ in range(50))) == [200] * 50
        assert live.server.token_requests["refresh_token"] == before + 2
        r = await live.service.get("/groups/g1/events")
        kinds = [e["kind"] for e in r.json()["events"]]
        assert kinds.count("refreshed") == 2  # recorded as any refresh


async def test_an_api_key_401_goes_back_without_a_refresh(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        apiserver.config.api_keys = {"another-key-entirely"}
        r = await live.service.get(PROXY.format(name="keyh") + "echo")
        assert r.status_code == 401 and "broker-error" not in r.headers
        assert len(apiserver.requests) == 1


async def test_429_is_retried_after_the_wait_and_post_is_not(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        base = PROXY.format(name="keyh")
        r = await live.service.get(base + "flaky/a?fail=2&retry_after=0")
        assert r.status_code == 200 and apiserver.attempts("a") == 3
        r = await live.service.post(base + "flaky/b?fail=1&retry_after=0", content=b"{}")
        assert r.status_code == 429 and apiserver.attempts("b") == 1
        # More retries than allowed: the last answer goes back.
        r = await live.service.get(base + "flaky/c?fail=5&retry_after=0")
        assert r.status_code == 429 and apiserver.attempts("c") == 3
        # Asked to wait longer than max_retry_wait_seconds: back at once.
        r = await live.service.get(base + "flaky/d?fail=1&retry_after=3600")
        assert r.status_code == 429 and r.headers["retry-after"] == "3600"
        assert apiserver.attempts("d") == 1
        # A 503 without a wait header: exponential backoff with jitter, then success.
        r = await live.service.get(base + "flaky/e?fail=1&status=503")
        assert r.status_code == 200 and apiserver.attempts("e") == 2

        ctx = ExecutionContext.local(live.broker, "g1")
        async with ctx.client("keyh") as api:
            r = await api.get("/flaky/f?fail=1&retry_after=0")
            assert r.status_code == 200 and apiserver.attempts("f") == 2
            r = await api.post("/flaky/g?fail=1&retry_after=0", json={})
            assert r.status_code == 429 and apiserver.attempts("g") == 1
        async with ctx.client("keyh", retry_non_idempotent=True) as api:
            r = await api.post("/flaky/h?fail=1&retry_after=0", json={})
            assert r.status_code == 200 and apiserver.attempts("h") == 2


async def raw_request(url: str, target: str, headers: str = "") -> tuple[int, bytes]:
    """``GET target`` written on the socket as given: no client normalises it first."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {SERVICE_TOKEN}\r\n{headers}Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


ESCAPES = [
    "../../../../healthz", "a/../../x", "..%2f..%2fx", "%2e%2e/%2e%2e/x", "%2E%2e/x",
    ".%2e/x", "a%2f..%2f..%2fx", "a%5c..%5cx", "a\\..\\x", "/evil.example/x",
    "//evil.example/x", "http://evil.example/x", "http:%2f%2fevil.example", "a/./b",
    "a%00b", "echo%2fx",
]


@pytest.mark.parametrize("path", ESCAPES)
async def test_every_path_escape_is_refused_and_nothing_is_sent(
    live_factory: Callable[..., Any], apiserver: ApiServer, path: str
) -> None:
    async with proxied(live_factory, apiserver) as live:
        status, body = await raw_request(live.url, PROXY.format(name="keyh") + path)
        assert status in (404, 422), (status, body)
        if status == 422:
            assert json.loads(body)["error"]["field"] == "path"
        assert apiserver.requests == []


async def test_ctx_client_refuses_paths_and_hosts_outside_the_api(
    live_factory: Callable[..., Any], apiserver: ApiServer, authserver: Any
) -> None:
    async with proxied(live_factory, apiserver) as live:
        ctx = ExecutionContext.local(live.broker, "g1")
        async with ctx.client("acme") as api:
            for url in ("/a/%2e%2e/%2e%2e/open/echo", "/a%2fb", f"{authserver.base_url}/api/me",
                        f"{apiserver.url}/open/echo", "http://evil.example/echo"):
                with pytest.raises(InvalidInput):
                    await api.get(url)
        assert apiserver.requests == []
        assert not live.server.requests_seen("api")


async def test_redirects_are_not_followed(
    live_factory: Callable[..., Any], apiserver: ApiServer, apiserver_factory: Any
) -> None:
    elsewhere = apiserver_factory()
    async with proxied(live_factory, apiserver) as live:
        target = f"{elsewhere.url}/open/echo"
        r = await live.service.get(
            PROXY.format(name="acme") + "redirect", params={"to": target}
        )
        assert r.status_code == 302 and r.headers["location"] == target
        ctx = ExecutionContext.local(live.broker, "g1")
        async with ctx.client("keyq") as api:
            r = await api.get("/redirect", params={"to": target}, follow_redirects=True)
        assert r.status_code == 302
        assert elsewhere.requests == []


async def test_the_callers_token_and_cookies_are_not_forwarded(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        token = await stored_token(live)
        r = await live.service.post(
            PROXY.format(name="acme") + "echo",
            content=b'{"a": 1}',
            headers={
                "Cookie": "host_session=abc", "Content-Type": "application/json",
                "X-Custom": "kept", "Connection": "X-Hop", "X-Hop": "dropped",
                "Proxy-Authorization": "Basic eDp5", "Broker-Debug": "1",
            },
        )
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert seen["authorization"] == f"Bearer {token}"
        assert SERVICE_TOKEN not in json.dumps(seen)
        for name in ("cookie", "x-hop", "proxy-authorization", "broker-debug"):
            assert name not in seen
        assert seen["x-custom"] == "kept"
        assert seen["content-type"] == "application/json"
        assert "user-agent" in seen
        assert r.json()["body_len"] == 8


async def test_a_header_echoing_the_credential_is_not_passed_back(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        r = await live.service.get(
            PROXY.format(name="keyh") + "set-cookie", params={"name": "k", "value": KEY}
        )
        assert r.status_code == 200
        assert KEY not in json.dumps(dict(r.headers)) and KEY not in r.text
        r = await live.service.get(
            PROXY.format(name="keyh") + "set-cookie", params={"name": "k", "value": "plain"}
        )
        assert "k=plain" in r.headers["set-cookie"]


async def test_the_brokers_own_errors(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(
        live_factory, apiserver, api={"timeout_seconds": 0.5},
        settings={"proxy": {"max_request_bytes": 1000, "buffer_bytes": 100}},
    ) as live:
        def error(r: httpx.Response, status: int, code: str) -> None:
            assert r.status_code == status, r.text
            assert r.headers["broker-error"] == code
            assert r.json()["error"]["code"] == code

        error(await live.service.get("/groups/g2/integrations/acme/proxy/echo"), 404,
              "integration_not_connected")
        error(await live.service.get(PROXY.format(name="acme") + "slow?seconds=3"), 504,
              "provider_timeout")
        error(await live.service.post(PROXY.format(name="keyh") + "upload",
                                      content=b"x" * 5000), 413, "payload_too_large")

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(50):
                yield b"y" * 100

        error(await live.service.post(PROXY.format(name="keyh") + "upload", content=chunks()),
              413, "payload_too_large")
        # Under the cap but past the buffer: streamed, and it arrives whole.
        r = await live.service.post(PROXY.format(name="keyh") + "upload", content=b"z" * 900)
        assert r.status_code == 200 and r.json()["size"] == 900

        session = await live.session_token("g1")
        r = await live.service.get(
            PROXY.format(name="acme") + "echo", headers={"Authorization": f"Bearer {session}"}
        )
        assert r.status_code == 403

        live.server.revoke_user_grants("alice")
        error(await live.service.get(PROXY.format(name="acme") + "echo"), 409,
              "integration_needs_reauth")
        remote = ExecutionContext.remote(live.url, SERVICE_TOKEN, "g1", client=live.service)
        async with remote.client("acme") as api:
            with pytest.raises(IntegrationNeedsReauth):
                await api.get("/echo")
        async with ExecutionContext.remote(
            live.url, SERVICE_TOKEN, "g2", client=live.service
        ).client("acme") as api:
            with pytest.raises(IntegrationNotConnected):
                await api.get("/echo")


async def test_an_unreachable_api_is_a_502(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        apiserver.stop()
        r = await live.service.get(PROXY.format(name="keyh") + "echo")
        assert r.status_code == 502
        assert r.headers["broker-error"] == "provider_unreachable"


async def test_a_provider_without_an_api_section(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with live_factory() as live:
        await connected(live)
        r = await live.service.get(PROXY.format(name="acme") + "echo")
        assert r.status_code == 404 and r.headers["broker-error"] == "api_not_described"
        with pytest.raises(ApiNotDescribed):
            ExecutionContext.local(live.broker, "g1").client("acme")


async def test_a_remote_node_calls_through_the_proxy_and_never_holds_the_token(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with proxied(live_factory, apiserver) as live:
        token = await stored_token(live)
        sent: list[httpx.Request] = []
        received: list[bytes] = []

        async def record(request: httpx.Request) -> None:
            sent.append(request)

        async def read(response: httpx.Response) -> None:
            await response.aread()
            received.append(response.content)

        async with httpx.AsyncClient(
            event_hooks={"request": [record], "response": [read]}
        ) as http:
            ctx = ExecutionContext.remote(live.url, SERVICE_TOKEN, "g1", client=http)
            async with ctx.client("acme") as api:
                api.event_hooks["request"].append(record)
                api.event_hooks["response"].append(read)
                r = await api.get("/status/200", params={"q": "1"})
        # (not /echo: the API server would echo the token in its answer's body)
        assert r.status_code == 200 and apiserver.requests[-1].principal == "alice"
        assert all(req.url.host == httpx.URL(live.url).host for req in sent)
        assert all(token not in str(req.headers) for req in sent)
        assert all(token.encode() not in body for body in received)
        assert apiserver.requests[-1].headers["authorization"] == f"Bearer {token}"


async def test_no_secret_and_no_body_reaches_the_log_and_the_access_line_says_what_happened(
    live_factory: Callable[..., Any], apiserver: ApiServer,
    served_logging: Callable[..., logging.Handler],
) -> None:
    async with proxied(live_factory, apiserver) as live:
        handler = served_logging(live.broker.settings, "debug")
        token = await stored_token(live)
        assert live.server.revoke_access_token(token)
        r = await live.service.post(
            PROXY.format(name="acme") + "echo?note=query-value-123",
            content=b"body-value-456", headers={"X-Note": "header-value-789"},
        )
        assert r.status_code == 200
        new_token = await stored_token(live)
        r = await live.service.get(PROXY.format(name="keyq") + "flaky/z?fail=1&retry_after=0")
        assert r.status_code == 200
        text = output(handler)
        for secret in (token, new_token, KEY, SERVICE_TOKEN, live.client_secret,
                       "query-value-123", "body-value-456", "header-value-789"):
            assert secret not in text
        assert "/proxy/echo\" 200" in text
        assert "integration=acme upstream=200 refreshes=1" in text
        assert "integration=keyq upstream=200 refreshes=0" in text


async def test_client_credentials_tokens_and_other_methods(
    live_factory: Callable[..., Any], apiserver: ApiServer, authserver: Any
) -> None:
    apiserver.config.api_keys = {KEY}
    m2m = {
        "display_name": "Acme M2M", "auth_type": "oauth2_cc",
        "token_url": authserver.token_endpoint, "default_scopes": ["read"],
        "api": {"base_url": f"{apiserver.url}/bearer"},
    }
    async with live_factory(extra_providers={"m2m": m2m}) as live:
        client = authserver.register_client(
            grant_types=["client_credentials"], token_endpoint_auth_method="client_secret_basic"
        )
        r = await live.service.post("/groups/g1/integrations/custom/m2m", json={
            "client_id": client.client_id, "client_secret": client.client_secret,
        })
        assert r.status_code == 200, r.text
        base = PROXY.format(name="m2m")
        r = await live.service.get(base + "echo")
        assert r.status_code == 200 and r.json()["principal"] == client.client_id
        r = await live.service.head(base + "bytes/1000")
        assert r.status_code == 200 and r.headers["content-length"] == "1000"
        assert r.content == b""
        for method in ("OPTIONS", "PUT", "PATCH", "DELETE"):
            r = await live.service.request(method, base + "echo", content=b"abc")
            assert r.status_code == 200 and r.json()["method"] == method
        async with ExecutionContext.local(live.broker, "g1").client("m2m") as api:
            r = await api.delete("/echo")
        assert r.json()["principal"] == client.client_id


@pytest.mark.parametrize("size", [1000, 200_000])  # answered whole / streamed
async def test_a_compressed_answer_passes_through_as_it_came(
    live_factory: Callable[..., Any], apiserver: ApiServer, size: int
) -> None:
    async with proxied(live_factory, apiserver) as live:
        r = await live.service.get(PROXY.format(name="keyh") + f"gzip/{size}")
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"
        assert r.content == noise(size)  # httpx decodes what the provider encoded
        ctx = ExecutionContext.local(live.broker, "g1")
        async with ctx.client("keyh") as api:
            r = await api.get(f"/gzip/{size}")
        assert r.content == noise(size)
