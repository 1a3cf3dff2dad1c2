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
from base64 import b64encode
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker import cli
from broker.config import ServerSettings, Settings
from broker.oauth.flows import _FLOW_SCOPE, hash_secret
from broker.runtime import Broker
from broker.scheduler import sweep
from broker.store.models import Connection, ConnectSession, OAuthFlow, WebhookDelivery
from broker.web import create_app, server
from broker.webhooks import MAX_ATTEMPTS, deliver_due
from tests import logging_support, oauth_support
from tests.oauth_support import Live, page_data, query_param
from tests.security import security_support as sec
from tests.support import serve

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


# Issue 11, item 2: logging as `broker serve` configures it (broker/logs.py), at info and
# at debug. Here only the libraries the broker quiets are quiet; the tests above raise
# every logger to DEBUG instead.

served_logging = logging_support.served_logging
WEATHER_KEY = "c0ffee00c0ffee00c0ffee00c0ffee00"
HOOK_TOKEN = "hook-query-token-5b8e1d"
HOOK_PASSWORD = "hook-userinfo-password-9c2f"
KEY_C = "d00dd00dd00dd00dd00dd00dd00dd00d"


class Upstream:
    """A provider API and a webhook receiver on 127.0.0.1: the weather lookup accepts any
    key (and notes the query it got), the webhook receiver fails."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.app = Starlette(routes=[
            Route("/data/2.5/weather", self.weather),
            Route("/hook", self.hook, methods=["POST"]),
        ])

    async def weather(self, request: Request) -> Response:
        self.queries.append(request.url.query)
        return JSONResponse({"weather": []})

    async def hook(self, request: Request) -> Response:
        return Response(status_code=500)


def openweathermap(upstream_url: str) -> dict[str, Any]:
    """The shipped openweathermap provider (the key goes in ``?appid=``), its verify request
    sent to ``upstream_url``."""
    return {"verify": {
        "method": "GET", "url": f"{upstream_url}/data/2.5/weather?lat=51.51&lon=-0.13",
        "ok_status": [200],
    }}


def brokers_lines_only(handler: logging.Handler, live: Live) -> None:
    """Drop what the test's own parties log: the authorization server's thread, and the
    test's clients (marked, or httpx naming a URL only they open: see ``broker_logs``)."""
    theirs = (f" {live.url}/", f" {live.server.authorize_endpoint}?")

    def keep(record: logging.LogRecord) -> bool:
        if record.threadName.startswith("authserver:") or _USER_AGENT.get():
            return False
        return not (record.name == "httpx" and any(t in record.getMessage() for t in theirs))

    handler.addFilter(keep)


async def secrets_at_rest(live: Live) -> list[str]:
    """Every ciphertext and hash the database holds now."""
    async with live.broker.session() as db:
        stored = list(await db.scalars(select(Connection.credential)))
        stored += await db.scalars(select(ConnectSession.token_hash))
        for flow in await db.scalars(select(OAuthFlow)):
            stored += [flow.state_hash, flow.sealed]
    return stored


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("level", ["info", "debug"])
async def test_served_logs_hold_no_key_token_ciphertext_or_hash(
    level: str, log_format: str, live_factory: LiveFactory,
    served_logging: Callable[[Settings, str], logging.Handler],
) -> None:
    upstream = Upstream()
    async with serve(upstream.app) as upstream_url, live_factory(
        extra_providers={"openweathermap": openweathermap(upstream_url)}
    ) as live:
        handler = served_logging(
            live.broker.settings.model_copy(update={"log_format": log_format}), level
        )
        brokers_lines_only(handler, live)
        logging.getLogger("broker.test").debug("the capture sees DEBUG records")
        browser, service = clients(live, Seen())
        async with browser, service:
            # The API key: checked by a GET with ?appid=<key> at the provider.
            r = await service.post(
                "/groups/g1/integrations/custom/openweathermap", json={"api_key": WEATHER_KEY}
            )
            assert r.status_code == 200, r.text
            assert upstream.queries == [f"lat=51.51&lon=-0.13&appid={WEATHER_KEY}"]
            secrets = [WEATHER_KEY, SERVICE_TOKEN, live.client_secret]
            secrets.append(b64encode(f"{live.client_id}:{live.client_secret}".encode()).decode())

            # The OAuth2 flow: the code exchange (Basic client authentication).
            session = await live.session_token()
            location = await live.start(browser, session=session)
            secrets += [session, query_param(location, "state"), await verifier_of(live, location)]
            secrets += await secrets_at_rest(live)
            callback = await live.consent(browser, location)
            secrets.append(query_param(callback, "code"))
            page = await browser.get(callback)
            assert page_data(page)["message"]["status"] == "connected", page.text
            secrets += await stored_tokens(live) + await secrets_at_rest(live)

            # Refreshes: on demand, then by the sweep.
            r = await service.get("/groups/g1/integrations/acme/credentials?force_refresh=1")
            assert r.status_code == 200, r.text
            secrets += await stored_tokens(live) + await secrets_at_rest(live)
            async with live.broker.session() as db, db.begin():
                await db.execute(
                    update(Connection)
                    .where(Connection.integration == "acme")
                    .values(next_refresh_at=live.broker.now() - timedelta(seconds=1))
                )
            assert (await sweep(live.broker)).refreshed == 1
            secrets += await stored_tokens(live) + await secrets_at_rest(live)
            assert live.server.token_requests["refresh_token"] == 2

    logs = logging_support.output(handler)
    if log_format == "json":
        # Every line one JSON object; the secrets are looked for in the decoded values too
        # (an escape in the JSON text must not hide one).
        records = [json.loads(line) for line in logs.splitlines()]
        assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r)
                   for r in records)
        logs += "\n" + "\n".join(str(v) for r in records for v in r.values())
        assert any(r.get("event") == "refresh" and r.get("outcome") == "refreshed"
                   and r.get("integration") == "acme" and r.get("group") == "g1"
                   and r.get("duration_ms", -1) >= 0 for r in records)
    assert "broker.access" in logs and "connected acme for group g1" in logs
    assert ("the capture sees DEBUG records" in logs) == (level == "debug")
    secrets = list(dict.fromkeys(secrets))
    assert len(secrets) >= 20
    assert all(len(secret) >= 16 for secret in secrets)
    leaked = [secret for secret in secrets if secret in logs]
    assert not leaked, f"secrets in the {level} log: {leaked}"


async def test_a_webhook_url_is_logged_without_its_query_values_or_userinfo(
    store_url: str, make_settings: Callable[..., Settings],
    served_logging: Callable[[Settings, str], logging.Handler],
) -> None:
    upstream = Upstream()
    async with serve(upstream.app) as upstream_url:
        host = upstream_url.removeprefix("http://")
        hook = f"http://hooks:{HOOK_PASSWORD}@{host}/hook?token={HOOK_TOKEN}&v=1"
        settings = make_settings(
            database_url=store_url,
            webhooks=[{"url": hook, "secret": "whsec-0123456789abcdef"}],
        )
        broker = await Broker.open(settings)
        try:
            handler = served_logging(settings, "debug")
            app = create_app(broker)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://broker.test",
                headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
            ) as client:
                r = await client.post(
                    "/groups/g1/integrations/custom/openweathermap", json={"api_key": KEY_C}
                )
                assert r.status_code == 200, r.text
            async with broker.session() as db, db.begin():  # its last attempt is due
                await db.execute(update(WebhookDelivery).values(attempts=MAX_ATTEMPTS - 1))
            assert await deliver_due(broker) == 0
        finally:
            await broker.close()
    logs = logging_support.output(handler)
    given_up = [line for line in logs.splitlines() if "given up" in line]
    assert len(given_up) == 1, logs
    assert given_up[0].endswith(f"to http://***@{host}/hook?token=***&v=*** given up: HTTP 500")
    for secret in (HOOK_TOKEN, HOOK_PASSWORD, KEY_C):
        assert secret not in logs


async def test_sql_at_debug_prints_no_parameters_even_with_sqlalchemy_turned_up(
    broker: Broker, served_logging: Callable[[Settings, str], logging.Handler],
) -> None:
    marker = "sql-parameter-marker-4d1c9e"
    insert = text(
        "INSERT INTO connect_sessions (token_hash, group_id, created_at, expires_at) "
        "VALUES (:h, 'g1', :t, :t)"
    )
    handler = served_logging(broker.settings, "debug")
    async with broker.session() as db, db.begin():
        await db.execute(insert, {"h": marker, "t": broker.now()})
    assert "INSERT INTO connect_sessions" not in logging_support.output(handler)

    # An operator turns SQLAlchemy's statement log on: statements, never their parameters.
    # (At DEBUG it would print the rows read too: ciphertext. The broker never does.)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    async with broker.session() as db:
        assert await db.scalar(
            select(ConnectSession.group_id).where(ConnectSession.token_hash == marker)
        ) == "g1"
    # A database error's message does not carry them either (the same row again).
    with pytest.raises(IntegrityError) as caught:
        async with broker.session() as db, db.begin():
            await db.execute(insert, {"h": marker, "t": broker.now()})
    logging.getLogger("broker.test").error("the store failed: %s", caught.value)
    logs = logging_support.output(handler)
    assert "FROM connect_sessions" in logs and "the store failed" in logs
    assert marker not in logs and marker not in str(caught.value)
