"""The test authorization server: lifecycle (uvicorn in a thread) and the Python API tests use."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import httpx

from tests.threaded_uvicorn import ThreadedUvicorn

from .app import build_app
from .consent import adrive_consent, drive_consent
from .faults import Fault, Faults
from .models import Client, RequestRecord, Store, Token
from .oauth import OAuthServer


@dataclass
class AuthServerConfig:
    """Behaviour knobs; read on every request, so tests may change them at runtime."""

    access_token_lifetime: float = 3600.0  # seconds; ``expires_in`` is its ceiling
    include_expires_in: bool = True  # False: token responses carry no ``expires_in``
    refresh_token_lifetime: float | None = None  # None: refresh tokens never expire
    rotate_refresh_tokens: bool = True  # False: the same refresh token stays valid
    # Seconds a rotated refresh token is still accepted (a fresh token is issued again)
    # instead of being taken for a replay, for the family's most recently rotated token
    # only: Okta's grace period, Auth0's reuse interval, Xero's 30 minutes. 0: none.
    refresh_token_reuse_grace: float = 0.0
    code_lifetime: float = 60.0
    auto_approve: bool = False  # /authorize redirects at once, user = login_hint or below
    auto_approve_user: str = "alice"
    include_iss: bool = True  # RFC 9207 ``iss`` on authorization responses
    accept_json_token_requests: bool = False  # token endpoint also parses JSON bodies
    response_shape: Literal["standard", "slack"] = "standard"
    slack_errors_as_200: bool = False  # slack shape: errors as 200 {"ok": false, "error"}
    team_id: str = "T0TEST"
    extra_token_fields: dict[str, Any] = field(default_factory=dict)  # e.g. instance_url
    callback_params: dict[str, str] = field(default_factory=dict)  # e.g. realmId, on success
    # App installations (apps.py): slug -> the app's client id; who installs; which id the
    # install page reports (None: a new installation of install_user's); setup_action.
    app_slugs: dict[str, str] = field(default_factory=dict)
    install_user: str = "alice"
    install_id: int | None = None
    install_action: str = "install"


class AuthServer:
    """A real OAuth2 authorization server (Authlib) on a free 127.0.0.1 port."""

    def __init__(self, config: AuthServerConfig | None = None, **overrides: Any) -> None:
        self.config = config or AuthServerConfig()
        for key, value in overrides.items():
            if not hasattr(self.config, key):
                raise TypeError(f"unknown AuthServerConfig field {key!r}")
            setattr(self.config, key, value)
        self.store = Store()
        self.faults = Faults()
        self.port = 0
        self.oauth = OAuthServer(self.store, self.config, lambda: self.issuer)
        self._uvicorn = ThreadedUvicorn("authserver")
        self._http: httpx.Client | None = None  # the consent user agent, made on first use

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.base_url

    @property
    def authorize_endpoint(self) -> str:
        return self.base_url + "/authorize"

    @property
    def token_endpoint(self) -> str:
        return self.base_url + "/token"

    @property
    def revocation_endpoint(self) -> str:
        return self.base_url + "/revoke"

    @property
    def userinfo_endpoint(self) -> str:
        return self.base_url + "/api/me"

    @property
    def metadata_url(self) -> str:
        return self.base_url + "/.well-known/oauth-authorization-server"

    def start(self) -> AuthServer:
        self.port = self._uvicorn.start(build_app(self))
        return self

    def stop(self) -> None:
        self._uvicorn.stop()
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> AuthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def sleep(self, seconds: float) -> None:
        """Sleep in the server loop, cut short when the server stops."""
        await self._uvicorn.sleep(seconds)

    # ------------------------------------------------------------------ clients
    def register_client(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        redirect_uris: Iterable[str] = ("http://127.0.0.1/callback",),
        scopes: Iterable[str] = ("read", "write"),
        grant_types: Iterable[str] = ("authorization_code", "refresh_token"),
        token_endpoint_auth_method: str = "client_secret_basic",
        require_pkce: bool = True,
        public_key: str | None = None,
        subjects: Iterable[str] = (),
    ) -> Client:
        """Register (or replace) a client. Secrets are generated when omitted;
        ``token_endpoint_auth_method``: client_secret_basic | client_secret_post | none."""
        if token_endpoint_auth_method not in ("client_secret_basic", "client_secret_post", "none"):
            raise ValueError(token_endpoint_auth_method)
        client = Client(
            client_id=client_id or "client_" + secrets.token_hex(4),
            client_secret=None
            if token_endpoint_auth_method == "none"
            else client_secret or secrets.token_urlsafe(24),
            redirect_uris=list(redirect_uris),
            scopes=list(scopes),
            grant_types=list(grant_types),
            token_endpoint_auth_method=token_endpoint_auth_method,
            require_pkce=require_pkce,
            public_key=public_key,
            subjects=tuple(subjects),
        )
        with self.store.lock:
            self.store.clients[client.client_id] = client
        return client

    def authorize_url(
        self,
        client: Client | str,
        *,
        redirect_uri: str | None = None,
        scope: str | None = None,
        state: str | None = None,
        code_challenge: str | None = None,
        login_hint: str | None = None,
        **extra: str,
    ) -> str:
        """Build an authorization request URL (S256 when a challenge is given)."""
        client_id = client if isinstance(client, str) else client.client_id
        params: dict[str, str] = {"response_type": "code", "client_id": client_id}
        if redirect_uri is None and not isinstance(client, str):
            redirect_uri = client.redirect_uris[0]
        for key, value in (
            ("redirect_uri", redirect_uri),
            ("scope", scope),
            ("state", state),
            ("login_hint", login_hint),
        ):
            if value is not None:
                params[key] = value
        if code_challenge is not None:
            params["code_challenge"] = code_challenge
            params["code_challenge_method"] = "S256"
        params.update(extra)
        return f"{self.authorize_endpoint}?{urlencode(params)}"

    def consent(
        self,
        url: str,
        username: str = "alice",
        *,
        approve: bool = True,
        http: httpx.Client | None = None,
    ) -> str:
        """Act as the user agent: open ``url``, fill the login form, press Allow/Deny.
        Returns the redirect (``Location``) to the client's redirect_uri, unfollowed."""
        if http is None:
            if self._http is None:
                self._http = httpx.Client(timeout=10)
            http = self._http
        return drive_consent(url, username, approve, http)

    async def aconsent(
        self,
        url: str,
        username: str = "alice",
        *,
        approve: bool = True,
        http: httpx.AsyncClient | None = None,
    ) -> str:
        """Async variant of :meth:`consent`."""
        return await adrive_consent(url, username, approve, http)

    # ------------------------------------------------------------------ server-side actions
    def revoke_access_token(self, access_token: str) -> bool:
        """Stop accepting one access token, its grant and refresh token untouched (a
        provider revoking a session, or a token it lost track of). True when it existed."""
        with self.store.lock:
            token = self.store.by_access.get(access_token)
            if token is None:
                return False
            token.access_revoked = True
            return True

    def revoke_user_grants(self, username: str, client_id: str | None = None) -> int:
        """Revoke every grant of ``username`` (optionally for one client), like a user
        removing the app at the provider. Returns how many grants were revoked."""
        n = 0
        with self.store.lock:
            for fam in self.store.families.values():
                if (
                    fam.username == username
                    and not fam.revoked
                    and (client_id is None or fam.client_id == client_id)
                ):
                    self.store.revoke_family(fam, "revoked_by_user")
                    n += 1
            for code in self.store.codes.values():
                if code.username == username and (client_id is None or code.client_id == client_id):
                    code.used = True
        return n

    def expire_access_tokens(self, username: str | None = None) -> None:
        """Make current access tokens expired now (no sleeping in tests)."""
        now = time.time()
        with self.store.lock:
            for tok in self.store.by_access.values():
                if username is None or tok.username == username:
                    tok.access_expires_at = min(tok.access_expires_at, now)

    def is_grant_revoked(self, token_or_family: str) -> bool:
        with self.store.lock:
            fam = self.store.find_family(token_or_family)
            if fam is None:
                raise KeyError(token_or_family)
            return fam.revoked

    # ------------------------------------------------------------------ faults
    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        endpoint: str = "token",
        grant_type: str | None = None,
        body: str | None = None,
    ) -> Fault:
        """The next ``n`` matching requests get ``status`` without being processed."""
        return self.faults.add(Fault("error", n, endpoint, grant_type, status=status, body=body))

    def rate_limit_next(
        self,
        n: int = 1,
        retry_after: float = 1,
        *,
        endpoint: str = "token",
        grant_type: str | None = None,
    ) -> Fault:
        """The next ``n`` matching requests get 429 with ``Retry-After``."""
        return self.faults.add(
            Fault("error", n, endpoint, grant_type, status=429, retry_after=retry_after)
        )

    def timeout_next(
        self,
        n: int = 1,
        seconds: float = 5.0,
        *,
        process: bool = False,
        endpoint: str = "token",
        grant_type: str | None = None,
    ) -> Fault:
        """Stall the next ``n`` matching requests ``seconds`` (for client timeouts), then
        answer 504. ``process=True``: handle the request first (e.g. rotate the refresh
        token) and stall the real response, like a reply lost on the way back."""
        return self.faults.add(
            Fault("timeout", n, endpoint, grant_type, seconds=seconds, process=process)
        )

    def delay_next(
        self,
        n: int = 1,
        seconds: float = 0.5,
        *,
        endpoint: str = "token",
        grant_type: str | None = None,
    ) -> Fault:
        """Answer the next ``n`` matching requests normally, after ``seconds``."""
        return self.faults.add(Fault("delay", n, endpoint, grant_type, seconds=seconds))

    def clear_faults(self) -> None:
        self.faults.clear()

    # ------------------------------------------------------------------ counters
    @property
    def token_requests(self) -> Counter[str]:
        """Token endpoint requests by ``grant_type`` (faulted ones included)."""
        with self.store.lock:
            return Counter(self.store.token_requests)

    @property
    def invalid_grant_count(self) -> int:
        with self.store.lock:
            return self.store.invalid_grant

    @property
    def grace_reuses(self) -> int:
        """How many times a rotated refresh token was accepted within the grace period."""
        with self.store.lock:
            return self.store.grace_reuses

    def unused_refresh_answers(self) -> list[Token]:
        """The tokens issued in answer to a refresh request whose refresh token was never
        presented since: answers the client has not used. A family's newest answer is one
        until the client refreshes again; any other is an answer the client never got, or
        lost before storing it."""
        with self.store.lock:
            return [
                t for t in self.store.by_refresh.values()
                if t.grant_type == "refresh_token" and t.presented == 0
            ]

    @property
    def reuse_detections(self) -> int:
        """How many times a rotated refresh token was replayed (grant then revoked)."""
        with self.store.lock:
            return self.store.reuse_detected

    def family_of(self, token: str) -> str | None:
        """Grant-family id of an access or refresh token."""
        with self.store.lock:
            fam = self.store.find_family(token)
            return fam.id if fam else None

    def refresh_requests_for(self, token_or_family: str) -> int:
        """refresh_token requests (faulted ones included) for the grant family of the
        given access/refresh token or family id."""
        with self.store.lock:
            fam = self.store.find_family(token_or_family)
            return self.store.refresh_requests[fam.id] if fam else 0

    @property
    def refresh_requests(self) -> Counter[str]:
        with self.store.lock:
            return Counter(self.store.refresh_requests)

    def requests_seen(self, endpoint: str | None = None) -> list[RequestRecord]:
        """Copy of the request log (``endpoint``: "token", "revoke" or "api")."""
        with self.store.lock:
            return [r for r in self.store.requests if endpoint in (None, r.endpoint)]

    def reset_counters(self) -> None:
        with self.store.lock:
            self.store.token_requests.clear()
            self.store.refresh_requests.clear()
            self.store.invalid_grant = 0
            self.store.reuse_detected = 0
            self.store.grace_reuses = 0
            self.store.requests.clear()

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, Any]:
        """RFC 8414 metadata (+ RFC 9207 flag)."""
        auth_methods = ["client_secret_basic", "client_secret_post", "none"]
        with self.store.lock:
            scopes = sorted({s for c in self.store.clients.values() for s in c.scopes})
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorize_endpoint,
            "token_endpoint": self.token_endpoint,
            "revocation_endpoint": self.revocation_endpoint,
            "scopes_supported": scopes,
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "token_endpoint_auth_methods_supported": auth_methods,
            "revocation_endpoint_auth_methods_supported": auth_methods,
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": self.config.include_iss,
        }
