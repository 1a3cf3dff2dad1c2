"""The operator page, ``/admin``, in headless Chromium against a live ``broker serve``:
entered only through a one-time ``broker admin-link`` URL (a second use and an expired
link refused), an HttpOnly SameSite=Strict cookie, the page's figures against the rows
seeded, the connect page's headers, and no credential anywhere in what the browser got.
The page's HTML and chart are pure functions, unit-tested at the end."""

from __future__ import annotations

import asyncio
import html
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from broker.config import load_settings
from broker.events import record
from broker.overview import OUTCOME_KINDS, Overview, hour_starts
from broker.runtime import Broker
from broker.store.models import AdminGrant, Connection
from broker.web.adminpage import admin_body, outcome_chart
from tests.browser_support import (
    ConsoleWatch,
    LiveServe,
    console,
    launch_chromium,
    screenshot,
    start_serve,
    stop_serve,
)

__all__ = ["console"]

KEYS = {g: f"owm-admin-secret-{g}-0123456789" for g in
        ("team-ok-1", "team-ok-2", "team-reauth", "team-down", "team-corrupt")}
# Refresh outcomes seeded over the last hours: (hours ago, kind, how many).
OUTCOMES = [(0, "refreshed", 5), (1, "refreshed", 7), (1, "refresh_failed", 2),
            (3, "recovered", 1), (5, "reauth_required", 1), (30, "refreshed", 9)]


async def seed(config: Path) -> None:
    broker = await Broker.open(load_settings(config, env={}), migrate=False)
    try:
        now = broker.now()
        async with broker.session() as db, db.begin():
            # The past first, so the events' ids follow their times (the page lists by id).
            for hours, kind, n in sorted(OUTCOMES, reverse=True):
                for _ in range(n):
                    await record(db, group_id="team-ok-1", integration="openweathermap",
                                 kind=kind, now=now - timedelta(hours=hours, minutes=1))
            for group, key in KEYS.items():
                await broker.repository.put(db, group, "openweathermap", {"api_key": key},
                                            auth_type="apikey", hint={})
        async with broker.session() as db, db.begin():
            for group, values in {
                "team-reauth": {"status": "reauth_required", "last_error": "invalid_grant"},
                "team-down": {"last_error": "http_503", "failure_count": 4,
                              "expires_at": now - timedelta(minutes=5)},
                "team-corrupt": {"status": "corrupt"},
            }.items():
                await db.execute(
                    update(Connection).where(Connection.group_id == group).values(**values)
                )
    finally:
        await broker.close()


def admin_link(serve: LiveServe) -> str:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "broker", "admin-link", "--config", str(serve.config)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "works once, for 5 minutes" in done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServe]:
    serve = start_serve(tmp_path_factory.mktemp("admin"), {"openweathermap": {"verify": None}})
    try:
        asyncio.run(seed(serve.config))
        yield serve
    finally:
        stop_serve(serve)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with launch_chromium() as b:
        yield b


async def new_page(browser: Any, watch: ConsoleWatch) -> Any:
    page = await browser.new_page(viewport={"width": 1100, "height": 900})
    watch.attach(page)
    return page


async def test_a_one_time_link_opens_the_page_once(
    live: LiveServe, browser: Any, console: ConsoleWatch
) -> None:
    link = admin_link(live)
    assert link.startswith(f"{live.url}/admin/enter#bal_")
    seen: list[str] = []
    page = await new_page(browser, console)
    page.on("response", lambda r: seen.append(r.url))
    await page.goto(link)
    await page.wait_for_url(f"{live.url}/admin")
    assert await page.locator("h1").inner_text() == "Broker"
    # The token never reached a server in a URL, and is gone from the address bar.
    assert not any("bal_" in url for url in seen), seen

    cookies = {c["name"]: c for c in await page.context.cookies()}
    cookie = cookies["broker_admin"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert 3500 < cookie["expires"] - datetime.now(UTC).timestamp() <= 3600

    providers = page.locator("table.providers tbody tr")
    assert await providers.count() == 1
    cells = await providers.first.locator("td").all_inner_texts()
    head = await page.locator("table.providers thead th").all_inner_texts()
    assert dict(zip(head, cells, strict=True)) == {
        "provider": "openweathermap", "connected": "2", "reauth_required": "1",
        "unavailable": "1", "corrupt": "1", "total": "5",
    }
    attention = await page.locator("table.attention tbody tr").all_inner_texts()
    assert len(attention) == 3
    found = {row.split("\t")[0]: row.split("\t")[2] for row in attention}
    assert found == {"team-reauth": "reauth_required", "team-down": "unavailable",
                     "team-corrupt": "corrupt"}
    assert "http_503" in "".join(attention) and "invalid_grant" in "".join(attention)

    # The chart: the last 24 hours only (the 30-hours-ago refreshes are not in it).
    counts: dict[str, int] = {}
    for rect in await page.locator("svg#outcomes g.bar rect").all():
        kind = await rect.get_attribute("data-kind")
        counts[kind] = counts.get(kind, 0) + int(await rect.get_attribute("data-count"))
    assert counts == {"refreshed": 12, "refresh_failed": 2, "recovered": 1,
                      "reauth_required": 1}
    assert "16 in all" in await page.locator("#outcomes-section").inner_text()
    events = page.locator("table.events tbody tr")
    assert await events.count() == len(KEYS) + sum(n for _, _, n in OUTCOMES)
    await screenshot(page, "admin")

    text = await page.content()
    for key in KEYS.values():
        assert key not in text
    # A second visit with the cookie: the page again, no link needed.
    await page.goto(f"{live.url}/admin")
    assert await page.locator("h1").inner_text() == "Broker"

    # The same link in another browser (a fresh context): refused, and no cookie.
    console.expect_http(403, 401)
    other = await new_page(browser, console)
    await other.goto(link)
    message = other.locator("#message")
    await message.filter(has_text="already used or has expired").wait_for()
    assert other.url == f"{live.url}/admin/enter"
    assert "broker_admin" not in {c["name"] for c in await other.context.cookies()}
    await other.goto(f"{live.url}/admin")
    assert "Open a link from `broker admin-link`" in await other.locator("#message").inner_text()


async def test_an_expired_link_is_refused(
    live: LiveServe, browser: Any, console: ConsoleWatch
) -> None:
    link = admin_link(live)
    broker = await Broker.open(load_settings(live.config, env={}), migrate=False)
    try:
        async with broker.session() as db, db.begin():
            await db.execute(update(AdminGrant).where(AdminGrant.kind == "link").values(
                expires_at=broker.now() - timedelta(seconds=1)))
    finally:
        await broker.close()
    console.expect_http(403)
    page = await new_page(browser, console)
    await page.goto(link)
    await page.locator("#message").filter(has_text="already used or has expired").wait_for()
    assert "broker_admin" not in {c["name"] for c in await page.context.cookies()}


def test_the_routes_answer_with_the_pages_headers_and_refuse_forged_posts(
    live: LiveServe,
) -> None:
    with httpx.Client(base_url=live.url, timeout=10) as client:
        page = client.get("/admin")
        assert page.status_code == 401
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["referrer-policy"] == "no-referrer"
        client.cookies.set("broker_admin", "bas_forged")
        forged = client.get("/admin")
        assert forged.status_code == 401
        client.cookies.clear()
        # A post from another origin (or none) cannot spend a link.
        link = admin_link(live).split("#", 1)[1]
        other = client.post("/admin/enter", json={"token": link},
                            headers={"Origin": "http://evil.example"})
        assert other.status_code == 403
        bare = client.post("/admin/enter", json={"token": link})
        assert bare.status_code == 403
        own = client.post("/admin/enter", json={"token": link}, headers={"Origin": live.url})
        assert own.status_code == 200 and own.cookies.get("broker_admin", "").startswith("bas_")
        again = client.post("/admin/enter", json={"token": link}, headers={"Origin": live.url})
        assert again.status_code == 403


# --- the page as a pure function -------------------------------------------------------


def test_hour_starts_end_with_the_hour_in_progress() -> None:
    now = datetime(2026, 12, 3, 10, 47, 12, tzinfo=UTC)
    hours = hour_starts(now)
    assert len(hours) == 24 and hours[-1] == datetime(2026, 12, 3, 10, tzinfo=UTC)
    assert hours[0] == datetime(2026, 12, 2, 11, tzinfo=UTC)


def test_the_chart_stacks_each_hours_outcomes_to_scale() -> None:
    now = datetime(2026, 12, 3, 10, 47, tzinfo=UTC)
    hourly = [{"hour": h.isoformat(), **dict.fromkeys(OUTCOME_KINDS, 0)}
              for h in hour_starts(now)]
    hourly[-1].update(refreshed=8, refresh_failed=2)
    hourly[0].update(refreshed=5)
    svg = outcome_chart(hourly, width=720, height=200)
    assert svg.count("<rect") == 3 + len(OUTCOME_KINDS)  # bars + legend swatches
    assert 'data-kind="refreshed" data-count="8"' in svg
    # The tallest hour (10) fills the plot (166 px): 8 of it is 132.8, 2 is 33.2.
    assert 'height="132.8"' in svg and 'height="33.2"' in svg and 'height="83.0"' in svg
    assert ">10<" in svg  # the axis' top


def test_every_value_on_the_page_is_escaped() -> None:
    hostile = '<img src=x onerror=alert(1)>"'
    found = Overview(
        now=datetime(2026, 12, 3, tzinfo=UTC),
        by_provider={hostile: {"connected": 1}},
        attention=[{"group": hostile, "integration": hostile, "status": "corrupt",
                    "last_error": hostile, "failures": 1, "updated_at": None}],
        hourly=[], recent=[{"created_at": "2026-12-03T00:00:00", "group_id": hostile,
                            "integration": "x", "kind": "connected",
                            "detail": {"error": hostile}}],
    )
    body = admin_body(found, session_ends=found.now)
    assert "<img" not in body and html.escape(hostile, quote=True) in body
