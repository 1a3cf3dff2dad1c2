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

__all__ = ["PAGE_HEADERS", "page", "result_page", "start_page"]

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


def page(
    *, title: str, stylesheet: str, data_id: str, data: Any, scripts: list[str], body: str
) -> str:
    """A page of the broker's own: ``data`` in a JSON block with id ``data_id`` (read by
    ``scripts``, served from ``/static/``), ``body`` as given (already escaped)."""
    tags = "\n".join(f'<script src="/static/{name}" defer></script>' for name in scripts)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="/static/{stylesheet}">
<script type="application/json" id="{data_id}">{_json_for_script(data)}</script>
{tags}
</head>
<body>
{body}
</body>
</html>
"""


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
    back = (
        f'<p class="back"><a href="{html.escape(return_to, quote=True)}">Go back</a></p>'
        if return_to
        else '<p class="back">You can close this window.</p>'
    )
    body = f"""<main class="result {html.escape(status)}" role="main">
<h1>{title}</h1>
<p id="message">{html.escape(message)}</p>
{back}
</main>"""
    text = page(
        title=f"{title} · {display_name or integration or 'the integration'}",
        stylesheet="broker.css", data_id="broker-result", data=data,
        scripts=["popup.js", "oauth-result.js"], body=body,
    )
    return HTMLResponse(text, status_code=status_code, headers=PAGE_HEADERS)


def start_page(*, origin: str, targets: list[str]) -> HTMLResponse:
    """The page a sign-in popup opens on (``GET /oauth/start``).

    It holds nothing: it asks the window that opened it for the flow's ticket by
    ``postMessage`` (only the broker's origin and ``targets`` may answer), redeems it from
    this origin, and goes on to the provider. Opened from a link, it has no opener to ask
    and does nothing.
    """
    body = """<main class="result starting" role="main">
<h1 id="title">Connecting…</h1>
<p id="message">Waiting for the app that opened this window.</p>
</main>"""
    text = page(
        title="Connecting…", stylesheet="broker.css", data_id="broker-start",
        data={"origin": origin, "targets": targets},
        scripts=["popup.js", "oauth-start.js"], body=body,
    )
    return HTMLResponse(text, headers=START_HEADERS)
