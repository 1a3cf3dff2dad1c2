"""The connect page: one connect session's group, every integration it may use.

``GET /connect?session=<token>`` serves a static shell (HTML, CSS and JavaScript from the
package: no build step, no CDN, no inline script) plus a JSON block with what the script
needs: the group, the broker's own origin and the host origins allowed to embed the page.
The script reads the integrations through the API with the session as a bearer token, so
the page never holds a credential: a connected API key shows at most its last 4
characters (the connection's ``hint``).

The page may be framed only by ``auth.allowed_origins`` (CSP ``frame-ancestors``); status
changes are posted to its parent or opener as ``{"type": "broker:connect", "integration",
"status"}`` with each allowed origin as the target, never ``"*"``.
"""

from __future__ import annotations

import html

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..sessions import SESSION_PREFIX, find_session
from .pages import _json_for_script

__all__ = ["connect_page"]


def _headers(frame_ancestors: list[str]) -> dict[str, str]:
    ancestors = " ".join(frame_ancestors) if frame_ancestors else "'none'"
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; "
            f"frame-ancestors {ancestors}"
        ),
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }


def _shell(title: str, body: str, data: dict[str, object] | None, frame: list[str]) -> str:
    script = (
        f'<script type="application/json" id="broker-connect">{_json_for_script(data)}</script>\n'
        '<script src="/static/connect.js" defer></script>'
        if data is not None
        else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="/static/connect.css">
{script}
</head>
<body>
{body}
</body>
</html>
"""


async def connect_page(request: Request) -> Response:
    broker = request.app.state.broker
    settings = broker.settings
    frame = list(settings.auth.allowed_origins)
    token = request.query_params.get("session") or ""
    grant = None
    if token.startswith(SESSION_PREFIX) and len(token) < 200:
        async with broker.session() as db:
            grant = await find_session(db, token)
    if grant is None or grant.expires_at <= broker.now():
        expired = grant is not None
        message = (
            "This link has expired. Go back to the app and open the integrations page again."
            if expired
            else "This link is not valid. Go back to the app and open the integrations page again."
        )
        body = (
            '<main class="page"><h1>Integrations</h1>'
            f'<p class="notice error" role="alert" id="session-error">{html.escape(message)}</p>'
            "</main>"
        )
        return HTMLResponse(
            _shell("Integrations", body, None, frame), status_code=401, headers=_headers(frame)
        )
    data = {
        "group_id": grant.group_id,
        "origin": settings.public_origin,
        "allowed_origins": frame,
        "expires_at": grant.expires_at.isoformat(),
    }
    body = """<main class="page">
<header>
<h1>Integrations</h1>
<p class="lead">Connect the services your workflows use. Keys and tokens are stored encrypted
and never shown again.</p>
</header>
<p id="status" class="notice" role="status" aria-live="polite" hidden></p>
<ul id="integrations" class="cards" aria-label="Integrations"></ul>
<noscript><p class="notice error">This page needs JavaScript.</p></noscript>
</main>"""
    return HTMLResponse(
        _shell("Integrations", body, data, frame), headers=_headers(frame)
    )
