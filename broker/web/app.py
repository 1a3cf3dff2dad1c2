"""The Starlette application: routes, error responses, and the service-token gate.

Routes (all but /healthz need ``Authorization: Bearer <service token>``):

    GET  /healthz
    GET  /groups/{group_id}/integrations
    POST /groups/{group_id}/integrations/custom/{name}             the seed's trigger
    POST /groups/{group_id}/integrations/custom/{name}/disconnect  the seed's delete
    GET  /groups/{group_id}/integrations/{name}/credentials

Every error is JSON: ``{"error": {"code", "message", "field"?...}}`` with a stable code.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import HTTPError, InvalidInput, NotFound, ServiceUnavailable, UnknownIntegration
from ..integrations import GROUP_ID_PATTERN, INTEGRATION_PATTERN, Group, Integration, fill_group
from ..runtime import Broker
from .auth import ServiceTokenMiddleware, TokenSet
from .bodies import read_json_object, replay

__all__ = ["create_app"]

log = logging.getLogger("broker.web")
NO_STORE = {"Cache-Control": "no-store"}
PUBLIC_PATHS = ["/healthz"]


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def _group_id(request: Request) -> str:
    group_id: str = request.path_params["group_id"]
    if not re.fullmatch(GROUP_ID_PATTERN, group_id):
        raise InvalidInput(
            "Group id must be 1-128 characters: letters, digits and . _ : @ -, "
            "starting with a letter or digit.",
            field="group_id",
        )
    return group_id


def _integration(request: Request) -> Integration:
    name: str = request.path_params["name"]
    if not re.fullmatch(INTEGRATION_PATTERN, name):
        raise UnknownIntegration(name[:64])
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
    fields = getattr(integration.provider, "fields", None)
    if fields:
        item["fields"] = {
            name: spec.model_dump(include={"title", "secret", "required", "pattern", "example"})
            for name, spec in fields.items()
        }
    return item


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def list_integrations(request: Request) -> Response:
    group_id = _group_id(request)
    broker = _broker(request)
    group = Group(group_id)
    items = []
    async with broker.session() as db:
        for integration in broker.registry:
            status = await integration.get_status(db, group)
            items.append(_describe(integration, group_id, status))
    return JSONResponse({"group_id": group_id, "integrations": items}, headers=NO_STORE)


async def trigger(request: Request) -> Response:
    group_id = _group_id(request)
    integration = _integration(request)
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
    integration = _integration(request)
    async with _broker(request).session() as db, db.begin():
        result = await integration.delete_integration(db, Group(group_id), request)
    if isinstance(result, Response):
        return result
    return JSONResponse(
        {"integration": integration.key, "status": "not_connected"}, headers=NO_STORE
    )


async def credentials(request: Request) -> Response:
    group_id = _group_id(request)
    integration = _integration(request)
    data = await _broker(request).credentials(group_id, integration.key)
    return JSONResponse({"credentials": data}, headers=NO_STORE)


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


def create_app(broker: Broker, *, service_tokens: list[str] | None = None) -> Starlette:
    """The HTTP app over an open ``broker``. The caller closes the broker."""
    tokens = service_tokens
    if tokens is None:
        tokens = [t.get_secret_value() for t in broker.settings.auth.service_tokens]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield

    routes = [
        Route("/healthz", healthz),
        Route("/groups/{group_id}/integrations", list_integrations),
        Route("/groups/{group_id}/integrations/custom/{name}", trigger, methods=["POST"]),
        Route(
            "/groups/{group_id}/integrations/custom/{name}/disconnect",
            disconnect,
            methods=["POST"],
        ),
        Route("/groups/{group_id}/integrations/{name}/credentials", credentials),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(ServiceTokenMiddleware, TokenSet(tokens), PUBLIC_PATHS)],
        exception_handlers={
            HTTPError: _http_error,
            HTTPException: _starlette_error,
            OperationalError: _database_error,
            DBAPIError: _database_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.broker = broker
    return app
