"""The Starlette application: routes, error responses, and the service-token gate.

Routes (S: service token; C: connect session for the group, as a bearer token; -: public):

    -   GET  /healthz                                                liveness
    -   GET  /readyz                                                 readiness (database, schema)
    -   GET  /metrics               Prometheus (metrics.enabled; metrics.token or metrics.allow)
    -   GET  /openapi.json
    -   GET  /connect                                                the connect page
    -   GET  /admin, GET /admin/enter, POST /admin/enter             the operator page
    -   GET  /oauth/start, POST /oauth/start                         the popup's start (popup)
    -   GET  /oauth/callback                                         the OAuth2 redirect URI
    -   GET  /static/...
    S   POST /connect-sessions
      C GET  /connect-sessions/current                               the page's own session
    S C GET  /groups/{group_id}/integrations
    S C POST /groups/{group_id}/integrations/custom/{name}             the seed's trigger
    S C POST /groups/{group_id}/integrations/custom/{name}/disconnect  the seed's delete
    S C POST /groups/{group_id}/integrations/{name}/authorize          a sign-in ticket
    S   GET  /groups/{group_id}/integrations/{name}/credentials
    S   GET  /groups/{group_id}/events
    S   *    /groups/{group_id}/integrations/{name}/proxy/{path}     the provider's API

The connect page and the sign-in popup live in ``connect`` and ``popup``; this module has
the API routes, the error handlers and the app's assembly.

Every error is JSON: ``{"error": {"code", "message", "field"?...}}`` with a stable code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..auth import kind
from ..errors import HTTPError, InvalidInput, ServiceUnavailable
from ..events import list_events
from ..integrations import Group, Integration, fill_group
from ..logs import fields
from ..runtime import Broker
from ..scheduler import Refresher
from ..sessions import SessionGrant, find_session
from .accesslog import AccessLog
from .admin import admin_page, enter_page, enter_redeem
from .auth import ServiceTokenMiddleware, TokenSet, principal, require_service
from .bodies import read_json_object, replay
from .connect import connect_page, create_connect_session, current_session
from .context import NO_STORE, broker_of, group_id_of, integration_of, targets
from .errors import (
    DATABASE_ERRORS,
    broker_error,
    database_error,
    internal_error,
    starlette_error,
)
from .fastpath import CredentialsFastPath
from .metrics import metrics
from .openapi import openapi
from .pages import result_page
from .popup import (
    LINK_REFUSED,
    authorize_link,
    create_ticket,
    oauth_callback,
    redeem,
    start_page_route,
)
from .proxy import proxy

__all__ = ["create_app"]

log = logging.getLogger("broker.web")
STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = [
    "/healthz", "/readyz", "/metrics", "/openapi.json", "/oauth/callback", "/oauth/start",
    "/connect", "/admin", "/admin/enter",
]
PUBLIC_PREFIXES = ["/static/"]


def _describe(integration: Integration, group_id: str, status: Any) -> dict[str, Any]:
    config = integration.integration.config
    auth = kind(integration.auth_type.value)
    item: dict[str, Any] = {
        "name": integration.key,
        "display_name": integration.name,
        "image": integration.image,
        "auth_type": integration.auth_type.value,
        "auth_title": auth.title,
        "connect": auth.connect,
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
    public = {
        "title", "secret", "required", "pattern", "example", "description", "default", "format",
    }
    for values in ("fields", "settings"):
        specs = getattr(integration.provider, values, None)
        if specs:
            item[values] = {name: spec.model_dump(include=public) for name, spec in specs.items()}
    return item


async def healthz(request: Request) -> Response:
    """Liveness: the process answers (nothing else is asked). Under ``--workers N`` it
    says which worker answered (0..N-1)."""
    worker = getattr(request.app.state, "worker", None)
    return JSONResponse({"status": "ok"} if worker is None else {"status": "ok",
                                                                  "worker": worker})


READY_TIMEOUT = 5.0


async def readyz(request: Request) -> Response:
    """Readiness: 200 when the database answers and its schema is current, else 503 with
    the reason (never the database URL or the driver's message, which can hold it)."""
    database = broker_of(request).database
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            pending = await database.pending_migrations()
    except (DBAPIError, OSError, TimeoutError) as exc:
        reason = f"the database does not answer ({type(exc).__name__})"
        return JSONResponse({"status": "unavailable", "reason": reason}, 503, headers=NO_STORE)
    if pending:
        reason = (f"the database schema is {len(pending)} migration(s) behind: run "
                  "`broker db upgrade`")
        return JSONResponse({"status": "unavailable", "reason": reason}, 503, headers=NO_STORE)
    return JSONResponse({"status": "ready"}, headers=NO_STORE)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi(broker_of(request).settings.public_url))


async def list_integrations(request: Request) -> Response:
    group_id = group_id_of(request)
    broker = broker_of(request)
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
    group_id = group_id_of(request)
    integration = integration_of(request, group_id)
    body, _ = await read_json_object(request)
    async with broker_of(request).session() as db, db.begin():
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
    log.info("connected %s for group %s", integration.key, group_id,
             extra=fields(event="connect", group=group_id, integration=integration.key,
                          outcome="connected"))
    return JSONResponse(
        {"integration": integration.key, "status": "connected"}, headers=NO_STORE
    )


async def disconnect(request: Request) -> Response:
    group_id = group_id_of(request)
    integration = integration_of(request, group_id)
    async with broker_of(request).session() as db, db.begin():
        result = await integration.delete_integration(db, Group(group_id), request)
    if isinstance(result, Response):
        return result
    log.info("disconnected %s for group %s", integration.key, group_id,
             extra=fields(event="disconnect", group=group_id, integration=integration.key,
                          outcome="not_connected"))
    return JSONResponse(
        {"integration": integration.key, "status": "not_connected"}, headers=NO_STORE
    )


async def credentials(request: Request) -> Response:
    require_service(request)
    group_id = group_id_of(request)
    integration = integration_of(request, group_id)
    force = bool(request.scope["query_string"]) and (
        request.query_params.get("force_refresh", "").lower() in ("1", "true", "yes")
    )
    data = await broker_of(request).credentials(group_id, integration.key, force_refresh=force)
    return JSONResponse({"credentials": data}, headers=NO_STORE)


async def events(request: Request) -> Response:
    require_service(request)
    group_id = group_id_of(request)
    try:
        limit = min(max(int(request.query_params.get("limit", "100")), 1), 1000)
        before_text = request.query_params.get("before")
        # Clamped to the ids a 64-bit column holds (a larger one overflows the driver: a 500).
        before = min(max(int(before_text), 0), 2**63 - 1) if before_text is not None else None
    except ValueError:
        raise InvalidInput("limit and before must be integers.", field="limit") from None
    async with broker_of(request).session() as db:
        items = await list_events(db, group_id, limit=limit, before=before)
    return JSONResponse({"group_id": group_id, "events": items}, headers=NO_STORE)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return broker_error(exc, request.method, request.url.path)


async def _starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return starlette_error(exc)


async def _database_error(request: Request, exc: Exception) -> Response:
    return database_error(exc, request.method, request.url.path)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return internal_error(request.method, request.url.path)


def create_app(
    broker: Broker, *, service_tokens: list[str] | None = None, refresher: bool = False,
    worker: int | None = None,
) -> Starlette:
    """The HTTP app over an open ``broker``. The caller closes the broker.

    ``refresher=True`` runs the refresh sweep while the app runs (``broker serve``);
    ``worker``: this process's index under ``broker serve --workers N``.
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

    token_set = TokenSet(tokens)
    routes = [
        # The hot routes first: Starlette tries each route in order until one matches.
        Route("/groups/{group_id}/integrations/{name}/credentials", credentials),
        Route(
            "/groups/{group_id}/integrations/{name}/proxy/{path:path}", proxy,
            methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        ),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi_json),
        Route("/groups/{group_id}/integrations", list_integrations),
        Route("/groups/{group_id}/integrations/custom/{name}", trigger, methods=["POST"]),
        Route(
            "/groups/{group_id}/integrations/custom/{name}/disconnect",
            disconnect,
            methods=["POST"],
        ),
        Route("/groups/{group_id}/integrations/{name}/authorize", create_ticket,
              methods=["POST"]),
        Route("/groups/{group_id}/integrations/{name}/authorize", authorize_link),
        Route("/groups/{group_id}/events", events),
        Route("/connect-sessions", create_connect_session, methods=["POST"]),
        Route("/connect-sessions/current", current_session),
        Route("/oauth/start", start_page_route),
        Route("/oauth/start", redeem, methods=["POST"]),
        Route("/oauth/callback", oauth_callback),
        Route("/connect", connect_page),
        Route("/admin", admin_page),
        Route("/admin/enter", enter_page),
        Route("/admin/enter", enter_redeem, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(AccessLog),
            # Inside the access log, before everything else: a node's read of a warm
            # connection answered from the cache (falls through for anything else).
            Middleware(CredentialsFastPath, broker, token_set),
            Middleware(
                ServiceTokenMiddleware,
                token_set,
                PUBLIC_PATHS,
                public_prefixes=PUBLIC_PREFIXES,
                find_session=find,
                clock=broker.now,
                unauthorized_page=lambda message: result_page(
                    integration=None,
                    display_name=None,
                    status="error",
                    message=LINK_REFUSED,
                    targets=targets(broker),
                    return_to=None,
                    status_code=401,
                ),
            )
        ],
        exception_handlers={
            HTTPError: _http_error,
            HTTPException: _starlette_error,
            **dict.fromkeys(DATABASE_ERRORS, _database_error),
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    # No "/path/" -> "/path" redirects: Starlette builds them from the Host header, which
    # a client forges at will. Paths with a trailing slash are a plain 404.
    app.router.redirect_slashes = False
    app.state.broker = broker
    app.state.worker = worker
    return app
