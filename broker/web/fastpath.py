"""The credentials route's fast path: ``GET /groups/{g}/integrations/{name}/credentials``
with a service token, answered without the rest of the stack.

A node's read of a connection is the broker's hottest request. Through the whole stack
(the auth middleware's header parsing, Starlette's exception layer, router, request object
and response class) it cost about 80 µs of the core more than a bare Starlette route
(docs/benchmarks.md, 2), and in a burst of 1,000 callers of one expired connection those
requests are taken in, and answered, one after another on one core. This middleware
answers that one request itself, with the same checks in the same order, and the same
bytes:

- only ``GET`` without a query string (no ``force_refresh``), on exactly that path;
- only a service token (``Authorization: Bearer``, compared as ``auth.TokenSet`` does);
  a connect session, a wrong token or none goes the whole way (and gets its 401/403 there);
- only a well-formed group id and an enabled integration (else the whole way: 422/404);
- the credential as the route gets it: from the cache with no I/O when it can be
  (``Credentials.cached``), else through ``Credentials.get`` (the read, the single-flight
  refresh); its errors answered by ``errors.response_for``, as the app's handlers answer
  them.

Anything else is passed on untouched. It sits inside the access log, so every request is
logged as before.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from ..sessions import SESSION_PREFIX
from .auth import TokenSet, bearer_of
from .context import GROUP_ID, INTEGRATION
from .errors import response_for

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
        """Requests answered here, errors included (for tests and curiosity; not a
        metric)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = (
            self._target(scope)
            if scope["type"] == "http"
            and scope["method"] == "GET"
            and not scope.get("query_string")
            else None
        )
        if target is None:
            await self.app(scope, receive, send)
            return
        group_id, name = target
        self.answered += 1
        credentials = self.broker.tokens
        view = credentials.cached(group_id, name)
        if view is None:
            try:
                view = await credentials.get(group_id, self.broker.registry.get(name))
            except Exception as exc:
                await response_for(exc, "GET", scope["path"])(scope, receive, send)
                return
        # What starlette.responses.JSONResponse renders, byte for byte.
        body = json.dumps(
            {"credentials": view}, ensure_ascii=False, allow_nan=False, indent=None,
            separators=(",", ":"),
        ).encode("utf-8")
        await send({
            "type": "http.response.start", "status": 200,
            "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})

    def _target(self, scope: Scope) -> tuple[str, str] | None:
        """(group id, integration name) when this request is one the fast path answers."""
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
        return group_id, name


def _bearer(scope: Scope) -> str | None:
    """The bearer token of the first Authorization header (as ``auth.bearer_token`` reads
    it, without building a ``Headers``)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_of(value.decode("latin-1"))
    return None
