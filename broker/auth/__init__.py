"""Auth types: one module each, behind one protocol (``base.AuthKind``), found by name.

    apikey              values the user pastes (apikey.py)
    basic               a user name and a password, as Authorization: Basic (basic.py)
    oauth2              authorization code with a sign-in popup (oauth2.py)
    oauth2_cc           client credentials the user submits (client_credentials.py)
    token_exchange      fields exchanged at a token URL for a token (token_exchange.py)
    jwt_bearer          a signed assertion exchanged for a token, RFC 7523 (jwt_bearer.py)
    app_installation    the operator's app installed through the popup (app_installation.py)
    oauth1              OAuth 1.0a through the popup; requests signed by the broker (oauth1.py)

Adding a type is adding a module with its ``AuthKind`` and its provider schema, and naming
the module in ``MODULES``. ``kind(auth_type)`` gives the type of a provider or of a stored
connection; a connection stored under a type no module implements is handed to nodes as
it was stored.
"""

from __future__ import annotations

import importlib
from functools import cache

from .base import AuthKind

__all__ = ["AuthKind", "kind", "kinds"]

MODULES = (
    "apikey", "basic", "oauth2", "client_credentials", "token_exchange", "jwt_bearer",
    "app_installation", "oauth1",
)


class _Stored(AuthKind):
    """A type no module implements: stored and handed out as given, never renewed."""

    name = "stored"
    title = "Stored"


@cache
def kinds() -> dict[str, AuthKind]:
    """Every implemented auth type by name (modules imported on first use: they import
    the catalog, which asks this registry for its schemas)."""
    found: dict[str, AuthKind] = {}
    for module in MODULES:
        item: AuthKind = importlib.import_module(f"{__name__}.{module}").KIND
        found[item.name] = item
    return found


_STORED = _Stored()


def kind(auth_type: str) -> AuthKind:
    """The auth type named ``auth_type`` (a stored-as-given type for unknown names)."""
    return kinds().get(auth_type, _STORED)
