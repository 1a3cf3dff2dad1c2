"""App installations, the way GitHub Apps work, on the test authorization server.

    GET  /apps/{slug}/installations/new?state=   the install page: installs the app for
         ``config.install_user`` and sends the browser to the app's callback URL with
         ``installation_id`` (``config.install_id``, or a new one), ``setup_action``
         (``config.install_action``), ``state`` and a ``code`` for that user (the app
         requests user authorization during installation)
    GET  /user/installations                     the installations the user token's user
         can access: {"total_count", "installations": [{"id", "app_slug"}]}
    POST /app/installations/{id}/access_tokens   with the app's JWT (RS256, checked against
         the app's public key: iss = its client id, exp at most 10 minutes after iat, not
         expired, iat not in the future beyond 60 s): 201 {"token", "expires_at"}, a token
         of one hour that /api/me (so the API server's /bearer routes) accepts; 401 for a
         bad JWT, 404 for an installation of another app or none

Apps are clients registered with ``public_key`` and listed in ``config.app_slugs``.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from authlib.common.urls import add_params_to_uri
from joserfc import jwk, jwt
from joserfc.errors import JoseError
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .models import AuthorizationCode, Token

if TYPE_CHECKING:
    from .server import AuthServer

LEEWAY = 60


def app_routes(srv: AuthServer) -> list[Route]:
    store, cfg = srv.store, srv.config

    async def install(request: Request) -> Response:
        client_id = cfg.app_slugs.get(request.path_params["slug"])
        client = store.clients.get(client_id or "")
        if client is None or not client.redirect_uris:
            return JSONResponse({"message": "Not Found"}, 404)
        with store.lock:
            installation = cfg.install_id
            if installation is None:
                installation = max(store.installations, default=0) + 1
                store.installations[installation] = (client.client_id, cfg.install_user)
            code = "code_" + secrets.token_urlsafe(16)
            store.codes[code] = AuthorizationCode(
                code=code, client_id=client.client_id, redirect_uri=None, scope="",
                username=cfg.install_user, code_challenge=None, code_challenge_method=None,
                expires_at=time.time() + 60,
            )
        params = [("installation_id", str(installation)), ("setup_action", cfg.install_action),
                  ("code", code)]
        state = request.query_params.get("state")
        if state is not None:
            params.append(("state", state))
        return RedirectResponse(add_params_to_uri(client.redirect_uris[0], params), 302)

    async def user_installations(request: Request) -> Response:
        given = request.headers.get("authorization", "")
        tok = store.by_access.get(given.removeprefix("Bearer ").strip())
        if tok is None or tok.is_expired() or tok.is_revoked() or tok.username is None:
            return JSONResponse({"message": "Bad credentials"}, 401)
        with store.lock:
            mine = [
                {"id": i, "app_slug": next(
                    (s for s, c in cfg.app_slugs.items() if c == app), None)}
                for i, (app, owner) in sorted(store.installations.items())
                if owner == tok.username and app == tok.client_id
            ]
        return JSONResponse({"total_count": len(mine), "installations": mine})

    async def access_tokens(request: Request) -> Response:
        installation = int(request.path_params["installation_id"])
        given = request.headers.get("authorization", "")
        assertion = given.removeprefix("Bearer ").strip()
        with store.lock:
            store.app_token_requests.append(assertion)
            owner = store.installations.get(installation)
        client = store.clients.get(owner[0]) if owner else None
        if client is None or client.public_key is None:
            return JSONResponse({"message": "Not Found"}, 404)
        now = time.time()
        try:
            claims = jwt.decode(assertion, jwk.import_key(client.public_key, "RSA")).claims
        except (JoseError, ValueError):
            return JSONResponse({"message": "A JSON web token could not be decoded"}, 401)
        iat, exp = claims.get("iat"), claims.get("exp")
        if (
            claims.get("iss") != client.client_id
            or not isinstance(iat, int) or not isinstance(exp, int)
            or exp - iat > 600 or exp <= now - LEEWAY or iat > now + LEEWAY
        ):
            return JSONResponse({"message": "'Expiration time' claim ('exp') is too far "
                                 "in the future, or the JWT is otherwise invalid"}, 401)
        token = "ghs_" + secrets.token_urlsafe(24)
        with store.lock:
            family = store.new_family(client.client_id, f"installation-{installation}",
                                      "installation")
            store.by_access[token] = Token(
                access_token=token, refresh_token=None, client_id=client.client_id,
                username=f"installation-{installation}", scope="", family=family,
                issued_at=now, access_expires_at=now + 3600, grant_type="installation",
            )
        expires = datetime.fromtimestamp(now + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return JSONResponse({"token": token, "expires_at": expires,
                             "permissions": {"contents": "read"}}, 201)

    return [
        Route("/apps/{slug}/installations/new", install, methods=["GET"]),
        Route("/user/installations", user_installations, methods=["GET"]),
        Route("/app/installations/{installation_id:int}/access_tokens", access_tokens,
              methods=["POST"]),
    ]
