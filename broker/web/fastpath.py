"""The credentials route's fast path: ``GET /groups/{g}/integrations/{name}/credentials``
with a service token, answered straight from the credential cache.

A node's read of a warm connection is the broker's hottest request. Through the whole
stack (the auth middleware's header parsing, Starlette's exception layer, router,
request object and response class) it cost about 80 µs of the core more than a bare
Starlette route (docs/benchmarks.md, 2), and in a burst of 1,000 callers those answers
queue one after another. This middleware answers that one case itself, with the same
checks in the same order, and the same bytes:

- only ``GET`` without a query string, on exactly that path;
- only a service token (``Authorization: Bearer``, compared as ``auth.TokenSet`` does);
  a connect session, a wrong token or none goes the whole way (and gets its 401/403 there);
- only a well-formed group id and an enabled integration (else the whole way: 422/404);
- only what ``Credentials.cached`` can hand out with no I/O (else the whole way: the
  read, the refresh, the errors).

Anything else, or anything it is unsure of, is passed on untouched. It sits inside the
access log, so every request is logged as before.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from ..sessions import SESSION_PREFIX
from .auth import TokenSet, bearer_of
from .context import GROUP_ID, INTEGRATION

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["CredentialsFastPath"]

_PATH = re.compile(r"/groups/([^/]+)/integrations/([^/]+)/credentials")
_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


class CredentialsFastPath:
    def __init__(self, app: ASGIApp, broker: Broker, tokens: TokenSet) -> None:
        self.app = app
        self.broker = broker
        self.tokens = tokens
        self.answered = 0
        """Requests answered here (for tests and curiosity; not a metric)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and not scope.get("query_string")
        ):
            body = self._answer(scope)
            if body is not None:
                self.answered += 1
                await send({
                    "type": "http.response.start", "status": 200,
                    "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())],
                })
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _answer(self, scope: Scope) -> bytes | None:
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            return None
        token = _bearer(scope)
        if token is None or token.startswith(SESSION_PREFIX) or not self.tokens.matches(token):
            return None
        group_id, name = match.groups()
        if not (GROUP_ID.fullmatch(group_id) and INTEGRATION.fullmatch(name)):
            return None
        if name not in self.broker.registry:
            return None
        view = self.broker.tokens.cached(group_id, name)
        if view is None:
            return None
        # What starlette.responses.JSONResponse renders, byte for byte.
        return json.dumps(
            {"credentials": view}, ensure_ascii=False, allow_nan=False, indent=None,
            separators=(",", ":"),
        ).encode("utf-8")


def _bearer(scope: Scope) -> str | None:
    """The bearer token of the first Authorization header (as ``auth.bearer_token`` reads
    it, without building a ``Headers``)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_of(value.decode("latin-1"))
    return None
