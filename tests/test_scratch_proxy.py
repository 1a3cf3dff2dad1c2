from __future__ import annotations
import asyncio
from collections.abc import Callable
from typing import Any
from broker.nodes import ExecutionContext
from tests import oauth_support
from tests.test_refresh import connected

live_factory = oauth_support.live_factory

async def test_smoke(live_factory: Callable[..., Any], authserver: Any) -> None:
    async with live_factory(provider={"api": {"base_url": authserver.base_url + "/api"}}) as live:
        first = await connected(live)
        r = await live.service.get("/groups/g1/integrations/acme/proxy/me")
        print(r.status_code, r.headers, r.text)
        ctx = ExecutionContext.local(live.broker, "g1")
        async with ctx.client("acme") as api:
            r = await api.get("/me")
            print("client", r.status_code, r.text)
        authserver.revoke_access_token(first["access_token"])
        async def call():
            return await live.service.get("/groups/g1/integrations/acme/proxy/me")
        rs = await asyncio.gather(*(call() for _ in range(50)))
        print([x.status_code for x in rs], live.server.token_requests)
        from tests.conftest import SERVICE_TOKEN
        remote = ExecutionContext.remote(live.url, SERVICE_TOKEN, "g1", client=live.service)
        async with remote.client("acme") as api:
            r = await api.get("/me")
            print("remote", r.status_code, r.text)
        r = await live.service.get("/groups/g1/integrations/acme/proxy/../x")
        print(r.status_code, r.text)
        r = await live.service.get("/groups/g1/integrations/acme/proxy/%2e%2e/x")
        print(r.status_code, r.text)
