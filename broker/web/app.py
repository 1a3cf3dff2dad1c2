"""The Starlette application: routes, error responses, and the service-token gate.

Routes (S: service token; C: connect session for the group; -: public):

    -   GET  /healthz
    -   GET  /openapi.json
    -   GET  /oauth/callback                                         the OAuth2 redirect URI
    -   GET  /connect?session=...                                    the connect page
    -   GET  /static/...
    S   POST /connect-sessions
    S C GET  /groups/{group_id}/integrations
    S C POST /groups/{group_id}/integrations/custom/{name}             the seed's trigger
    S C POST /groups/{group_id}/integrations/custom/{name}/disconnect  the seed's delete
    S C GET  /groups/{group_id}/integrations/{name}/authorize          the popup opens this
    S   GET  /groups/{group_id}/integrations/{name}/credentials
    S   GET  /groups/{group_id}/events

Every error is JSON: ``{"error": {"code", "message", "field"?...}}`` with a stable code.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..catalog import OAuth2Provider
from ..errors import HTTPError, InvalidInput, NotFound, ServiceUnavailable, UnknownIntegration
from ..events import list_events
from ..integrations import GROUP_ID_PATTERN, INTEGRATION_PATTERN, Group, Integration, fill_group
from ..oauth.flows import FLOW_TTL
from ..oauth.service import FlowFailed, begin, finish, flow_cookie
from ..runtime import Broker
from ..scheduler import Refresher
from ..sessions import SessionGrant, create_session, find_session
from .accesslog import AccessLog
from .auth import ServiceTokenMiddleware, TokenSet, principal, require_group, require_service
from .bodies import read_json_object, replay
from .connect import connect_page
from .openapi import openapi
from .pages import result_page
from .redirects import safe_return_to

__all__ = ["create_app"]

log = logging.getLogger("broker.web")
STATIC_DIR = Path(__file__).parent / "static"
NO_STORE = {"Cache-Control": "no-store"}
PUBLIC_PATHS = ["/healthz", "/openapi.json", "/oauth/callback", "/connect"]
PUBLIC_PREFIXES = ["/static/"]
GROUP_ID_MESSAGE = (
    "Group id must be 1-128 characters: letters, digits and . _ : @ -, "
    "starting with a letter or digit."
)


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def _group_id(request: Request) -> str:
    group_id: str = request.path_params["group_id"]
    if not re.fullmatch(GROUP_ID_PATTERN, group_id):
        raise InvalidInput(GROUP_ID_MESSAGE, field="group_id")
    require_group(request, group_id)
    return group_id


def _integration(request: Request, group_id: str) -> Integration:
    name: str = request.path_params["name"]
    if not re.fullmatch(INTEGRATION_PATTERN, name):
        raise UnknownIntegration(name[:64])
    require_group(request, group_id, name)
    return _broker(request).registry.get(name)


def _describe(integration: Integration, group_id: str, status: Any) -> dict[str, Any]:
    config = integration.integration.config
    item: dict[str, Any] = {
        "name": integration.key,
        "display_name": integration.name,
        "image": integration.image,
        "auth_type": integration.auth_type.value,
        "authorized": integration.authorized,
        "config": {
            "width": config.width,
            "height": config.height,
            "name": config.name,
            "trigger": fill_group(config.trigger, group_id),
            "delete": fill_group(config.delete, group_id),
        },
        "status": status if isinstance(status, str) else (
            "connected" if status else "not_connected"
        ),
    }
    public = {"title", "secret", "required", "pattern", "example", "description", "default"}
    for kind in ("fields", "settings"):
        specs = getattr(integration.provider, kind, None)
        if specs:
            item[kind] = {name: spec.model_dump(include=public) for name, spec in specs.items()}
    return item


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi(_broker(request).settings.public_url))


async def list_integrations(request: Request) -> Response:
    group_id = _group_id(request)
    broker = _broker(request)
    group = Group(group_id)
    items = []
    who = principal(request)
    needed_by = nodes_by_integration(broker.nodes)
    async with broker.session() as db:
        stored = {c.integration: c for c in await broker.repository.list(db, group_id)}
        for integration in broker.registry:
            if who.session is not None and not who.session.allows(integration.key):
                continue
            status = await integration.get_status(db, group)
            item = _describe(integration, group_id, status)
            info = stored.get(integration.key)
            if info is not None and item["status"] != "not_connected":
                # What may be shown of it: non-secret fields, a secret's last 4 characters.
                item["hint"] = info.hint
                item["updated_at"] = info.updated_at.isoformat()
            item["needed_by"] = needed_by.get(integration.key, [])
            items.append(item)
    return JSONResponse({"group_id": group_id, "integrations": items}, headers=NO_STORE)


def nodes_by_integration(nodes: list[type[Any]]) -> dict[str, list[str]]:
    """Which nodes need which integration (from each node's ``integrations``)."""
    needed: dict[str, list[str]] = {}
    for node in nodes:
        label = str(getattr(node, "display_name", None) or node.__name__)
        for name in getattr(node, "integrations", None) or []:
            needed.setdefault(name, []).append(label)
    return needed


async def trigger(request: Request) -> Response:
    group_id = _group_id(request)
    integration = _integration(request, group_id)
    body, _ = await read_json_object(request)
    async with _broker(request).session() as db, db.begin():
        try:
            result = await integration.complete_integration(
                db, Group(group_id), replay(request, body)
            )
        except KeyError as exc:
            # The seed's complete_integration reads data["api_key"]: a missing field.
            field = str(exc.args[0]) if exc.args else None
            raise InvalidInput(f"Missing field {field!r}.", field=field) from None
    if isinstance(result, Response):
        return result
    return JSONResponse(
        {"integration": integration.key, "status": "connected"}, headers=NO_STORE
    )


async def disconnect(request: Request) -> Response:
    group_id = _group_id(request)
    integration = _integration(request, group_id)
    async with _broker(request).session() as db, db.begin():
        result = await integration.delete_integration(db, Group(group_id), request)
    if isinstance(result, Response):
        return result
    return JSONResponse(
        {"integration": integration.key, "status": "not_connected"}, headers=NO_STORE
    )


async def credentials(request: Request) -> Response:
    require_service(request)
    group_id = _group_id(request)
    integration = _integration(request, group_id)
    force = request.query_params.get("force_refresh", "").lower() in ("1", "true", "yes")
    data = await _broker(request).credentials(group_id, integration.key, force_refresh=force)
    return JSONResponse({"credentials": data}, headers=NO_STORE)


async def events(request: Request) -> Response:
    require_service(request)
    group_id = _group_id(request)
    try:
        limit = min(max(int(request.query_params.get("limit", "100")), 1), 1000)
        before_text = request.query_params.get("before")
        # Clamped to the ids a 64-bit column holds (a larger one overflows the driver: a 500).
        before = min(max(int(before_text), 0), 2**63 - 1) if before_text is not None else None
    except ValueError:
        raise InvalidInput("limit and before must be integers.", field="limit") from None
    async with _broker(request).session() as db:
        items = await list_events(db, group_id, limit=limit, before=before)
    return JSONResponse({"group_id": group_id, "events": items}, headers=NO_STORE)


async def create_connect_session(request: Request) -> Response:
    require_service(request)
    broker = _broker(request)
    _, body = await read_json_object(request)
    unknown = set(body) - {"group_id", "integrations"}
    if unknown:
        raise InvalidInput("Unknown field.", field=sorted(unknown)[0])
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
    ttl = timedelta(seconds=broker.settings.auth.connect_session_ttl_seconds)
    async with broker.session() as db, db.begin():
        token, grant = await create_session(
            db, group_id=group_id, integrations=allowed, now=broker.now(), ttl=ttl
        )
    return JSONResponse(
        {
            "token": token,
            "expires_at": grant.expires_at.isoformat(),
            "connect_url": f"{broker.settings.public_url}/connect?session={token}",
        },
        status_code=201,
        headers=NO_STORE,
    )


def _targets(broker: Broker) -> list[str]:
    """Where the result of a popup may be posted: the broker's origin and allowed ones."""
    settings = broker.settings
    return list(dict.fromkeys([settings.public_origin, *settings.auth.allowed_origins]))


def _return_to(broker: Broker, value: str | None) -> str | None:
    return safe_return_to(value, _targets(broker))


async def authorize(request: Request) -> Response:
    broker = _broker(request)
    try:
        group_id = _group_id(request)
        integration = _integration(request, group_id)
        spec = integration.provider
        if not isinstance(spec, OAuth2Provider):
            raise InvalidInput(
                f"{integration.name} is not connected through a sign-in popup.", field="name"
            )
        return_to = _return_to(broker, request.query_params.get("return_to"))
        who = principal(request)
        nonce = secrets.token_urlsafe(32)
        url, state = await begin(
            broker,
            spec,
            group_id=group_id,
            session_hash=who.session.token_hash if who.session else None,
            query=request.query_params,
            return_to=return_to,
            browser_nonce=nonce,
        )
    except HTTPError as exc:
        return result_page(
            integration=request.path_params.get("name"),
            display_name=None,
            status="error",
            message=exc.message,
            targets=_targets(broker),
            return_to=None,
            status_code=exc.status_code,
        )
    response = RedirectResponse(url, status_code=302, headers={"Referrer-Policy": "no-referrer"})
    response.headers["Cache-Control"] = "no-store"
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
    broker = _broker(request)
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
        integration = broker.registry.get(exc.integration) if (
            exc.integration and exc.integration in broker.registry
        ) else None
        response = result_page(
            integration=exc.integration,
            display_name=integration.name if integration else None,
            status="error",
            message=exc.message,
            targets=_targets(broker),
            return_to=None,
            status_code=exc.status_code,
        )
    else:
        log.info("connected %s for group %s", result.integration, result.group_id)
        response = result_page(
            integration=result.integration,
            display_name=result.display_name,
            status="connected",
            message=f"{result.display_name} is connected. You can close this window.",
            targets=_targets(broker),
            return_to=result.return_to,
        )
    response.delete_cookie(cookie, path="/oauth/callback")
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    if exc.status_code >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.message)
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=NO_STORE)


async def _starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: NotFound.code, 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: "No such route.", 405: "Method not allowed."}.get(
        exc.status_code, str(exc.detail)
    )
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=exc.status_code,
        headers={**NO_STORE, **(exc.headers or {})},
    )


async def _database_error(request: Request, exc: Exception) -> Response:
    log.error("database error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return await _http_error(
        request, ServiceUnavailable("The credential store is unavailable. Try again shortly.")
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "Internal error."}},
        status_code=500,
        headers=NO_STORE,
    )


def create_app(
    broker: Broker, *, service_tokens: list[str] | None = None, refresher: bool = False
) -> Starlette:
    """The HTTP app over an open ``broker``. The caller closes the broker.

    ``refresher=True`` runs the refresh sweep while the app runs (``broker serve``).
    """
    tokens = service_tokens
    if tokens is None:
        tokens = [t.get_secret_value() for t in broker.settings.auth.service_tokens]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeper = Refresher(broker) if refresher else None
        if sweeper is not None:
            sweeper.start()
        try:
            yield
        finally:
            if sweeper is not None:
                await sweeper.aclose()  # lets refreshes in flight finish

    async def find(token: str) -> SessionGrant | None:
        try:
            async with broker.session() as db:
                return await find_session(db, token)
        except (DBAPIError, OSError) as exc:  # in the middleware, past the handlers
            log.error("database error looking up a connect session: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "The credential store is unavailable. Try again shortly."
            ) from None

    routes = [
        Route("/healthz", healthz),
        Route("/openapi.json", openapi_json),
        Route("/groups/{group_id}/integrations", list_integrations),
        Route("/groups/{group_id}/integrations/custom/{name}", trigger, methods=["POST"]),
        Route(
            "/groups/{group_id}/integrations/custom/{name}/disconnect",
            disconnect,
            methods=["POST"],
        ),
        Route("/groups/{group_id}/integrations/{name}/credentials", credentials),
        Route("/groups/{group_id}/integrations/{name}/authorize", authorize),
        Route("/groups/{group_id}/events", events),
        Route("/connect-sessions", create_connect_session, methods=["POST"]),
        Route("/oauth/callback", oauth_callback),
        Route("/connect", connect_page),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(AccessLog),
            Middleware(
                ServiceTokenMiddleware,
                TokenSet(tokens),
                PUBLIC_PATHS,
                public_prefixes=PUBLIC_PREFIXES,
                find_session=find,
                clock=broker.now,
                unauthorized_page=lambda message: result_page(
                    integration=None,
                    display_name=None,
                    status="error",
                    message=message,
                    targets=_targets(broker),
                    return_to=None,
                    status_code=401,
                ),
            )
        ],
        exception_handlers={
            HTTPError: _http_error,
            HTTPException: _starlette_error,
            OperationalError: _database_error,
            DBAPIError: _database_error,
            # The driver's own connect errors (refused, timed out, unknown host) are not
            # wrapped as DBAPIError: the database is as unavailable.
            OSError: _database_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    # No "/path/" -> "/path" redirects: Starlette builds them from the Host header, which
    # a client forges at will. Paths with a trailing slash are a plain 404.
    app.router.redirect_slashes = False
    app.state.broker = broker
    return app
