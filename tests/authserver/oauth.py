"""Authlib's server classes wired to Starlette-independent request snapshots and the store.

Starlette reads request bodies asynchronously while Authlib is synchronous, so each route
first awaits the body into an :class:`HTTPSnapshot`; :class:`OAuthServer` (the framework
adapter: ``create_oauth2_request`` / ``create_json_request`` / ``handle_response`` /
``send_signal``) then runs Authlib synchronously on that snapshot.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authlib.common.security import generate_token
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    InvalidGrantError,
    InvalidRequestError,
    JsonPayload,
    JsonRequest,
    OAuth2Payload,
    OAuth2Request,
    ResourceProtector,
    grants,
)
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerGrant
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from joserfc import jwk
from starlette.datastructures import Headers
from starlette.responses import Response

from .models import AuthorizationCode, Client, Store, Token, User

if TYPE_CHECKING:
    from .server import AuthServerConfig

ALL_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]


# --------------------------------------------------------------------------- requests


@dataclass
class HTTPSnapshot:
    """A fully read HTTP request (body already awaited)."""

    method: str
    url: str
    headers: Headers
    query: list[tuple[str, str]]
    body: list[tuple[str, str]]  # form fields, or a JSON object's members as strings
    include_query: bool = False  # authorization endpoint: parameters from query + body


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._data: dict[str, str] = {}
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in pairs:
            self._data.setdefault(key, value)
            self._datalist[key].append(value)

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class SnapshotOAuth2Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, snap: HTTPSnapshot) -> None:
        super().__init__(method=snap.method, uri=snap.url, headers=snap.headers)
        self._snap = snap
        pairs = (snap.query + snap.body) if snap.include_query else snap.body
        self.payload = _Payload(pairs)
        self._form = dict(reversed(snap.body))  # first value wins

    @property
    def args(self) -> dict[str, str]:
        return dict(reversed(self._snap.query))

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _JsonPayload(JsonPayload):  # type: ignore[misc]
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


class SnapshotJsonRequest(JsonRequest):  # type: ignore[misc]
    def __init__(self, snap: HTTPSnapshot) -> None:
        super().__init__(snap.method, snap.url, snap.headers)
        self.payload = _JsonPayload(dict(snap.body))


class OAuth2Response(Response):
    """A Starlette response that keeps Authlib's raw payload and exposes ``location``
    (Authlib's RFC 9207 ``IssuerParameter`` hook rewrites ``response.location``)."""

    def __init__(self, status: int, payload: Any, headers: list[tuple[str, str]]) -> None:
        self.payload = payload
        content = json.dumps(payload) if isinstance(payload, dict) else (payload or "")
        super().__init__(content, status_code=status, headers=dict(headers))

    @property
    def location(self) -> str | None:
        return self.headers.get("location")

    @location.setter
    def location(self, value: str) -> None:
        self.headers["location"] = value


# --------------------------------------------------------------------------- grants


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS

    @property
    def _srv(self) -> OAuthServer:
        return self.server  # type: ignore[no-any-return]

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        self._srv.store.codes[code] = AuthorizationCode(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.scope or "",
            username=request.user.username,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
            expires_at=time.time() + self._srv.config.code_lifetime,
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        rec = self._srv.store.codes.get(code)
        if rec is None or rec.client_id != client.client_id:
            return None
        if rec.used:
            # RFC 6749 §4.1.2: a replayed code SHOULD revoke what it produced.
            if rec.family is not None:
                self._srv.store.revoke_family(rec.family, "code_reuse")
            return None
        if rec.is_expired():
            return None
        return rec

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        authorization_code.used = True  # kept (not deleted) so a replay is recognised

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User:
        return User(authorization_code.username)


class PKCE(CodeChallenge):  # type: ignore[misc]
    """S256 only; a client registered with ``require_pkce`` must send a challenge."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        challenge = data.get("code_challenge")
        if not challenge and grant.request.client.require_pkce:
            raise InvalidRequestError("Missing 'code_challenge'", redirect_uri=redirect_uri)
        if challenge and not data.get("code_challenge_method"):
            # Authlib would default to "plain", which this server does not support.
            raise InvalidRequestError("'code_challenge_method' must be S256")
        super().validate_code_challenge(grant, redirect_uri)


class RefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS

    @property
    def INCLUDE_NEW_REFRESH_TOKEN(self) -> bool:  # Authlib reads this attribute
        return bool(self.server.config.rotate_refresh_tokens)

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        store: Store = self.server.store
        tok = store.by_refresh.get(refresh_token)
        if tok is None or tok.family.revoked:
            return None
        if tok.refresh_rotated:
            grace = self.server.config.refresh_token_reuse_grace
            if (
                grace
                and tok.family.last_rotated == refresh_token
                and time.time() - (tok.rotated_at or 0.0) <= grace
            ):
                # Within the grace period the token last rotated out still works (a
                # client that lost the answer retries with it): not taken for a replay.
                store.grace_reuses += 1
                return tok if not tok.refresh_expired() else None
            # Reuse of a rotated refresh token: revoke the whole family (RFC 9700 §4.14.2).
            store.revoke_family(tok.family, "refresh_token_reuse")
            store.reuse_detected += 1
            raise InvalidGrantError("Refresh token reuse detected; the grant was revoked.")
        if tok.refresh_expired():
            return None
        return tok

    def authenticate_user(self, refresh_token: Token) -> User | None:
        return refresh_token.get_user()

    def revoke_old_credential(self, refresh_token: Token) -> None:
        if self.server.config.rotate_refresh_tokens:
            refresh_token.refresh_rotated = True
            if refresh_token.rotated_at is None:
                refresh_token.rotated_at = time.time()
            refresh_token.family.last_rotated = refresh_token.refresh_token


class ClientCredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012


class JwtBearerGrant(JWTBearerGrant):  # type: ignore[misc]
    """RFC 7523: the assertion's ``iss`` names the client; its signature is checked against
    the client's registered public key; ``aud`` must be this server's token endpoint;
    ``exp`` and ``iat`` within Authlib's 60 s leeway."""

    def resolve_issuer_client(self, issuer: str) -> Client | None:
        client: Client | None = self.server.store.clients.get(issuer)
        return client if client is not None and client.public_key else None

    def resolve_client_public_key(self, client: Client) -> Any:
        assert client.public_key is not None
        try:
            return jwk.import_key(client.public_key, "RSA")
        except ValueError:
            return jwk.import_key(client.public_key, "EC")

    def authenticate_user(self, subject: str) -> User | None:
        client: Client = self.request.client  # set from ``iss`` before this is asked
        return User(subject) if subject in client.subjects else None

    def has_granted_permission(self, client: Client, user: User) -> bool:
        return True

    def get_audiences(self) -> list[str]:
        return [self.server.issuer() + "/token"]


class Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = ALL_AUTH_METHODS

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        store: Store = self.server.store
        if token_type_hint == "refresh_token":
            return store.by_refresh.get(token_string) or store.by_access.get(token_string)
        return store.by_access.get(token_string) or store.by_refresh.get(token_string)

    def revoke_token(self, token: Token, request: OAuth2Request) -> None:
        store: Store = self.server.store
        if request.form.get("token") == token.refresh_token:
            # RFC 7009 §2.1: revoking a refresh token drops the whole grant.
            store.revoke_family(token.family, "revoked_refresh_token")
        else:
            token.access_revoked = True


class _Issuer(IssuerParameter):  # type: ignore[misc]
    def __init__(self, get_issuer: Callable[[], str | None]) -> None:
        self._get = get_issuer

    def get_issuer(self) -> str | None:
        return self._get()


class _BearerValidator(BearerTokenValidator):  # type: ignore[misc]
    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    def authenticate_token(self, token_string: str) -> Token | None:
        return self.store.by_access.get(token_string)


# --------------------------------------------------------------------------- server


class OAuthServer(AuthorizationServer):  # type: ignore[misc]
    """Authlib AuthorizationServer with the framework-adapter methods implemented."""

    def __init__(self, store: Store, config: AuthServerConfig, issuer: Callable[[], str]) -> None:
        super().__init__()
        self.store = store
        self.config = config
        self.issuer = issuer
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                lambda **_: "at_" + generate_token(32),
                lambda **_: "rt_" + generate_token(40),
                self._expires_in,
            ),
        )
        self.register_grant(AuthorizationCodeGrant, [PKCE(required=True)])
        self.register_grant(RefreshTokenGrant)
        self.register_grant(ClientCredentialsGrant)
        self.register_grant(JwtBearerGrant)
        self.register_endpoint(Revocation)
        self.register_extension(_Issuer(lambda: self.issuer() if self.config.include_iss else None))
        self.resource_protector = ResourceProtector()
        self.resource_protector.register_token_validator(_BearerValidator(store))

    def _expires_in(self, client: Client, grant_type: str) -> int:
        # 0 makes BearerTokenGenerator leave ``expires_in`` out of the response.
        if not self.config.include_expires_in:
            return 0
        return max(1, math.ceil(self.config.access_token_lifetime))

    # -- storage hooks
    def query_client(self, client_id: str) -> Client | None:
        return self.store.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        now = time.time()
        old: Token | None = request.refresh_token
        refresh = token.get("refresh_token")
        refresh_expires_at = None
        if old is not None:
            family = old.family
            if refresh is None:  # no rotation: the same refresh token keeps working
                refresh, refresh_expires_at = old.refresh_token, old.refresh_expires_at
        else:
            user = request.user
            family = self.store.new_family(
                request.client.client_id,
                user.username if user else None,
                request.payload.grant_type,
            )
            if request.authorization_code is not None:
                request.authorization_code.family = family
        if refresh and refresh_expires_at is None and self.config.refresh_token_lifetime:
            refresh_expires_at = now + self.config.refresh_token_lifetime
        rec = Token(
            access_token=token["access_token"],
            refresh_token=refresh,
            client_id=request.client.client_id,
            username=request.user.username if request.user else None,
            scope=token.get("scope", ""),
            family=family,
            issued_at=now,
            access_expires_at=now + self.config.access_token_lifetime,
            refresh_expires_at=refresh_expires_at,
            grant_type=request.payload.grant_type or "",
        )
        self.store.by_access[rec.access_token] = rec
        if refresh:
            self.store.by_refresh[refresh] = rec

    # -- framework adapter
    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        return SnapshotOAuth2Request(request)

    def create_json_request(self, request: Any) -> JsonRequest:
        return SnapshotJsonRequest(request)

    def handle_response(
        self, status: int, body: Any, headers: list[tuple[str, str]]
    ) -> OAuth2Response:
        return OAuth2Response(status, body, headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        client = kwargs.get("client")
        self.store.signals.append((name, {"client_id": getattr(client, "client_id", None)}))
