"""An OAuth 1.0a provider (RFC 5849) on 127.0.0.1, built on Authlib's server classes: it
verifies every signature (HMAC-SHA1, HMAC-SHA256, RSA-SHA1, PLAINTEXT), nonces and
timestamps, so a wrongly signed call fails here as it would at Trello.

    POST /oauth/request_token     temporary credentials (oauth_callback required)
    GET  /oauth/authorize         approves at once for ``user`` and redirects to the
                                  callback with oauth_token and oauth_verifier
    POST /oauth/access_token      token credentials
    ANY  /api/me                  a protected resource: {"user", "form"} (the form body it
                                  verified as part of the signature, when one was sent)

``OAuth1Server(consumers={key: secret or RSA public PEM})``; ``requests`` counts calls to
each route and ``refused`` the protected calls refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from authlib.oauth1 import AuthorizationServer, ResourceProtector
from authlib.oauth1.errors import OAuth1Error
from authlib.oauth1.rfc5849.base_server import BaseServer
from authlib.oauth1.rfc5849.signature import generate_signature_base_string
from authlib.oauth1.rfc5849.util import escape
from authlib.oauth1.rfc5849.wrapper import OAuth1Request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.threaded_uvicorn import ThreadedUvicorn


def _verify_hmac_sha256(request: OAuth1Request) -> bool:
    if not request.client_secret:
        return False
    key = f"{escape(request.client_secret)}&{escape(request.token_secret or '')}"
    digest = hmac.new(key.encode(), generate_signature_base_string(request).encode(),
                      hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(digest).decode(), request.signature or "")


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


METHODS = {**BaseServer.SIGNATURE_METHODS, "HMAC-SHA256": _verify_hmac_sha256}
SUPPORTED = ["HMAC-SHA1", "HMAC-SHA256", "RSA-SHA1", "PLAINTEXT"]


@dataclass
class Consumer:
    key: str
    secret: str | None
    rsa_public_key: str | None = None

    def get_default_redirect_uri(self) -> str | None:
        return None

    def get_client_secret(self) -> str | None:
        return self.secret

    def get_rsa_public_key(self) -> str | None:
        return self.rsa_public_key


class Credential(dict[str, Any]):
    """A temporary or token credential (Authlib reads it through these methods)."""

    def get_client_id(self) -> str:
        return str(self["client_id"])

    def get_user_id(self) -> str | None:
        return self.get("user")

    def get_redirect_uri(self) -> str:
        return str(self["oauth_callback"])

    def check_verifier(self, verifier: str) -> bool:
        return hmac.compare_digest(str(self.get("oauth_verifier") or ""), verifier)

    def get_oauth_token(self) -> str:
        return str(self["oauth_token"])

    def get_oauth_token_secret(self) -> str:
        return str(self["oauth_token_secret"])


@dataclass
class State:
    consumers: dict[str, Consumer] = field(default_factory=dict)
    temporary: dict[str, Credential] = field(default_factory=dict)
    tokens: dict[str, Credential] = field(default_factory=dict)
    nonces: set[tuple[str, str, str]] = field(default_factory=set)


class _Nonces:
    state: State

    def get_client_by_id(self, client_id: str) -> Consumer | None:
        return self.state.consumers.get(client_id)

    def exists_nonce(self, nonce: str, request: OAuth1Request) -> bool:
        key = (request.client_id or "", request.timestamp or "", nonce)
        if key in self.state.nonces:
            return True
        self.state.nonces.add(key)
        return False


class _Server(_Nonces, AuthorizationServer):  # type: ignore[misc]
    SIGNATURE_METHODS = METHODS
    SUPPORTED_SIGNATURE_METHODS = SUPPORTED

    def __init__(self, state: State) -> None:
        self.state = state

    def create_oauth1_request(self, request: Any) -> OAuth1Request:
        return request if isinstance(request, OAuth1Request) else OAuth1Request(*request)

    def handle_response(self, status: int, payload: Any, headers: Any) -> Response:
        pairs = payload.items() if isinstance(payload, dict) else payload or []
        body = payload if isinstance(payload, str) else "&".join(
            f"{escape(str(k))}={escape(_text(v))}" for k, v in pairs)
        return Response(body, status, headers=dict(headers))

    def create_temporary_credential(self, request: OAuth1Request) -> Credential:
        cred = Credential(
            oauth_token="temp-" + secrets.token_urlsafe(12),
            oauth_token_secret=secrets.token_urlsafe(16),
            client_id=request.client_id, oauth_callback=request.redirect_uri,
        )
        self.state.temporary[cred["oauth_token"]] = cred
        return cred

    def get_temporary_credential(self, request: OAuth1Request) -> Credential | None:
        return self.state.temporary.get(request.token or "")

    def delete_temporary_credential(self, request: OAuth1Request) -> None:
        self.state.temporary.pop(request.token or "", None)

    def create_authorization_verifier(self, request: OAuth1Request) -> str:
        verifier = secrets.token_urlsafe(12)
        request.credential["oauth_verifier"] = verifier
        request.credential["user"] = request.user
        return verifier

    def create_token_credential(self, request: OAuth1Request) -> Credential:
        temporary = request.credential
        cred = Credential(
            oauth_token="tok-" + secrets.token_urlsafe(12),
            oauth_token_secret=secrets.token_urlsafe(16),
            client_id=temporary["client_id"], user=temporary["user"],
        )
        self.state.tokens[cred["oauth_token"]] = cred
        return cred


class _Protector(_Nonces, ResourceProtector):  # type: ignore[misc]
    SIGNATURE_METHODS = METHODS
    SUPPORTED_SIGNATURE_METHODS = SUPPORTED

    def __init__(self, state: State) -> None:
        self.state = state

    def get_token_credential(self, request: OAuth1Request) -> Credential | None:
        cred = self.state.tokens.get(request.token or "")
        return cred if cred is not None and cred["client_id"] == request.client_id else None


class OAuth1Server:
    def __init__(self, consumers: dict[str, str], *, user: str = "ada") -> None:
        self.state = State()
        for key, secret in consumers.items():
            rsa = secret if secret.startswith("-----BEGIN") else None
            self.state.consumers[key] = Consumer(key, None if rsa else secret, rsa)
        self.user = user
        self.requests: Counter[str] = Counter()
        self.refused = 0
        self._server = _Server(self.state)
        self._protector = _Protector(self.state)
        self._uvicorn = ThreadedUvicorn("oauth1server")
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OAuth1Server:
        self.port = self._uvicorn.start(self._app())
        return self

    def stop(self) -> None:
        self._uvicorn.stop()

    def _app(self) -> Starlette:
        async def snapshot(request: Request) -> tuple[str, str, str, Any]:
            # Headers, not a dict: Authlib looks them up as "Authorization"; the body as
            # text: Authlib reads form parameters (part of the signature) only from a str.
            body = (await request.body()).decode("utf-8", "replace")
            return request.method, str(request.url), body, request.headers

        async def request_token(request: Request) -> Response:
            self.requests["request_token"] += 1
            response: Response = self._server.create_temporary_credentials_response(
                await snapshot(request))
            return response

        async def authorize(request: Request) -> Response:
            self.requests["authorize"] += 1
            try:
                response: Response = self._server.create_authorization_response(
                    await snapshot(request), grant_user=self.user)
            except OAuth1Error as error:
                return self._server.handle_error_response(error)  # type: ignore[no-any-return]
            return response

        async def access_token(request: Request) -> Response:
            self.requests["access_token"] += 1
            response: Response = self._server.create_token_response(await snapshot(request))
            return response

        async def me(request: Request) -> Response:
            self.requests["api"] += 1
            method, url, body, headers = await snapshot(request)
            try:
                checked = self._protector.validate_request(method, url, body, headers)
            except OAuth1Error as error:
                self.refused += 1
                return JSONResponse({"error": error.error}, 401)
            form = dict(parse_qsl(body)) if headers.get(
                "content-type", "").startswith("application/x-www-form-urlencoded") else None
            return JSONResponse({"user": checked.credential["user"], "form": form,
                                 "at": time.time()})

        return Starlette(routes=[
            Route("/oauth/request_token", request_token, methods=["POST"]),
            Route("/oauth/authorize", authorize, methods=["GET"]),
            Route("/oauth/access_token", access_token, methods=["POST"]),
            Route("/api/me", me, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/api/me/{rest:path}", me, methods=["GET", "POST", "PUT", "DELETE"]),
        ])
