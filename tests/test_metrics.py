"""``GET /metrics`` after real work: a sign-in, refreshes that succeed and fail at the real
authorization server, proxied calls to the real API server. The exposition is parsed with
prometheus_client's own parser and the values are asserted; who may scrape is tested too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests import oauth_support
from tests.apiserver import ApiServer
from tests.oauth_support import Live
from tests.test_refresh import connected

live_factory = oauth_support.live_factory

TOKEN = "metrics-token-0123456789"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(live: Live, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=live.url, headers=headers) as http:
        return await http.get("/metrics")


async def test_metrics_count_what_happened(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    async with live_factory(
        provider={"api": {"base_url": f"{apiserver.url}/bearer"}},
        settings={"metrics": {"enabled": True, "token": TOKEN}},
    ) as live:
        await connected(live)
        for _ in range(3):
            r = await live.service.get("/groups/g1/integrations/acme/proxy/echo")
            assert r.status_code == 200
        r = await live.service.get("/groups/g1/integrations/acme/proxy/status/404")
        assert r.status_code == 404
        r = await live.service.get("/groups/g1/integrations/nope/proxy/x")
        assert r.status_code == 404
        await live.broker.credentials("g1", "acme", force_refresh=True)
        live.server.fail_next(1, status=503, grant_type="refresh_token")
        # The provider fails: the still-valid token is handed out, the failure counted.
        await live.broker.credentials("g1", "acme", force_refresh=True)

        r = await scrape(live)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = samples(r.text)
        assert got[("broker_refreshes_total",
                    (("integration", "acme"), ("outcome", "refreshed")))] == 1
        assert got[("broker_refreshes_total",
                    (("integration", "acme"), ("outcome", "transient")))] == 1
        assert got[("broker_refresh_duration_seconds_count", (("integration", "acme"),))] == 2
        assert got[("broker_proxy_requests_total",
                    (("integration", "acme"), ("status", "200")))] == 3
        assert got[("broker_proxy_requests_total",
                    (("integration", "acme"), ("status", "404")))] == 1
        # An integration name that is not one is never a label.
        assert got[("broker_proxy_requests_total",
                    (("integration", "-"), ("status", "unknown_integration")))] == 1
        assert not [k for k in got if ("integration", "nope") in k[1]]
        assert got[("broker_connections",
                    (("integration", "acme"), ("status", "connected")))] == 1
        assert got[("broker_connections_overdue", ())] == 0
        assert got[("broker_credential_reads_total", (("source", "store"),))] >= 1
        # No group id or token anywhere in the exposition.
        row = await live.broker.credentials("g1", "acme")
        assert "g1" not in r.text and row["access_token"] not in r.text


async def test_who_may_scrape(live_factory: Callable[..., Any]) -> None:
    async with live_factory(settings={"metrics": {"enabled": True, "token": TOKEN}}) as live:
        assert (await scrape(live, token=None)).status_code == 403
        assert (await scrape(live, token="wrong-token-0123456789")).status_code == 403
        # The service token is not a metrics token.
        r = await scrape(live, token=oauth_support.SERVICE_TOKEN)
        assert r.status_code == 403
    async with live_factory(settings={"metrics": {"enabled": True}}) as live:
        assert (await scrape(live, token=None)).status_code == 200  # loopback is allowed
    async with live_factory(
        settings={"metrics": {"enabled": True, "allow": ["10.0.0.0/8"]}}
    ) as live:
        assert (await scrape(live, token=None)).status_code == 403
    async with live_factory() as live:  # off by default
        assert (await scrape(live, token=None)).status_code == 404


async def test_the_connections_gauge_counts_the_status_people_see(broker: Any) -> None:
    """``unavailable`` (connected, refreshes failing, token run out) is derived, not stored:
    the gauge counts it as the API, the CLI and /admin show it."""
    from datetime import timedelta

    from sqlalchemy import update

    from broker.store.models import Connection

    async with broker.session() as db, db.begin():
        for group in ("g1", "g2", "g3"):
            await broker.repository.put(db, group, "openweathermap", {"api_key": "k" * 32},
                                        auth_type="apikey", hint={})
        await db.execute(update(Connection).where(Connection.group_id == "g2").values(
            last_error="http_503", expires_at=broker.now() - timedelta(minutes=1)))
    text = (await broker.metrics.scrape(broker.database, now=broker.now(),
                                        interval=30.0)).decode()
    got = samples(text)
    assert got[("broker_connections",
                (("integration", "openweathermap"), ("status", "connected")))] == 2
    assert got[("broker_connections",
                (("integration", "openweathermap"), ("status", "unavailable")))] == 1
