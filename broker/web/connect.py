"""Connecting, for a browser: connect sessions and the connect page.

``POST /connect-sessions`` (service token) makes a session for one group, optionally
limited to some integrations and carrying the workspace's ``display_name``. It returns the
token and a ``connect_url`` that carries the token in its fragment (never sent to a server,
never in a Referer), for deployments that send the page as a link.

``GET /connect`` serves a static shell (HTML, CSS and JavaScript from the package: no build
step, no CDN, no inline script). The page's script gets its session one of two ways:

- **From the host app** (the page embedded in an iframe, or opened as a popup, by a
  frontend on an ``auth.allowed_origins`` origin): the page asks its parent or opener with
  ``postMessage`` and takes the token only from that window and only from an allowed
  origin. The host app vouches for the group: the page connects at once.
- **From a link** (``connect_url``): the script takes the token out of the address bar.
  Anyone can send anyone a link, so the page names the workspace and asks the person to
  confirm before it connects anything to it.

Either way the token is then only a bearer header on the page's API calls (never a query
parameter: the routes do not accept one), and a sign-in popup is started with a
single-use ticket the page obtained, never with the session itself (see ``popup``).

The page may be framed only by ``auth.allowed_origins`` (CSP ``frame-ancestors``); status
changes are posted to its parent or opener as ``{"type": "broker:connect", "integration",
"status"}`` with each allowed origin as the target, never ``"*"``.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..errors import Forbidden, InvalidInput
from ..integrations import GROUP_ID_PATTERN
from ..sessions import create_session
from .auth import principal, require_service
from .bodies import read_json_object
from .context import GROUP_ID_MESSAGE, NO_STORE, broker_of
from .pages import page

__all__ = ["connect_page", "create_connect_session", "current_session", "workspace_name"]

MAX_DISPLAY_NAME = 100
# Control, format (bidi overrides, zero-width), separator-line and unassigned characters:
# a name must read as what it is.
_UNSHOWABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def workspace_name(value: object) -> str | None:
    """``display_name`` as given to ``POST /connect-sessions``: None when absent, else the
    stripped name. Raises InvalidInput when it is not 1-100 showable characters."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip()
        if 0 < len(name) <= MAX_DISPLAY_NAME and not any(
            unicodedata.category(c) in _UNSHOWABLE for c in name
        ):
            return name
    raise InvalidInput(
        f"display_name must be 1-{MAX_DISPLAY_NAME} printable characters "
        "(the workspace's name, shown on the connect page).",
        field="display_name",
    )


async def create_connect_session(request: Request) -> Response:
    require_service(request)
    broker = broker_of(request)
    _, body = await read_json_object(request)
    unknown = set(body) - {"group_id", "integrations", "display_name"}
    if unknown:
        raise InvalidInput("Unknown field.", field=sorted(unknown)[0][:64])
    group_id = body.get("group_id")
    if not isinstance(group_id, str) or not re.fullmatch(GROUP_ID_PATTERN, group_id):
        raise InvalidInput(GROUP_ID_MESSAGE, field="group_id")
    allowed = body.get("integrations")
    if "integrations" in body:  # absent: every integration; null is not "absent"
        if not isinstance(allowed, list) or not all(isinstance(n, str) for n in allowed):
            raise InvalidInput(
                "integrations must be a list of names (leave it out to allow every one).",
                field="integrations",
            )
        for name in allowed:
            if name not in broker.registry:
                raise InvalidInput(f"No integration named {name[:64]!r}.", field="integrations")
    display_name = workspace_name(body.get("display_name"))
    ttl = timedelta(seconds=broker.settings.auth.connect_session_ttl_seconds)
    async with broker.session() as db, db.begin():
        token, grant = await create_session(
            db, group_id=group_id, integrations=allowed, now=broker.now(), ttl=ttl,
            display_name=display_name,
        )
    return JSONResponse(
        {
            "token": token,
            "expires_at": grant.expires_at.isoformat(),
            # The token in the fragment: browsers send neither it to a server nor it in a
            # Referer, and the page takes it out of the address bar at once.
            "connect_url": f"{broker.settings.public_url}/connect#session={token}",
        },
        status_code=201,
        headers=NO_STORE,
    )


async def current_session(request: Request) -> Response:
    """``GET /connect-sessions/current``: the calling connect session (the page's first
    call): its group, workspace name, allow-list and expiry."""
    who = principal(request)
    if who.session is None:
        raise Forbidden("This describes a connect session; call it with one.")
    grant = who.session
    return JSONResponse(
        {
            "group_id": grant.group_id,
            "display_name": grant.display_name,
            "integrations": grant.integrations,
            "expires_at": grant.expires_at.isoformat(),
        },
        headers=NO_STORE,
    )


def _headers(frame_ancestors: list[str]) -> dict[str, str]:
    ancestors = " ".join(frame_ancestors) if frame_ancestors else "'none'"
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; "
            f"frame-ancestors {ancestors}"
        ),
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }


PAGE_BODY = """<main class="page">
<header>
<h1>Integrations</h1>
<p class="lead">Connect the services your workflows use. Keys and tokens are stored encrypted
and never shown again.</p>
<p id="workspace" class="workspace" hidden></p>
</header>
<p id="status" class="notice" role="status" aria-live="polite" hidden></p>
<ul id="integrations" class="cards" aria-label="Integrations"></ul>
<noscript><p class="notice error">This page needs JavaScript.</p></noscript>
</main>"""


async def connect_page(request: Request) -> Response:
    broker = broker_of(request)
    settings = broker.settings
    frame = list(settings.auth.allowed_origins)
    text = page(
        title="Integrations", stylesheet="connect.css", data_id="broker-connect",
        data={"origin": settings.public_origin, "allowed_origins": frame},
        scripts=["connect.js"], body=PAGE_BODY,
    )
    return HTMLResponse(text, headers=_headers(frame))
