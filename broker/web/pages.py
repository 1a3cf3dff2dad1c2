"""Small HTML pages the broker renders itself: the popup's start page and result page.

No inline script: a page's data travels in a JSON ``<script type="application/json">``
block read by its script under ``/static/``, so the Content-Security-Policy can forbid
inline script. Only a status and a message reach a page: never a code, token, ticket or
verifier.
"""

from __future__ import annotations

import html
import json
from typing import Any

from starlette.responses import HTMLResponse

__all__ = ["PAGE_HEADERS", "result_page", "start_page"]

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
# The start page redeems its ticket with fetch() (not a form: a form's redirect to the
# provider would have to be allowed by form-action), so it may connect to its own origin.
START_HEADERS = {
    **PAGE_HEADERS,
    "Content-Security-Policy": PAGE_HEADERS["Content-Security-Policy"].replace(
        "default-src 'none';", "default-src 'none'; connect-src 'self';"
    ),
}


def _json_for_script(value: Any) -> str:
    # Safe inside <script type="application/json">: no "</script>" or "<!--" can form.
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026"
    )


def result_page(
    *,
    integration: str | None,
    display_name: str | None,
    status: str,
    message: str,
    targets: list[str],
    return_to: str | None,
    status_code: int = 200,
) -> HTMLResponse:
    """The page the popup ends on: tells its opener the outcome, then closes."""
    payload = {
        "type": "broker:oauth",
        "integration": integration,
        "status": status,
        "error": None if status == "connected" else message,
    }
    data = {"message": payload, "targets": targets}
    title = "Connected" if status == "connected" else "Could not connect"
    name = html.escape(display_name or integration or "the integration")
    back = (
        f'<p class="back"><a href="{html.escape(return_to, quote=True)}">Go back</a></p>'
        if return_to
        else '<p class="back">You can close this window.</p>'
    )
    body = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title} · {name}</title>
<link rel="stylesheet" href="/static/broker.css">
<script type="application/json" id="broker-result">{_json_for_script(data)}</script>
<script src="/static/popup.js" defer></script>
<script src="/static/oauth-result.js" defer></script>
</head>
<body>
<main class="result {html.escape(status)}" role="main">
<h1>{title}</h1>
<p id="message">{html.escape(message)}</p>
{back}
</main>
</body>
</html>
"""
    return HTMLResponse(body, status_code=status_code, headers=PAGE_HEADERS)


def start_page(*, origin: str, targets: list[str]) -> HTMLResponse:
    """The page a sign-in popup opens on (``GET /oauth/start``).

    It holds nothing: it asks the window that opened it for the flow's ticket by
    ``postMessage`` (only the broker's origin and ``targets`` may answer), redeems it from
    this origin, and goes on to the provider. Opened from a link, it has no opener to ask
    and does nothing.
    """
    data = {"origin": origin, "targets": targets}
    body = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Connecting…</title>
<link rel="stylesheet" href="/static/broker.css">
<script type="application/json" id="broker-start">{_json_for_script(data)}</script>
<script src="/static/popup.js" defer></script>
<script src="/static/oauth-start.js" defer></script>
</head>
<body>
<main class="result starting" role="main">
<h1 id="title">Connecting…</h1>
<p id="message">Waiting for the app that opened this window.</p>
</main>
</body>
</html>
"""
    return HTMLResponse(body, headers=START_HEADERS)
