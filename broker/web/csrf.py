"""Requests a browser makes only from the broker's own pages.

Starting a sign-in (``POST /oauth/start``) must come from a page the broker served — the
popup's start page, or the connect page — never from a form or script on another site
that a person was lured to. Browsers say where a request comes from: ``Origin`` on every
POST (``fetch`` and forms alike), and ``Sec-Fetch-Site``. Neither can be set by a page's
script, so a cross-site page cannot pass for the broker's own. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["from_own_origin"]


def from_own_origin(headers: Mapping[str, str], own_origin: str) -> bool:
    """Whether the browser says this request came from ``own_origin`` (the broker's
    ``public_url`` origin). A request that says nothing is refused."""
    origin = headers.get("origin")
    if origin is not None:
        return origin.lower() == own_origin.lower()
    return headers.get("sec-fetch-site") == "same-origin"
