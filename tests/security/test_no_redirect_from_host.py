"""Issue #11, item 9: no redirect is built from the Host header.

Starlette's router answered ``/path/`` with a 307 to ``/path``, and ``/static`` with a 307
to ``/static/``, on an absolute URL built from the request's Host header: a request with a
forged Host got a redirect to another host (cache poisoning behind a cache that ignores
Host, a phishing hop behind a proxy that passes it). The broker has no route that needs
such a redirect, so there is none: each path of the app's own route table, with and
without a trailing slash, is asked over a real socket with a forged Host, and no answer is
a redirect or names the forged host.
"""

from __future__ import annotations

import re

import httpx
from starlette.routing import Mount, Route

from broker.runtime import Broker
from broker.web import create_app
from tests.security import security_support as sec
from tests.support import serve

sec_broker = sec.sec_broker
FORGED = "evil.example"


def paths_to_try(broker: Broker) -> list[tuple[str, str]]:
    """(method, path) for every route of the app, slashed and unslashed the wrong way."""
    tried: list[tuple[str, str]] = []
    for route in create_app(broker).routes:
        if isinstance(route, Route):
            path = re.sub(r"\{group_id\}", "g1", route.path)
            path = re.sub(r"\{name\}", "hexkey", path)
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    tried.append((method, path + "/"))
        elif isinstance(route, Mount):
            tried += [("GET", route.path), ("GET", route.path + "//broker.css")]
    return tried


async def test_no_route_answers_a_forged_host_with_a_redirect(sec_broker: Broker) -> None:
    tried = paths_to_try(sec_broker)
    assert ("GET", "/groups/g1/integrations/") in tried and ("GET", "/static") in tried
    async with serve(create_app(sec_broker)) as url, httpx.AsyncClient(
        base_url=url, headers={**sec.AUTH, "Host": FORGED}, timeout=10
    ) as client:
        for method, path in tried:
            r = await client.request(method, path)
            assert not r.is_redirect, (method, path, r.status_code, r.headers.get("location"))
            assert "location" not in r.headers, (method, path)
            assert FORGED not in r.text, (method, path)
            assert r.status_code < 500, (method, path, r.status_code)
        # The JSON 404 of any unknown path, not a redirect to the "right" one.
        r = await client.get("/groups/g1/integrations/")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"


async def test_the_paths_without_the_slash_still_answer(sec_broker: Broker) -> None:
    # The control: the routes themselves are untouched.
    async with serve(create_app(sec_broker)) as url, httpx.AsyncClient(
        base_url=url, headers={**sec.AUTH, "Host": FORGED}, timeout=10
    ) as client:
        assert (await client.get("/groups/g1/integrations")).status_code == 200
        assert (await client.get("/static/broker.css")).status_code == 200
