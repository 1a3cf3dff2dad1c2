"""Credential checks, one per route prefix, made the way provider APIs make them.

``authenticate`` returns the principal (None under ``/open``) or a :class:`Rejection`.
Bearer tokens are not known here: each one is sent to the test authorization server's
``/api/me`` (Authlib's resource protector) on every request, so a token revoked or expired
there is refused here at once. Rejections carry the status the gate answers: the configured
``reject_status`` for bad or missing credentials, 5xx when the check itself could not be made.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from .server import ApiServerConfig

SCHEMES = ("bearer", "key-header", "key-query", "basic", "session", "open")
API_KEY_HEADER = "x-api-key"
API_KEY_PARAM = "api_key"
SESSION_HEADER = "x-session-token"


@dataclass(frozen=True)
class Rejection:
    error: str  # the JSON body's "error"
    challenge: str | None = None  # WWW-Authenticate value, when the scheme has one
    status: int | None = None  # None: the configured reject_status


MISSING_BEARER = Rejection("missing_credentials", "Bearer")  # RFC 6750 3.1: no error code
INVALID_BEARER = Rejection("invalid_token", 'Bearer error="invalid_token"')
BASIC_CHALLENGE = 'Basic realm="apiserver"'


def _authorization(headers: Mapping[str, str], scheme: str) -> str | None:
    """The credentials after ``<scheme> `` in Authorization (scheme case-insensitive)."""
    value = headers.get("authorization", "")
    name, _, rest = value.strip().partition(" ")
    if name.lower() != scheme:
        return None
    return rest.strip() or None


def check_api_key(presented: str | None, keys: set[str]) -> str | Rejection:
    """The key itself is the principal."""
    if not presented:
        return Rejection("missing_credentials")
    if any(secrets.compare_digest(presented, key) for key in keys):
        return presented
    return Rejection("invalid_api_key")


def check_basic(headers: Mapping[str, str], users: Mapping[str, str]) -> str | Rejection:
    """The user name is the principal."""
    encoded = _authorization(headers, "basic")
    if encoded is None:
        return Rejection("missing_credentials", BASIC_CHALLENGE)
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return Rejection("invalid_credentials", BASIC_CHALLENGE)
    expected = users.get(user)
    if sep and expected is not None and secrets.compare_digest(password, expected):
        return user
    return Rejection("invalid_credentials", BASIC_CHALLENGE)


async def check_bearer(
    headers: Mapping[str, str], authserver_url: str | None, http: httpx.AsyncClient
) -> str | Rejection:
    """The ``sub`` the authorization server answers for the token is the principal."""
    token = _authorization(headers, "bearer")
    if token is None:
        return MISSING_BEARER
    if authserver_url is None:
        return Rejection("no_authserver_url_configured", status=500)
    try:
        resp = await http.get(
            authserver_url.rstrip("/") + "/api/me", headers={"Authorization": f"Bearer {token}"}
        )
    except httpx.HTTPError:
        return Rejection("token_validation_unavailable", status=502)
    if resp.status_code in (400, 401, 403):
        return INVALID_BEARER
    if resp.status_code != 200:
        return Rejection("token_validation_unavailable", status=502)
    sub = resp.json().get("sub")
    return str(sub) if sub else INVALID_BEARER


async def authenticate(
    scheme: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    config: ApiServerConfig,
    http: httpx.AsyncClient,
) -> str | Rejection | None:
    """Check the request's credentials for route prefix ``scheme`` (one of :data:`SCHEMES`)."""
    if scheme == "bearer":
        return await check_bearer(headers, config.authserver_url, http)
    if scheme == "key-header":
        return check_api_key(headers.get(API_KEY_HEADER), config.api_keys)
    if scheme == "key-query":
        return check_api_key(query.get(API_KEY_PARAM), config.api_keys)
    if scheme == "basic":
        return check_basic(headers, config.basic_users)
    if scheme == "session":
        token = headers.get(SESSION_HEADER)
        user = config.sessions.get(token) if token else None
        return user if user is not None else Rejection("invalid_session")
    return None
