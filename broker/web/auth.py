"""Who is calling: a service token, or a connect session.

- Service tokens (config ``auth.service_tokens``): the host platform's backend and remote
  nodes. Compared as SHA-256 digests in constant time, against every configured token
  without stopping at the first match.
- Connect sessions (``bcs_...``, from ``POST /connect-sessions``): a browser managing one
  group's integrations, sent as a bearer token — only ever in the ``Authorization`` header.
  A token in a URL would let whoever holds the URL act from anyone's browser, so no route
  reads one from the query (the connect page takes its session by ``postMessage`` or from
  its link's fragment; a sign-in popup starts from a single-use ticket: see ``popup``).

A request outside the public paths without a valid token gets the same 401 whatever path
it names. What a principal may do is checked by the routes (``require_*``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Forbidden, HTTPError, NotFound, Unauthorized
from ..sessions import SESSION_PREFIX, SessionGrant

__all__ = ["Principal", "ServiceTokenMiddleware", "TokenSet", "require_group", "require_service"]

NOT_FOUND_MESSAGE = "Not found."
SESSION_EXPIRED = "This connect session has expired. Ask for a new link."
SessionLookup = Callable[[str], Awaitable[SessionGrant | None]]


class TokenSet:
    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def matches(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found


@dataclass(frozen=True)
class Principal:
    kind: Literal["service", "session"]
    session: SessionGrant | None = None


def bearer_token(headers: Headers) -> str | None:
    return bearer_of(headers.get("authorization", ""))


def bearer_of(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ServiceTokenMiddleware:
    """Resolves the caller; rejects callers without a valid token outside ``public_paths``."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: TokenSet,
        public_paths: Iterable[str],
        *,
        public_prefixes: Iterable[str] = (),
        find_session: SessionLookup | None = None,
        clock: Callable[[], datetime] | None = None,
        unauthorized_page: Callable[[str], ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.public_paths = frozenset(public_paths)
        self.public_prefixes = tuple(public_prefixes)
        self.find_session = find_session
        self.clock = clock
        self.unauthorized_page = unauthorized_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in self.public_paths
            or path.startswith(self.public_prefixes)
        ):
            await self.app(scope, receive, send)
            return
        try:
            principal, problem = await self._resolve(scope)
        except HTTPError as exc:
            # The session lookup failed (the store is down): this runs outside the app's
            # exception handlers, so answer here, not with a 500.
            await JSONResponse(
                exc.to_dict(), status_code=exc.status_code, headers={"Cache-Control": "no-store"}
            )(scope, receive, send)
            return
        if (
            principal is None
            and self.unauthorized_page is not None
            and scope.get("method") == "GET"
            and path.endswith("/authorize")
        ):
            # A popup (or a link) opened this: show the result page, which tells the
            # opener, not JSON.
            await self.unauthorized_page(problem)(scope, receive, send)
            return
        if principal is None:
            # The connect page tells an expired link from a wrong one by ``reason``.
            expired = {"reason": "session_expired"} if problem == SESSION_EXPIRED else {}
            error = Unauthorized(problem, **expired)
            response = JSONResponse(
                error.to_dict(),
                status_code=error.status_code,
                headers={"WWW-Authenticate": 'Bearer realm="broker"', "Cache-Control": "no-store"},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _resolve(self, scope: Scope) -> tuple[Principal | None, str]:
        invalid = "Missing or invalid bearer token."
        token = bearer_token(Headers(scope=scope))
        if token is None:
            return None, invalid
        if token.startswith(SESSION_PREFIX) and self.find_session is not None:
            grant = await self.find_session(token)
            if grant is None:
                return None, invalid
            if self.clock is not None and grant.expires_at <= self.clock():
                return None, SESSION_EXPIRED
            return Principal("session", grant), ""
        if self.tokens.matches(token):
            return Principal("service"), ""
        return None, invalid


def principal(request: Request) -> Principal:
    found = request.scope.get("state", {}).get("principal")
    if not isinstance(found, Principal):
        raise Unauthorized("Missing or invalid bearer token.")
    return found


def require_service(request: Request) -> None:
    """Only a service token may do this (read credentials, open sessions)."""
    if principal(request).kind != "service":
        raise Forbidden("A connect session cannot do this; it needs a service token.")


def require_group(request: Request, group_id: str, integration: str | None = None) -> None:
    """A connect session may act only on its own group (and its allowed integrations).

    Anything else answers exactly what a group or connection that does not exist answers
    (404 ``not_found``), so a session learns nothing about other groups.
    """
    who = principal(request)
    if who.kind == "service":
        return
    assert who.session is not None
    if who.session.group_id != group_id or (
        integration is not None and not who.session.allows(integration)
    ):
        raise NotFound(NOT_FOUND_MESSAGE)
