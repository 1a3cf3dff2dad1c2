"""Who is calling: a service token (the host platform's backend, remote nodes).

Tokens are compared as SHA-256 digests in constant time, against every configured token
without stopping at the first match, so timing says nothing about which or how many exist.
A request without a valid token gets the same 401 whatever path it names.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Unauthorized

__all__ = ["ServiceTokenMiddleware", "TokenSet"]


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


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ServiceTokenMiddleware:
    """Rejects every HTTP request outside ``public_paths`` that lacks a valid service token."""

    def __init__(self, app: ASGIApp, tokens: TokenSet, public_paths: Iterable[str]) -> None:
        self.app = app
        self.tokens = tokens
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(Headers(scope=scope))
        if token is None or not self.tokens.matches(token):
            error = Unauthorized("Missing or invalid bearer token.")
            response = JSONResponse(
                error.to_dict(),
                status_code=error.status_code,
                headers={"WWW-Authenticate": 'Bearer realm="broker"', "Cache-Control": "no-store"},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = "service"
        await self.app(scope, receive, send)
