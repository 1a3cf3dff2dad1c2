"""The JSON error responses: ``{"error": {"code", "message", "field"?...}}``.

One place decides what an exception becomes, for the app's exception handlers and for the
credentials fast path (which runs outside Starlette's exception layer): a broker
``HTTPError`` is its own status and body; the database or its driver failing is a 503
that names nothing of the database; anything else is a 500 that says nothing more. The
5xx cases are logged here with the method and path (never a value from the request).
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ..errors import HTTPError, NotFound, ServiceUnavailable
from .context import NO_STORE

__all__ = [
    "DATABASE_ERRORS",
    "broker_error",
    "database_error",
    "internal_error",
    "response_for",
    "starlette_error",
]

log = logging.getLogger("broker.web")

DATABASE_ERRORS: tuple[type[Exception], ...] = (OperationalError, DBAPIError, OSError)
"""What means "the credential store is unavailable". The driver's own connect errors
(refused, timed out, unknown host) are not wrapped as DBAPIError: the database is as
unavailable."""


def broker_error(exc: HTTPError, method: str, path: str) -> JSONResponse:
    if exc.status_code >= 500:
        log.error("%s %s: %s", method, path, exc.message)
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=NO_STORE)


def starlette_error(exc: HTTPException) -> JSONResponse:
    code = {404: NotFound.code, 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: "No such route.", 405: "Method not allowed."}.get(
        exc.status_code, str(exc.detail)
    )
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=exc.status_code,
        headers={**NO_STORE, **(exc.headers or {})},
    )


def database_error(exc: Exception, method: str, path: str) -> JSONResponse:
    log.error("database error on %s %s: %s", method, path, type(exc).__name__)
    return broker_error(
        ServiceUnavailable("The credential store is unavailable. Try again shortly."),
        method, path,
    )


def internal_error(method: str, path: str) -> JSONResponse:
    """Call from an ``except`` block: the traceback is logged with the request's route."""
    log.exception("unhandled error on %s %s", method, path)
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "Internal error."}},
        status_code=500,
        headers=NO_STORE,
    )


def response_for(exc: Exception, method: str, path: str) -> JSONResponse:
    """What the app's handlers answer for ``exc`` (call from its ``except`` block)."""
    if isinstance(exc, HTTPError):
        return broker_error(exc, method, path)
    if isinstance(exc, HTTPException):
        return starlette_error(exc)
    if isinstance(exc, DATABASE_ERRORS):
        return database_error(exc, method, path)
    return internal_error(method, path)
