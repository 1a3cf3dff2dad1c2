"""Issue #6, item 6: no secret in any log line, no token endpoint body in any answer.

Every logger at DEBUG (SQLAlchemy's statements and rows, aiosqlite, httpx and httpcore
traces, the broker's own) through a whole life: connect session, OAuth2 flow, on-demand and
sweep refreshes, an API key, failures. Only what the broker's thread logs counts: the
authorization server logs what it issues in its own thread, and the test's user agents
(marked through a context variable) log the URLs they open.

uvicorn's access log prints query strings (``?session=``, ``?code=``); ``broker serve``
turns it off, and so does this test, the same way (checked against the CLI's source).
"""

from __future__ import annotations

import contextvars
import inspect
import json
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import select, update
from starlette.applications import Starlette

from broker import cli
from broker.config import ServerSettings
from broker.oauth.flows import _FLOW_SCOPE, hash_secret
from broker.scheduler import sweep
from broker.store.models import Connection, OAuthFlow
from broker.web import server
from tests import oauth_support
from tests.oauth_support import Live, page_data, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory

LiveFactory = Callable[..., Any]
MARKER = "Z9MARKER-token-endpoint-body-7f3a"
_USER_AGENT = contextvars.ContextVar("user_agent", default=False)


class UserAgent(httpx.AsyncBaseTransport):
    """Marks what the test's own clients log, to tell it from the broker's logs."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        mark = _USER_AGENT.set(True)
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            _USER_AGENT.reset(mark)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Seen:
    """Every response body the test's clients received."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def hook(self, response: httpx.Response) -> None:
        await response.aread()
        self.bodies.append(f"{response.status_code} {response.headers} {response.text}")


def everything_at_debug(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)
    # What `broker serve` does (uvicorn.Config(access_log=False)): no uvicorn access log.
    assert "build_server(" in inspect.getsource(cli.serve.callback)  # type: ignore[arg-type]
    built = server.build_server(
        Starlette(), ServerSettings(), host="127.0.0.1", port=0, log_level="debug"
    )
    assert built.config.access_log is False
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "propagate", False)
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "handlers", [])
    caplog.handler.addFilter(_mark)


def _mark(record: logging.LogRecord) -> bool:
    record.user_agent = _USER_AGENT.get()
    return True


def broker_logs(caplog: pytest.LogCaptureFixture, live_url: str) -> str:
    here = threading.get_ident()
    lines = []
    for record in caplog.records:
        if record.thread != here or getattr(record, "user_agent", False):
            continue
        if record.name == "httpx" and f" {live_url}/" in record.getMessage():
            # httpx logs "HTTP Request: <url>" after the transport returns (unmarked): the
            # test's clients calling the broker. The broker itself calls only the provider.
            continue
        lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")
    logs = "\n".join(lines)
    assert "broker.access" in logs and "sqlalchemy.engine" in logs and "httpcore" in logs, (
        "the capture is not seeing every logger at DEBUG"
    )
    return logs


def clients(live: Live, seen: Seen) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    hooks = {"response": [seen.hook]}
    browser = httpx.AsyncClient(transport=UserAgent(), event_hooks=hooks, timeout=10)
    service = httpx.AsyncClient(
        base_url=live.url, transport=UserAgent(), event_hooks=hooks, timeout=10,
        headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
    )
    return browser, service


async def verifier_of(live: Live, location: str) -> str:
    state = query_param(location, "state")
    async with live.broker.session() as db:
        sealed = await db.scalar(
            select(OAuthFlow.sealed).where(OAuthFlow.state_hash == hash_secret(state))
        )
    verifier: str = live.broker.keyring.open(_FLOW_SCOPE, hash_secret(state), sealed)["verifier"]
    return verifier


async def stored_tokens(live: Live) -> list[str]:
    async with live.broker.session() as db:
        row = await live.broker.repository.get(db, "g1", "acme")
    assert row is not None
    return [row.data["access_token"], row.data["refresh_token"]]


async def test_debug_logs_of_a_whole_life_hold_no_secret(
    live_factory: LiveFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"hexkey": sec.PROVIDERS["hexkey"]}
    seen = Seen()
    async with live_factory(extra_providers=extra) as live:
        everything_at_debug(caplog, monkeypatch)
        browser, service = clients(live, seen)
        async with browser, service:
            r = await service.post("/connect-sessions", json={"group_id": "g1"})
            session = r.json()["token"]
            secrets = [
                session, SERVICE_TOKEN, live.client_secret, sec.KEY_A,
                live.broker.settings.encryption_keys[0].get_secret_value(),
            ]
            # An API key, through the connect session.
            r = await browser.post(
                f"{live.url}/groups/g1/integrations/custom/hexkey",
                json={"api_key": sec.KEY_A}, headers={"Authorization": f"Bearer {session}"},
            )
            assert r.status_code == 200, r.text
            assert (await service.get("/groups/g1/integrations/hexkey/credentials")).json()

            # The OAuth2 flow.
            location = await live.start(browser, session=session)
            secrets.append(await verifier_of(live, location))
            secrets += [c.value for c in browser.cookies.jar if c.name.startswith("broker_")]
            callback = await live.consent(browser, location)
            secrets.append(query_param(callback, "code"))
            page = await browser.get(callback)
            assert page_data(page)["message"]["status"] == "connected", page.text
            secrets += await stored_tokens(live)

            # Refreshes: on demand, then by the sweep.
            r = await service.get("/groups/g1/integrations/acme/credentials?force_refresh=1")
            assert r.status_code == 200, r.text
            secrets += await stored_tokens(live)
            async with live.broker.session() as db, db.begin():
                await db.execute(
                    update(Connection)
                    .where(Connection.integration == "acme")
                    .values(next_refresh_at=live.broker.now() - timedelta(seconds=1))
                )
            assert (await sweep(live.broker)).refreshed == 1
            secrets += await stored_tokens(live)
            assert (await service.get("/groups/g1/integrations/acme/credentials")).json()
            assert live.server.token_requests["refresh_token"] == 2

    logs = broker_logs(caplog, live.url)
    assert "connected acme for group g1" in logs
    assert "POST /token" in logs or "/token" in logs  # the broker's own token requests
    assert len(set(secrets)) == len(secrets) >= 14
    for secret in secrets:
        assert secret
        assert secret not in logs, "a secret is in the logs"


# (status, body) of a token endpoint that echoes what it was sent, or rambles.
ERROR_BODIES = [
    (400, json.dumps({"error": "invalid_request", "error_description": MARKER, "got": MARKER})),
    (400, json.dumps({"error": MARKER, "error_description": "bad"})),
    (401, json.dumps({"error": "invalid_client", "error_description": MARKER})),
    (500, f"<html><body><pre>Traceback: {MARKER}</pre></body></html>"),
    (200, f"not json at all {MARKER}"),
    (200, json.dumps({"token_type": "bearer", "note": MARKER})),  # no access_token
    (400, json.dumps({"error": "invalid_grant", "error_description": MARKER})),
]


async def test_token_endpoint_error_bodies_reach_no_answer_and_no_log(
    live_factory: LiveFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Seen()
    async with live_factory() as live:
        everything_at_debug(caplog, monkeypatch)
        browser, service = clients(live, seen)
        async with browser, service:
            # The code exchange, answered each way.
            for status, body in ERROR_BODIES:
                location = await live.start(browser)
                callback = await live.consent(browser, location)
                live.server.fail_next(status=status, body=body, grant_type="authorization_code")
                page = await browser.get(callback)
                assert page_data(page)["message"]["status"] == "error", page.text

            # A connection, then its refreshes answered each way.
            page = await browser.get(await live.consent(browser, await live.start(browser)))
            assert page_data(page)["message"]["status"] == "connected", page.text
            for status, body in ERROR_BODIES:
                live.server.fail_next(status=status, body=body, grant_type="refresh_token")
                r = await service.get("/groups/g1/integrations/acme/credentials?force_refresh=1")
                assert r.status_code in (200, 409, 503), r.text
            r = await service.get("/groups/g1/events")
            assert r.status_code == 200
            assert "refresh_failed" in r.text and "reauth_required" in r.text
            r = await service.get("/groups/g1/integrations")
            assert r.status_code == 200
    assert live.server.token_requests["refresh_token"] == len(ERROR_BODIES)
    answers = "\n".join(seen.bodies)
    assert "Acme did not issue a token" in answers  # the answers were seen
    assert MARKER not in answers, "a token endpoint body reached an answer"
    assert MARKER not in broker_logs(caplog, live.url), "a token endpoint body reached a log"
