"""In-memory records for the test authorization server, shaped for Authlib's mixins.

Everything lives in one :class:`Store` guarded by a re-entrant lock: the server thread mutates
it while handling requests and the test thread reads counters or revokes grants.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, TokenMixin
from authlib.oauth2.rfc6749.util import list_to_scope, scope_to_list


@dataclass(frozen=True)
class User:
    """A resource owner; any username typed on the consent page becomes one."""

    username: str

    def get_user_id(self) -> str:
        return self.username


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str | None
    redirect_uris: list[str]
    scopes: list[str]
    grant_types: list[str]
    token_endpoint_auth_method: str = "client_secret_basic"
    require_pkce: bool = True
    public_key: str | None = None  # PEM: checks this client's JWT-bearer assertions
    subjects: tuple[str, ...] = ()  # users its assertions may name in ``sub``

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # Only unambiguous when exactly one URI is registered (like most providers).
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        if not scope:
            return ""
        requested = scope_to_list(scope)
        if not set(requested) <= set(self.scopes):
            return None  # -> invalid_scope
        return str(list_to_scope(requested))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris  # exact string match

    def check_client_secret(self, client_secret: str) -> bool:
        if self.client_secret is None:
            return False
        return secrets.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        # Same method for the token and the revocation endpoints.
        return method == self.token_endpoint_auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass
class Family:
    """Every token descending from one authorization (code exchange or client_credentials)."""

    id: str
    client_id: str
    username: str | None
    grant_type: str
    revoked: bool = False
    revoked_reason: str | None = None
    last_rotated: str | None = None  # the refresh token most recently rotated out


@dataclass
class AuthorizationCode(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str | None
    scope: str
    username: str
    code_challenge: str | None
    code_challenge_method: str | None
    expires_at: float
    used: bool = False
    family: Family | None = None  # set once exchanged, so a replay can revoke it

    def get_redirect_uri(self) -> str | None:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at


@dataclass
class Token(TokenMixin):  # type: ignore[misc]
    access_token: str
    refresh_token: str | None
    client_id: str
    username: str | None
    scope: str
    family: Family
    issued_at: float
    access_expires_at: float
    refresh_expires_at: float | None = None
    access_revoked: bool = False
    refresh_rotated: bool = False  # this refresh token was used and replaced
    rotated_at: float | None = None  # when it was first replaced
    grant_type: str = ""  # the grant that issued this token
    presented: int = 0  # token requests that presented this refresh token

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return int(self.access_expires_at - self.issued_at)

    def is_expired(self) -> bool:
        return time.time() >= self.access_expires_at

    def is_revoked(self) -> bool:
        return self.access_revoked or self.family.revoked

    def refresh_expired(self) -> bool:
        return self.refresh_expires_at is not None and time.time() >= self.refresh_expires_at

    def get_user(self) -> User | None:
        return User(self.username) if self.username else None


@dataclass
class RequestRecord:
    """One request that reached an instrumented endpoint (token, revoke, api)."""

    endpoint: str
    method: str
    path: str
    headers: dict[str, str]
    params: dict[str, str]
    grant_type: str | None = None
    family_id: str | None = None
    fault: str | None = None
    status: int | None = None
    error: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def client_auth(self) -> str:
        """How the client authenticated: ``basic``, ``post`` or ``none``."""
        if self.headers.get("authorization", "").lower().startswith("basic "):
            return "basic"
        return "post" if "client_secret" in self.params else "none"


@dataclass
class Store:
    lock: threading.RLock = field(default_factory=threading.RLock)
    clients: dict[str, Client] = field(default_factory=dict)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    by_access: dict[str, Token] = field(default_factory=dict)
    by_refresh: dict[str, Token] = field(default_factory=dict)
    families: dict[str, Family] = field(default_factory=dict)
    # counters
    token_requests: Counter[str] = field(default_factory=Counter)
    refresh_requests: Counter[str] = field(default_factory=Counter)
    invalid_grant: int = 0
    reuse_detected: int = 0
    grace_reuses: int = 0
    requests: list[RequestRecord] = field(default_factory=list)
    installations: dict[int, tuple[str, str]] = field(default_factory=dict)  # id: (app, owner)
    app_token_requests: list[str] = field(default_factory=list)  # app JWTs presented
    signals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def new_family(self, client_id: str, username: str | None, grant_type: str) -> Family:
        fam = Family(secrets.token_hex(8), client_id, username, grant_type)
        self.families[fam.id] = fam
        return fam

    def revoke_family(self, fam: Family, reason: str) -> None:
        if not fam.revoked:
            fam.revoked = True
            fam.revoked_reason = reason

    def find_family(self, token_or_family: str) -> Family | None:
        if token_or_family in self.families:
            return self.families[token_or_family]
        tok = self.by_access.get(token_or_family) or self.by_refresh.get(token_or_family)
        return tok.family if tok else None
