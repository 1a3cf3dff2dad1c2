"""Values that cannot go in an HTTP header (issue 11, item 7): a 422 naming the field at
connect, before any request, never a 500 or a misleading 502, and nothing stored.

Non-ASCII used to fail inside httpx (UnicodeEncodeError: a 500 with a traceback); CR/LF
was refused by h11 only once the verify request was being sent (a 502 blaming the
provider). The provider is a real server on 127.0.0.1 that records every connection.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.catalog import ApiKeyProvider, parse_provider
from broker.config import Settings, load_settings
from broker.errors import ConfigError, InvalidInput
from broker.runtime import Broker
from tests import oauth_support
from tests.authserver.server import AuthServer
from tests.security import security_support as sec
from tests.security.listeners import listen

GOOD = "live-key-0123456789abcdefghij"
UNSENDABLE = {
    "non-ascii": "clé-0123456789abcdefghij",
    "emoji": "key-🔑-0123456789abcdefghij",
    "crlf": "key-0123456789\r\nX-Injected: yes",
    "lf": "key-0123456789\nX-Injected: yes",
    "nul": "key-0123456789\x00abcdefghij",
    "del": "key-0123456789\x7fabcdefghij",
}


def provider(verify_url: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "display_name": "Target",
        "auth_type": "apikey",
        "fields": {
            "api_key": {"title": "API key"},
            "note": {"title": "Note", "secret": False, "required": False},
        },
        "apply": {"headers": {"Authorization": "Bearer {api_key}"}},
    }
    if verify_url is not None:
        spec["verify"] = {"url": verify_url, "timeout_seconds": 10}
    return spec


@pytest.mark.parametrize("verified", [True, False], ids=["with-verify", "without-verify"])
@pytest.mark.parametrize("value", list(UNSENDABLE.values()), ids=list(UNSENDABLE))
async def test_a_value_that_cannot_go_in_a_header_is_422_naming_the_field(
    store_url: str, make_settings: Callable[..., Settings], value: str, verified: bool
) -> None:
    async with listen() as server:
        settings = make_settings(
            database_url=store_url,
            providers={"target": provider(f"{server.url}/me" if verified else None)},
        )
        broker = await Broker.open(settings)
        try:
            before = await sec.snapshot(broker)
            async with sec.app_client(broker) as http:
                r = await http.post("/groups/g1/integrations/custom/target", json={
                    "api_key": value
                })
                assert r.status_code == 422, r.text
                error = r.json()["error"]
                assert (error["code"], error["field"]) == ("invalid_input", "api_key")
                assert value not in r.text
                sec.assert_no_stack_trace(r.text)
                assert await sec.snapshot(broker) == before

                # The same value in a field that no header carries is just stored.
                r = await http.post(
                    "/groups/g1/integrations/custom/target", json={"api_key": GOOD, "note": value}
                )
                assert r.status_code == 200, r.text
        finally:
            await broker.close()
        await server.settle()
    assert [q.headers["authorization"] for q in server.requests] == (
        [f"Bearer {GOOD}"] if verified else []
    )


def test_a_stored_value_that_cannot_go_in_a_header_is_refused_when_applied() -> None:
    """Values stored before this check: applying them is a 422 naming the field (never
    the UnicodeEncodeError httpx would raise on sending)."""
    spec = parse_provider({"name": "target", **provider(None)})
    assert isinstance(spec, ApiKeyProvider)
    for value in UNSENDABLE.values():
        with pytest.raises(InvalidInput) as caught:
            spec.apply_to({"api_key": value})
        assert caught.value.field == "api_key"
        assert value not in caught.value.message
    assert spec.apply_to({"api_key": GOOD}) == ({"Authorization": f"Bearer {GOOD}"}, {})


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer {api_key} ✓"}, {"X-Key\r\nX-Other": "{api_key}"}, {"": "x"}],
)
def test_a_header_template_that_cannot_be_sent_is_refused_at_load(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    spec = provider(None)
    spec["apply"] = {"headers": headers}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"providers": {"target": spec}}), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert any("apply.headers" in p for p in caught.value.problems), caught.value.problems


# --- client credentials: the id and secret go in a Basic header (or the body) -----------------

live_factory = oauth_support.live_factory


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize("value", list(UNSENDABLE.values()), ids=list(UNSENDABLE))
async def test_client_credentials_that_cannot_go_in_a_header_never_give_a_5xx(
    live_factory: Callable[..., Any], authserver: AuthServer, auth_method: str, value: str
) -> None:
    """With HTTP Basic the id and secret go in a header (Authlib encodes them as Latin-1:
    an emoji used to fail there, a misleading 502): a 422 naming the field, nothing sent.
    In the body any value can be sent: the authorization server refuses it. Nothing is
    stored either way."""
    m2m = {
        "display_name": "Acme M2M",
        "auth_type": "oauth2_cc",
        "token_url": authserver.token_endpoint,
        "token_endpoint_auth_method": auth_method,
    }
    async with live_factory(extra_providers={"m2m": m2m}) as live:
        for field in ("client_id", "client_secret"):
            body = {"client_id": "m2m-client", "client_secret": GOOD, field: value}
            before = sum(authserver.token_requests.values())
            r = await live.service.post("/groups/g1/integrations/custom/m2m", json=body)
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert value not in r.text
            if auth_method == "client_secret_basic":
                assert (error["code"], error["field"]) == ("invalid_input", field)
                assert sum(authserver.token_requests.values()) == before
            else:
                assert error["code"] == "credential_rejected"
                assert sum(authserver.token_requests.values()) == before + 1
        async with live.broker.session() as db:
            assert await live.broker.repository.get(db, "g1", "m2m") is None
