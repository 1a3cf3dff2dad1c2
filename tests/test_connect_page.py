"""The connect page in a real browser (headless Chromium) against a live ``broker serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser_support import (
    ConsoleWatch,
    LiveServe,
    browser,  # noqa: F401
    console,  # noqa: F401
    screenshot,
    start_serve,
    stop_serve,
)

KEY = "sk-test-0123456789abcdefWXYZ"

APIKEY_PROVIDER = {
    "display_name": "Example AI",
    "auth_type": "apikey",
    "fields": {
        "api_key": {
            "title": "API key",
            "secret": True,
            "pattern": "^sk-[A-Za-z0-9-]{20,}$",
            "example": "sk-...",
        }
    },
}


@pytest.fixture
def serve_apikey(tmp_path: Path) -> Iterator[LiveServe]:
    live = start_serve(tmp_path, {"exampleai": APIKEY_PROVIDER})
    yield live
    stop_serve(live)


async def test_apikey_connects_through_the_form_after_a_field_error_is_corrected(
    browser: Any, console: ConsoleWatch, serve_apikey: LiveServe  # noqa: F811
) -> None:
    page = await browser.new_page(viewport={"width": 800, "height": 700})
    console.attach(page)
    await page.goto(serve_apikey.session_url())
    card = page.locator('[data-integration="exampleai"]')
    await card.wait_for()
    await screenshot(page, "connect-not-connected")
    field = card.get_by_label("API key")
    assert await field.get_attribute("type") == "password"
    await field.fill("sk-short")
    await card.get_by_role("button", name="Connect").click()
    error = card.locator(".field-error")
    await error.filter(has_text="does not look right").wait_for()
    assert await field.get_attribute("aria-invalid") == "true"
    await screenshot(page, "connect-field-error")
    await field.fill(KEY)
    await card.get_by_role("button", name="Connect").click()
    await page.locator('[data-integration="exampleai"][data-status="connected"]').wait_for()
    connected = page.locator('[data-integration="exampleai"]')
    text = await connected.inner_text()
    assert "Connected" in text
    assert "…WXYZ" in text and KEY not in await page.content()
    await screenshot(page, "connect-connected")
    with serve_apikey.service() as c:
        r = c.get("/groups/team-1/integrations/exampleai/credentials")
        assert r.json() == {"credentials": {"api_key": KEY}}
