"""Issue #6, item 1: a matrix over the app's own route table.

The routes come from ``app.routes`` (Mounts included), not from a hand-kept list: a route
added later is in the matrix at once, and the matrix fails, naming it, until ``CALLS`` says
how to call it (or ``PUBLIC`` says it is public). For every route:

- a connect session for group A naming group B gets exactly what it gets for a group that
  does not exist (404 ``not_found`` where a session may use the route at all), and nothing
  of B's is read or changed;
- a caller without a token gets the same 401, whatever the route and whatever the group.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route

from broker.runtime import Broker
from broker.web import app as web_app
from broker.web import create_app
from tests.security import security_support as sec

sec_broker = sec.sec_broker

# Reached without any token (the middleware's own list says the same; checked below).
PUBLIC = {
    "/healthz", "/readyz", "/metrics", "/openapi.json", "/oauth/callback", "/oauth/start",
    "/connect", "/admin", "/admin/enter",
    "/static",
}

AUTHORIZE = "/groups/{group_id}/integrations/{name}/authorize"
PROXY = "/groups/{group_id}/integrations/{name}/proxy/{path:path}"

# How to call each non-public route: (method, path template) -> request keyword arguments.
CALLS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/connect-sessions"): {"json": {"group_id": "gb"}},
    ("GET", "/groups/{group_id}/integrations"): {},
    ("POST", "/groups/{group_id}/integrations/custom/{name}"): {"json": {"api_key": sec.KEY_A}},
    ("POST", "/groups/{group_id}/integrations/custom/{name}/disconnect"): {},
    ("GET", "/groups/{group_id}/integrations/{name}/credentials"): {
        "params": {"force_refresh": "true"}
    },
    ("POST", "/groups/{group_id}/integrations/{name}/authorize"): {
        "json": {"return_to": "/back"}
    },
    # A sign-in opened from a link: refused (a result page) whoever asks.
    ("GET", "/groups/{group_id}/integrations/{name}/authorize"): {
        "params": {"return_to": "/back", "session": "bcs_x"}
    },
    ("GET", "/groups/{group_id}/events"): {},
    ("GET", "/connect-sessions/current"): {},
    **{
        (method, PROXY): {"content": b"{}"} if method in ("POST", "PUT", "PATCH") else {}
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    },
}
# Routes a connect session may use at all (the others answer it 403, for any group).
SESSION_ROUTES = {
    ("GET", "/groups/{group_id}/integrations"),
    ("POST", "/groups/{group_id}/integrations/custom/{name}"),
    ("POST", "/groups/{group_id}/integrations/custom/{name}/disconnect"),
    ("POST", AUTHORIZE),
    ("GET", "/connect-sessions/current"),
}
# Routes that refuse every authenticated caller alike (a result page, 400).
REFUSED = {("GET", AUTHORIZE)}
KNOWN_PARAMS = {"group_id", "name", "path"}

OWN, OTHER, MISSING = "ga", "gb", "gc-does-not-exist"


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str
    params: frozenset[str]


def endpoints(app: Starlette) -> Iterator[Endpoint | Mount]:
    """Every (method, path) the app serves; Mounts as they are."""
    for route in app.routes:
        if isinstance(route, Mount):
            yield route
        elif isinstance(route, Route):
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                yield Endpoint(method, route.path, frozenset(route.param_convertors))
        else:
            raise AssertionError(f"route of unknown kind in the app: {route!r}")


def uncovered(routes: list[BaseRoute]) -> list[str]:
    """The routes the matrix does not know how to call, as ``METHOD /path``."""
    problems = []
    for found in endpoints(Starlette(routes=routes)):
        if isinstance(found, Mount):
            if found.path not in PUBLIC:
                problems.append(f"mount {found.path} (not in PUBLIC)")
        elif found.template in PUBLIC:
            continue
        elif (found.method, found.template) not in CALLS:
            problems.append(f"{found.method} {found.template} (not in CALLS)")
        elif found.params - KNOWN_PARAMS:
            problems.append(
                f"{found.method} {found.template}: unknown path parameters "
                f"{sorted(found.params - KNOWN_PARAMS)}"
            )
    return problems


def matrix(app: Starlette) -> list[Endpoint]:
    problems = uncovered(list(app.routes))
    assert not problems, (
        "the security matrix does not know how to call these routes; add them to CALLS "
        "(or, if they are truly public, to PUBLIC): " + "; ".join(problems)
    )
    return [e for e in endpoints(app) if isinstance(e, Endpoint) and e.template not in PUBLIC]


def fill(template: str, group_id: str, name: str = "hexkey") -> str:
    return (
        template.replace("{group_id}", group_id).replace("{name}", name)
        .replace("{path:path}", "user")
    )


class Reads:
    """Records the groups whose connections the broker reads, decrypts or writes."""

    def __init__(self, broker: Broker, monkeypatch: Any) -> None:
        self.groups: list[tuple[str, str]] = []
        repo = broker.repository
        for name in ("get", "info", "list", "exists", "delete", "put", "claim"):
            monkeypatch.setattr(repo, name, self._wrap(name, getattr(repo, name), 1))
        monkeypatch.setattr(
            broker.keyring, "open", self._wrap("open", broker.keyring.open, 0)
        )

    def _wrap(self, label: str, fn: Any, index: int) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.groups.append((label, str(args[index]) if len(args) > index else "?"))
            return fn(*args, **kwargs)

        return wrapper


async def seed(broker: Broker) -> tuple[str, str]:
    """Groups A and B each with a connection, an event and a flow in progress; a session
    for A (all integrations) and one for B. Returns (session A, session B)."""
    async with sec.app_client(broker) as service:
        for group, key in ((OWN, sec.KEY_A), (OTHER, sec.KEY_B)):
            r = await service.post(f"/groups/{group}/integrations/custom/hexkey", json={
                "api_key": key
            })
            assert r.status_code == 200, r.text
            r = await service.post(f"/groups/{group}/integrations/acme/authorize")
            assert r.status_code == 201, r.text
            r = await service.post(
                "/oauth/start", json={"ticket": r.json()["ticket"]},
                headers={"Origin": sec.BASE_URL},
            )
            assert r.status_code == 200, r.text
        sessions = []
        for group in (OWN, OTHER):
            r = await service.post("/connect-sessions", json={"group_id": group})
            assert r.status_code == 201, r.text
            sessions.append(r.json()["token"])
    return sessions[0], sessions[1]


def same(a: httpx.Response, b: httpx.Response) -> bool:
    return (a.status_code, a.headers.get("content-type"), a.content) == (
        b.status_code, b.headers.get("content-type"), b.content,
    )


# --------------------------------------------------------------------------- the matrix itself


async def test_matrix_covers_every_route_of_the_app_except_the_public_allow_list(
    sec_broker: Broker,
) -> None:
    app = create_app(sec_broker)
    covered = matrix(app)
    assert {(e.method, e.template) for e in covered} == set(CALLS)
    # The allow-list is the middleware's, no more: everything else needs a token.
    assert {*web_app.PUBLIC_PATHS, *(p.rstrip("/") for p in web_app.PUBLIC_PREFIXES)} == PUBLIC


async def test_a_route_added_later_fails_the_matrix_naming_it(sec_broker: Broker) -> None:
    async def handler(request: Any) -> Any:
        raise AssertionError("never called")

    app = create_app(sec_broker)
    added = [
        *app.routes,
        Route("/groups/{group_id}/secrets/{secret_id}", handler, methods=["DELETE"]),
        Route("/operators", handler),
        Mount("/files", app=handler),
    ]
    problems = uncovered(added)
    assert problems == [
        "DELETE /groups/{group_id}/secrets/{secret_id} (not in CALLS)",
        "GET /operators (not in CALLS)",
        "mount /files (not in PUBLIC)",
    ]


# --------------------------------------------------------------------------- other groups


async def test_session_naming_another_group_gets_what_a_missing_group_gets_and_touches_nothing(
    sec_broker: Broker, monkeypatch: Any
) -> None:
    session_a, _ = await seed(sec_broker)
    before = await sec.snapshot(sec_broker)
    reads = Reads(sec_broker, monkeypatch)
    app_routes = matrix(create_app(sec_broker))
    assert any("{group_id}" in e.template for e in app_routes)
    bearer = {"Authorization": f"Bearer {session_a}"}
    async with sec.app_client(sec_broker, headers=bearer) as browser:
        for e in app_routes:
            if "{group_id}" not in e.template:
                continue
            names = sorted(sec_broker.registry.keys()) if "{name}" in e.template else ["-"]
            for name in names:
                kwargs = CALLS[(e.method, e.template)]
                other = await browser.request(e.method, fill(e.template, OTHER, name), **kwargs)
                missing = await browser.request(
                    e.method, fill(e.template, MISSING, name), **kwargs
                )
                where = f"{e.method} {fill(e.template, OTHER, name)}"
                assert same(other, missing), (where, other.text, missing.text)
                if (e.method, e.template) in REFUSED:
                    assert other.status_code == 400, (where, other.text)
                    assert other.headers["content-type"].startswith("text/html"), where
                elif (e.method, e.template) in SESSION_ROUTES:
                    assert other.status_code == 404, (where, other.text)
                    assert other.json()["error"]["code"] == "not_found", where
                else:
                    assert other.status_code == 403, (where, other.text)
                assert sec.KEY_B not in other.text
    assert not [g for g in reads.groups if g[1] == OTHER], reads.groups
    assert await sec.snapshot(sec_broker) == before


async def test_session_still_works_on_its_own_group_through_the_same_matrix(
    sec_broker: Broker, monkeypatch: Any
) -> None:
    # The control for the test above: the very same calls on group A succeed (and the spy
    # sees them read), so the 404s there come from the group check and not from a call the
    # matrix gets wrong or a spy that sees nothing.
    session_a, _ = await seed(sec_broker)
    reads = Reads(sec_broker, monkeypatch)
    bearer = {"Authorization": f"Bearer {session_a}"}
    async with sec.app_client(sec_broker, headers=bearer) as browser:
        for e in matrix(create_app(sec_broker)):
            if (e.method, e.template) not in SESSION_ROUTES:
                continue
            name = "acme" if e.template.endswith("/authorize") else "hexkey"
            r = await browser.request(
                e.method, fill(e.template, OWN, name), **CALLS[(e.method, e.template)]
            )
            assert r.status_code in (200, 201), (e.template, r.text)
    assert {("list", OWN), ("put", OWN), ("delete", OWN)} <= set(reads.groups), reads.groups


# --------------------------------------------------------------------------- no token


async def test_every_non_public_route_without_a_token_gets_the_same_401_and_changes_nothing(
    sec_broker: Broker,
) -> None:
    await seed(sec_broker)
    before = await sec.snapshot(sec_broker)
    json_401: set[bytes] = set()
    page_401: set[bytes] = set()
    variants: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer bcs_not-a-session"},
        {"Authorization": "Bearer not-the-service-token-0123"},
    ]
    async with sec.app_client(sec_broker, headers={}) as anonymous:
        for e in matrix(create_app(sec_broker)):
            for group in (OWN, OTHER, MISSING):
                for headers in variants:
                    name = "acme" if "authorize" in e.template else "hexkey"
                    path = fill(e.template, group, name)
                    r = await anonymous.request(
                        e.method, path, headers=headers, **CALLS[(e.method, e.template)]
                    )
                    where = f"{e.method} {path} {headers}"
                    assert r.status_code == 401, (where, r.text)
                    assert r.headers["cache-control"] == "no-store", where
                    if (e.method, e.template) in REFUSED:
                        # A popup (or a link) opened this: the result page, which tells
                        # the opener.
                        assert r.headers["content-type"].startswith("text/html"), where
                        page_401.add(r.content)
                    else:
                        assert r.headers["www-authenticate"] == 'Bearer realm="broker"', where
                        assert r.json()["error"]["code"] == "unauthorized", where
                        json_401.add(r.content)
    assert len(json_401) == 1, json_401
    assert len(page_401) == 1, page_401
    assert await sec.snapshot(sec_broker) == before


async def test_public_routes_answer_without_a_token(sec_broker: Broker) -> None:
    async with sec.app_client(sec_broker, headers={}) as anonymous:
        for path in sorted(PUBLIC):
            target = "/static/broker.css" if path == "/static" else path
            r = await anonymous.get(target)
            # Only the callback fails here (no state): with its result page, not a 401;
            # /metrics is off unless enabled (a 404), and answers no token-less scraper
            # other than loopback when on (tests/test_metrics.py); /admin answers its own
            # page saying how to get in (tests/test_admin_page.py), not the API's 401.
            expected = {"/oauth/callback": 400, "/metrics": 404, "/admin": 401}.get(path, 200)
            assert r.status_code == expected, (path, r.text)
            assert "unauthorized" not in r.text, path
