"""Issue #6, item 9: the callback with missing, repeated, huge or hostile parameters.

``tests/test_oauth_failures.py`` covers: no state, a forged state, a repeated or NUL state,
a repeated, 5 KB, 60 KB or NUL code, and ``<script>`` in ``error``/``error_description``.
Here: the rest. Each ends on a clear, escaped error page; the flow's state is consumed when
the callback names it (once); no token request is made; nothing is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from tests import oauth_support
from tests.oauth_support import page_data, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory

LiveFactory = Callable[..., Any]
BIG = "x" * 60_000  # httpx refuses URLs over 64 KB
SCRIPT = "<script>alert(1)</script>"

# (query after "state=<the flow's state>" ... ; the message; whether the state is consumed)
CASES = {
    "no-code": ("&iss={iss}", "did not return an authorization code", True),
    "empty-code": ("&code=&iss={iss}", "did not return an authorization code", True),
    "only-unknown-params": (f"&foo={quote(SCRIPT)}&iss={{iss}}",
                            "did not return an authorization code", True),
    "repeated-iss": ("&code=c&iss={iss}&iss={iss}", "repeats 'iss'", True),
    "NUL-iss": ("&code=c&iss=a%00b", "malformed 'iss'", True),
    "60KB-iss": (f"&code=c&iss={BIG}", "malformed 'iss'", True),
    "repeated-error": ("&error=access_denied&error=access_denied", "repeats 'error'", True),
    "NUL-error": ("&error=access%00denied", "malformed 'error'", True),
    "60KB-error": (f"&error={BIG}", "malformed 'error'", True),
    "60KB-error_description": (f"&error=access_denied&error_description={BIG}",
                               "Access to Acme was declined.", True),
    "hostile-error_uri": (f"&error=access_denied&error_uri=javascript:alert(1)"
                          f"&error_description={quote(SCRIPT)}",
                          "Access to Acme was declined.", True),
    "NUL-error_description": ("&error=access_denied&error_description=%00%00",
                              "Access to Acme was declined.", True),
    "error-and-code": ("&error=server_error&code=c&iss={iss}",
                       "Acme could not complete the sign-in.", True),
    "invalid-utf8": ("&code=c&iss=%ff%fe", "did not come from Acme", True),
    # The state itself malformed: no flow can be named, so none is consumed.
    "60KB-state": (f"{BIG}&code=c", "malformed 'state'", False),
    "second-empty-state": ("&state=&code=c", "repeats 'state'", False),
}


async def test_hostile_callback_parameters_end_on_a_clear_escaped_error_page(
    live_factory: LiveFactory,
) -> None:
    # One broker and provider for every case (each with a flow of its own), for speed.
    failures = []
    async with live_factory() as live, live.browser() as browser:
        for case, (extra, message, consumed) in CASES.items():
            location = await live.start(browser)
            state = query_param(location, "state")
            await live.consent(browser, location)  # a real code exists; it is never sent
            query = f"state={state}" + extra.replace("{iss}", quote(live.server.issuer, safe=""))
            page = await browser.get(f"{live.url}/oauth/callback?{query}")
            try:
                sec.assert_error_page(page, message)
                assert sec.token_requests(live.server) == 0
                assert await live.rows() == 0
                assert await live.flows(state) == (0 if consumed else 1)
                # Nothing from the request is reflected: no markup, script URL or echo.
                assert "<script>alert" not in page.text
                assert "javascript:" not in page.text
                assert "alert(1)" not in page.text
                assert len(page.text) < 4000
                # The opener can tell which integration failed (it ignores results without).
                integration = page_data(page)["message"]["integration"]
                assert integration == ("acme" if consumed else None), integration
            except AssertionError as exc:
                failures.append(f"{case}: {exc}")
    assert not failures, "\n".join(failures)


async def test_callback_without_any_query_is_a_clear_error_page(live_factory: LiveFactory) -> None:
    async with live_factory() as live, live.browser() as browser:
        for target in ("/oauth/callback", "/oauth/callback?", "/oauth/callback?state",
                       "/oauth/callback?&&=&"):
            page = await browser.get(f"{live.url}{target}")
            sec.assert_error_page(page, "The sign-in response has no state.")
        assert sec.token_requests(live.server) == 0
