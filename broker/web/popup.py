"""The sign-in popup's routes: ticket, start page, start, callback.

    S C POST /groups/{group_id}/integrations/{name}/authorize   a single-use ticket
    S C GET  /groups/{group_id}/integrations/{name}/authorize   refused: links start nothing
    -   GET  /oauth/start                                       the popup's start page
    -   POST /oauth/start                                       redeem a ticket (own origin)
    -   GET  /oauth/callback                                    the OAuth2 redirect URI

Why a ticket, and why this way: a connect session is a bearer token, and anything that
starts a flow from a URL lets whoever holds the URL start it in someone else's browser —
where that person, already signed in at the provider, would link their account to a group
that is not theirs with one click. So a flow starts only when a page of the broker's own,
on the broker's origin (``csrf.from_own_origin``), redeems a ticket it was handed by the
window that opened it (the connect page, or a host app on an allowed origin) by
``postMessage``. The ticket never appears in a URL, is single use and lives minutes; the
redeeming browser gets the HttpOnly cookie the callback checks.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..catalog import PopupProvider
from ..errors import Forbidden, InvalidInput
from ..logs import fields
from ..oauth.flows import FLOW_TTL, TICKET_PREFIX
from ..oauth.service import FlowFailed, finish, flow_cookie, issue_ticket, start
from ..runtime import Broker
from .auth import principal
from .bodies import parse_json_object, read_body
from .context import NO_STORE, broker_of, group_id_of, integration_of, targets
from .csrf import from_own_origin
from .pages import result_page, start_page
from .redirects import MAX_RETURN_TO, safe_return_to

__all__ = [
    "LINK_REFUSED",
    "authorize_link",
    "create_ticket",
    "oauth_callback",
    "redeem",
    "start_page_route",
]

log = logging.getLogger("broker.web")
LINK_REFUSED = (
    "Sign-ins cannot be started from a link. Close this window and start again from the app."
)


def _failure_page(broker: Broker, exc: FlowFailed) -> Response:
    integration = broker.registry.get(exc.integration) if (
        exc.integration and exc.integration in broker.registry
    ) else None
    return result_page(
        integration=exc.integration,
        display_name=integration.name if integration else None,
        status="error",
        message=exc.message,
        targets=targets(broker),
        return_to=None,
        status_code=exc.status_code,
    )


async def create_ticket(request: Request) -> Response:
    """``POST .../authorize``: a ticket to start this integration's sign-in, for the
    window that will open the popup. Body (optional): ``{"settings": {...}, "return_to"}``.
    """
    broker = broker_of(request)
    group_id = group_id_of(request)
    integration = integration_of(request, group_id)
    spec = integration.provider
    if not isinstance(spec, PopupProvider):
        raise InvalidInput(
            f"{integration.name} is not connected through a sign-in popup.", field="name"
        )
    raw = await read_body(request)
    body: dict[str, Any] = parse_json_object(raw) if raw.strip() else {}
    unknown = set(body) - {"settings", "return_to"}
    if unknown:
        raise InvalidInput("Unknown field.", field=sorted(unknown)[0][:64])
    settings = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise InvalidInput("settings must be an object of the integration's settings.",
                           field="settings")
    return_to = body.get("return_to")
    if return_to is not None:
        safe = safe_return_to(return_to, targets(broker)) if isinstance(return_to, str) else None
        if safe is None:
            raise InvalidInput(
                "return_to must be a path of the broker's or a URL on an allowed origin, "
                f"at most {MAX_RETURN_TO} characters.",
                field="return_to",
            )
        return_to = safe
    who = principal(request)
    ticket = await issue_ticket(
        broker,
        spec,
        group_id=group_id,
        session_hash=who.session.token_hash if who.session else None,
        settings=settings,
        return_to=return_to,
    )
    return JSONResponse(
        {
            "ticket": ticket.ticket,
            "expires_at": ticket.expires_at.isoformat(),
            "start_url": f"{broker.settings.public_url}/oauth/start",
        },
        status_code=201,
        headers=NO_STORE,
    )


async def authorize_link(request: Request) -> Response:
    """``GET .../authorize``: a sign-in opened from a URL. Refused (see the module doc)."""
    return result_page(
        integration=request.path_params.get("name"),
        display_name=None,
        status="error",
        message=LINK_REFUSED,
        targets=targets(broker_of(request)),
        return_to=None,
        status_code=400,
    )


async def start_page_route(request: Request) -> Response:
    broker = broker_of(request)
    return start_page(origin=broker.settings.public_origin, targets=targets(broker))


async def redeem(request: Request) -> Response:
    """``POST /oauth/start`` ``{"ticket"}`` from a page of the broker's own: the flow
    starts in this browser. Answers ``{"location": <provider URL>}`` and sets the cookie
    the callback checks."""
    broker = broker_of(request)
    if not from_own_origin(request.headers, broker.settings.public_origin):
        raise Forbidden("Sign-ins start only from the broker's own pages.")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise InvalidInput("Expected a JSON body.", field="ticket")
    body = parse_json_object(await read_body(request, limit=4096))
    ticket = body.get("ticket")
    if not isinstance(ticket, str) or not ticket.startswith(TICKET_PREFIX) or len(ticket) > 200:
        raise InvalidInput("ticket is missing or malformed.", field="ticket")
    nonce = secrets.token_urlsafe(32)
    try:
        url, state = await start(broker, ticket, browser_nonce=nonce)
    except FlowFailed as exc:
        return JSONResponse(
            {"error": {"code": "flow_failed", "message": exc.message,
                       "integration": exc.integration}},
            status_code=exc.status_code,
            headers=NO_STORE,
        )
    response = JSONResponse({"location": url}, headers=NO_STORE)
    response.set_cookie(
        flow_cookie(state),
        nonce,
        max_age=int(FLOW_TTL.total_seconds()),
        path="/oauth/callback",
        httponly=True,
        secure=broker.settings.public_url.startswith("https://"),
        samesite="lax",
    )
    return response


async def oauth_callback(request: Request) -> Response:
    broker = broker_of(request)
    if request.method != "GET":
        # Starlette answers HEAD on GET routes; a HEAD must not spend the code.
        return JSONResponse(
            {"error": {"code": "method_not_allowed", "message": "Method not allowed."}},
            status_code=405,
            headers={**NO_STORE, "Allow": "GET"},
        )
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    cookie = flow_cookie(request.query_params.get("state") or "")
    try:
        try:
            result = await finish(broker, params, browser_nonce=request.cookies.get(cookie))
        except (DBAPIError, OSError):
            # The store failed mid-flow: the popup still ends on the page that tells its
            # opener. Nothing was stored; the state may or may not have been consumed.
            log.error("database error during the OAuth2 callback")
            raise FlowFailed(
                "The service is briefly unavailable. Close this window and try again.",
                status_code=503,
            ) from None
    except FlowFailed as exc:
        response = _failure_page(broker, exc)
    else:
        log.info("connected %s for group %s", result.integration, result.group_id,
                 extra=fields(event="connect", group=result.group_id,
                              integration=result.integration, outcome="connected"))
        response = result_page(
            integration=result.integration,
            display_name=result.display_name,
            status="connected",
            message=f"{result.display_name} is connected. You can close this window.",
            targets=targets(broker),
            return_to=result.return_to,
        )
    response.delete_cookie(cookie, path="/oauth/callback")
    return response

