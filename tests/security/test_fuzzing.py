"""Issue #6, item 8: property-based fuzzing of every input (bounded, so the suite stays fast).

- the OAuth2 callback's query string (with a real flow's state in play, so fuzzed codes,
  ``iss`` and ``error`` values reach the code exchange at the real authorization server);
- every JSON body (the trigger routes, ``/connect-sessions``), as JSON and as raw bytes;
- every path parameter of every route in ``app.routes``, and the events query;
- ``config.yaml`` (``load_settings`` on generated YAML: a ``ConfigError`` or settings,
  never another exception);
- schemathesis over the served ``/openapi.json`` (positive and negative cases).

Never a 5xx, never a stack trace in a response, never a stored row from bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from broker.config import load_settings
from broker.crypto import generate_key
from broker.errors import ConfigError
from broker.runtime import Broker
from broker.web import create_app
from broker.web.openapi import openapi
from tests import oauth_support
from tests.oauth_support import Live, page_data, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory
sec_broker = sec.sec_broker

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                               max_size=4),
    max_leaves=10,
)


def assert_clean(response: httpx.Response, sent: str = "") -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    sec.assert_no_stack_trace(response.text, sent)


# --------------------------------------------------------------------------- the callback

CALLBACK_KEYS = st.sampled_from(
    ["state", "code", "iss", "error", "error_description", "error_uri", "session", "scope"]
) | st.text(max_size=8)
CALLBACK_VALUES = st.sampled_from(["$STATE", "$ISS", "access_denied"]) | st.text(max_size=60)


@FUZZ
@given(
    pairs=st.lists(st.tuples(CALLBACK_KEYS, CALLBACK_VALUES), max_size=6),
    with_state=st.booleans(),
    raw=st.none() | st.text(max_size=80),
)
@example(pairs=[("code", "x")], with_state=True, raw=None)
@example(pairs=[("iss", "$ISS"), ("code", "\udcff")], with_state=True, raw=None)
@example(pairs=[], with_state=False, raw="state=%ff%fe&code=%00&&=&%")
async def test_fuzzed_callback_never_errors_and_never_connects(
    live: Live, browser: httpx.AsyncClient, pairs: list[tuple[str, str]], with_state: bool,
    raw: str | None,
) -> None:
    state = query_param(await live.start(browser), "state")
    if with_state:
        pairs = [("state", "$STATE"), *pairs]

    def fill(value: str) -> str:
        return value.replace("$STATE", state).replace("$ISS", live.server.issuer)

    query = "&".join(
        f"{quote(fill(k).encode('utf-8', 'surrogatepass'), safe='')}="
        f"{quote(fill(v).encode('utf-8', 'surrogatepass'), safe='')}"
        for k, v in pairs
    )
    if raw is not None:  # as typed: only what a URL cannot carry at all is escaped
        raw = quote(raw.encode("utf-8", "surrogatepass"), safe="=&%;+/?:@!$'()*,~")
        query = f"{query}&{raw}" if query else raw
    page = await browser.get(f"{live.url}/oauth/callback?{query}")
    assert_clean(page, query)
    assert page_data(page)["message"]["status"] == "error", page.text
    assert await live.rows() == 0


@pytest.fixture
async def live(live_factory: Callable[..., Any]) -> Any:
    async with live_factory() as live:
        yield live


@pytest.fixture
async def browser(live: Live) -> Any:
    async with live.browser() as browser:
        yield browser


# --------------------------------------------------------------------------- JSON bodies

TRIGGERS = [
    "/groups/g1/integrations/custom/hexkey",
    "/groups/g1/integrations/custom/other",
    "/groups/g1/integrations/custom/acme",
    "/connect-sessions",
]
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["api_key", "group_id", "integrations", "extra"]) | st.text(max_size=8),
        json_values, max_size=4,
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@FUZZ
@given(path=st.sampled_from(TRIGGERS), body=bodies, content_type=st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
))
@example(path=TRIGGERS[0], body=b'{"api_key": NaN}', content_type="application/json")
@example(path=TRIGGERS[3], body=b'{"group_id": "g1", "integrations": [1]}', content_type="")
@example(path=TRIGGERS[0], body=b"[" * 10_000, content_type="application/json")
async def test_fuzzed_json_bodies_never_error_and_store_nothing_unless_accepted(
    sec_broker: Broker, path: str, body: bytes, content_type: str
) -> None:
    before = await sec.snapshot(sec_broker)
    async with sec.app_client(sec_broker) as api:
        r = await api.post(path, content=body, headers={"Content-Type": content_type})
    assert_clean(r, body.decode("utf-8", "replace"))
    after = await sec.snapshot(sec_broker)
    if r.status_code not in (200, 201):
        assert after == before, (r.status_code, r.text)


# --------------------------------------------------------------------------- path parameters

segment = st.text(max_size=40) | st.sampled_from(
    ["g1", "hexkey", "acme", "..", ".", "%00", "a" * 129, "g1\x00", " g1", "G1", "g1/..", "ü"]
)


@FUZZ
@given(group_id=segment, name=segment, limit=st.text(max_size=30) | st.integers().map(str),
       before=st.text(max_size=30) | st.integers().map(str))
@example(group_id="g1", name="hexkey", limit="1", before=str(2**63))
@example(group_id="g1", name="hexkey", limit=str(-(2**70)), before=str(-(2**70)))
@example(group_id="g1", name="hexkey", limit="1", before="١٢")
async def test_fuzzed_path_parameters_never_error_and_store_nothing(
    sec_broker: Broker, group_id: str, name: str, limit: str, before: str
) -> None:
    app = create_app(sec_broker)
    routes = [r for r in app.routes if isinstance(r, Route) and r.param_convertors]
    assert routes
    snapshot = await sec.snapshot(sec_broker)
    async with sec.app_client(sec_broker) as api:
        for route in routes:
            path = route.path.replace("{group_id}", quote(group_id, safe="")).replace(
                "{name}", quote(name, safe="")
            )
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                r = await api.request(
                    method, path, params={"limit": limit, "before": before}, json={}
                )
                assert_clean(r, group_id + name)
    after = await sec.snapshot(sec_broker)
    for table in ("connections", "events", "connect_sessions"):
        assert after[table] == snapshot[table], table


# --------------------------------------------------------------------------- config.yaml

CONFIG_KEYS = [
    "database_url", "encryption_keys", "key_file", "public_url", "auth", "refresh",
    "webhooks", "providers", "catalog_paths", "plugins", "log_level",
]
config_values = st.one_of(
    json_values,
    st.sampled_from(["${MISSING}", "${HOME:-x}", "$${x}", "sqlite+aiosqlite:///x.db",
                     "postgresql+asyncpg://u@h/db", "http://x", generate_key(), "\x00"]),
    st.fixed_dictionaries({}, optional={
        "service_tokens": st.lists(st.text(max_size=20), max_size=2),
        "allowed_origins": st.lists(st.text(max_size=20), max_size=2),
        "connect_session_ttl_seconds": json_scalars,
        "interval_seconds": json_scalars,
        "url": st.text(max_size=20),
        "secret": st.text(max_size=20),
    }),
    st.dictionaries(
        st.sampled_from(["openweathermap", "github", "acme", "x" * 70, "Bad Name"]),
        st.none() | st.fixed_dictionaries({}, optional={
            "auth_type": st.sampled_from(["apikey", "oauth2", "oauth2_cc", "nope"]) | json_values,
            "display_name": json_scalars,
            "fields": json_values,
            "token_url": st.text(max_size=30),
            "authorization_url": st.text(max_size=30),
            "client_id": json_scalars,
            "settings": json_values,
            "verify": json_values,
            "apply": json_values,
            "default_lifetime_seconds": json_scalars,
        }),
        max_size=2,
    ),
)
configs = st.one_of(
    st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=10), config_values,
                    max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(max_size=200),
    st.sampled_from(["a: &a [*a]", "providers: &p {x: *p}", "[" * 1000, "{a: " * 1000,
                     "providers: " + "[" * 450 + "]" * 450,
                     "a: !!python/object:os.system x", "a: b\n\tc", "\ufeffa: 1", "- 1\n- 2"]),
)


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=configs)
@example(text="a: &a [*a]")
@example(text="auth: &a {service_tokens: [*a]}")
@example(text="[" * 5000)
@example(text="auth: " + "{a: " * 400 + "1" + "}" * 400)
def test_fuzzed_config_yaml_gives_settings_or_a_config_error_only(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_settings(path, env={"HOME": "/home/x"})
    except ConfigError as exc:
        assert exc.problems and all(p.startswith(str(path)) for p in exc.problems), exc.problems
        assert "Traceback" not in str(exc)


# --------------------------------------------------------------------------- schemathesis

SCHEMA = schemathesis.openapi.from_dict(openapi(sec.BASE_URL))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
cases = st.one_of(
    *[op.as_strategy(generation_mode=mode) for op in OPERATIONS
      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
)


async def test_served_openapi_is_the_one_schemathesis_runs_against(sec_broker: Broker) -> None:
    async with sec.app_client(sec_broker, headers={}) as anonymous:
        r = await anonymous.get("/openapi.json")
    assert r.status_code == 200
    assert r.json() == openapi(sec.BASE_URL)
    # Every API route of the app is described (the pages and static files are not API).
    described = {p for p in r.json()["paths"]}
    routes = {
        re.sub(r":[a-z]+\}", "}", route.path)  # {path:path} is {path} in OpenAPI
        for route in create_app(sec_broker).routes if isinstance(route, Route)
    }
    assert routes - described == {"/openapi.json", "/connect"}


@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(case=cases)
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    sec_broker: Broker, case: Any
) -> None:
    # Schemathesis makes up the bearer token: a valid-looking one in positive cases (give it
    # the real service token), a missing or malformed one in negative ones (keep that).
    header = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    positive_auth = header is None or header.mode == GenerationMode.POSITIVE
    real = sec.AUTH if positive_auth and "Authorization" in (case.headers or {}) else None
    kwargs = case.as_transport_kwargs(base_url=sec.BASE_URL, headers=real)
    request: dict[str, Any] = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "headers": {k: v for k, v in kwargs.get("headers", {}).items() if k != "Connection"},
        "params": kwargs.get("params"),
    }
    if "json" in kwargs:
        request["json"] = kwargs["json"]
    elif "data" in kwargs:
        request["content"] = kwargs["data"]
    async with sec.app_client(sec_broker, headers={}) as api:
        response = await api.request(**request)
    sec.assert_no_stack_trace(response.text, json.dumps(kwargs, default=str))
    checks: list[Callable[..., Any]] = list(CHECKS)
    if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    case.validate_response(response, checks=checks)
