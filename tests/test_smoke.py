from __future__ import annotations

import httpx

from broker.nodes import ExecutionContext
from broker.runtime import Broker

KEY = "0123456789abcdef0123456789abcdef"


async def test_key_goes_in_over_http_and_comes_out_in_process(
    client: httpx.AsyncClient, broker: Broker
) -> None:
    r = await client.post("/groups/g1/integrations/custom/openweathermap", json={"api_key": KEY})
    assert r.status_code == 200, r.text
    assert r.json() == {"integration": "openweathermap", "status": "connected"}
    ctx = ExecutionContext.local(broker, "g1")
    assert await ctx.custom_integration("openweathermap") == {"api_key": KEY}
    r = await client.get("/groups/g1/integrations")
    assert r.json()["integrations"][0]["status"] == "connected"
