"""Token responses -> what the broker stores and what nodes get. Pure functions.

Lifetime rule: ``expires_in`` is used when it is a number (or a numeric string) between
``MIN_LIFETIME`` and ``MAX_LIFETIME`` seconds; a missing, unparseable, zero or negative value
gives the provider's ``default_lifetime_seconds``; larger values are capped at
``MAX_LIFETIME``. So every token has a defined expiry and none can cause a refresh loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

__all__ = [
    "MAX_LIFETIME",
    "MIN_LIFETIME",
    "dig",
    "lifetime_seconds",
    "node_view",
    "stored_token",
]

MIN_LIFETIME = 5
MAX_LIFETIME = 90 * 86400

# What a node may see of a stored OAuth2 credential (plus extra fields and settings).
NODE_KEYS = ("access_token", "token_type", "expires_at", "scope")


def dig(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for ``path="a.b"``; a step of digits indexes a list (``"0.id"``:
    the first item's ``id``). None when any step is missing."""
    for part in path.split("."):
        if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        elif isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        else:
            return None
    return obj


def lifetime_seconds(expires_in: Any, default: int) -> int:
    """The lifetime to assume for a token, per the module's rule."""
    if isinstance(expires_in, bool):  # JSON true is not a number (float(True) would be 1)
        return default
    try:
        value = float(expires_in)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float range
        return default
    if not math.isfinite(value) or value <= 0:
        return default
    return int(min(max(value, MIN_LIFETIME), MAX_LIFETIME))


def stored_token(
    response: Mapping[str, Any],
    *,
    now: datetime,
    default_lifetime: int,
    token_path: str | None = None,
    extra_fields: Mapping[str, str] | None = None,
    previous_refresh_token: str | None = None,
    previous_extra: Mapping[str, Any] | None = None,
    settings: Mapping[str, str] | None = None,
    expires: str = "when_told",
    renewable: bool = False,
) -> dict[str, Any]:
    """The credential to store from a token endpoint response.

    A token that does not expire has ``expires_at`` None: one whose provider says so
    (``expires="never"``), and one that comes with no usable ``expires_in`` and no refresh
    token (GitHub OAuth Apps, Slack without rotation) when nothing else could renew it
    (``renewable``: client credentials can be asked again; then the default lifetime).

    Raises ValueError (naming no value) when there is no access token.
    Keeps ``previous_refresh_token`` when the response carries none, and previous extra
    fields that a refresh response does not repeat.
    """
    token: Any = dig(response, token_path) if token_path else response
    if token is None and token_path and "access_token" in response:
        # Some providers nest the token in the code exchange but not in refresh responses
        # (Slack with token rotation): a flat response is taken as it is.
        token = response
    if not isinstance(token, Mapping):
        raise ValueError(f"token response has no {token_path!r} object")
    access_token = token.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise ValueError("token response has no access_token")
    refresh_token = token.get("refresh_token") or previous_refresh_token
    told = lifetime_seconds(token.get("expires_in"), 0)
    never = expires == "never" or (not told and not refresh_token and not renewable)
    lifetime = None if never else told or lifetime_seconds(None, default_lifetime)
    scope = token.get("scope", response.get("scope"))
    stored: dict[str, Any] = {
        "access_token": access_token,
        "token_type": str(token.get("token_type") or "Bearer"),
        "expires_at": (
            None if lifetime is None else int((now + timedelta(seconds=lifetime)).timestamp())
        ),
        "scope": scope if isinstance(scope, str) else None,
        "lifetime": lifetime,
    }
    if isinstance(refresh_token, str) and refresh_token:
        stored["refresh_token"] = refresh_token
    extra = {name: dig(response, path) for name, path in (extra_fields or {}).items()}
    stored["extra"] = {
        **(previous_extra or {}),
        **{k: v for k, v in extra.items() if v is not None},
    }
    stored["settings"] = dict(settings or {})
    return stored


def node_view(stored: Mapping[str, Any]) -> dict[str, Any]:
    """What a node gets: never the refresh token or a client secret."""
    view = {key: stored.get(key) for key in NODE_KEYS}
    view.update(stored.get("settings") or {})
    view.update(stored.get("extra") or {})
    return view
