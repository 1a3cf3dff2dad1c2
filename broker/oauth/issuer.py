"""Whether a callback's ``iss`` fits the flow's provider (RFC 9207, mix-up defence).

Every provider shares one redirect URI, so a code that arrives under a flow's state may
come from another authorization server: a malicious or compromised provider that forwarded
the browser to an honest one with the broker's client id there and its own flow's state.
Exchanging that code at the flow's provider would hand the honest provider's code (and the
PKCE verifier) to the attacker. ``iss`` says who issued the code; ``check_issuer`` decides,
before any token request, whether it may have come from the flow's provider:

- a provider with ``issuer`` configured: ``iss`` must be exactly that (RFC 9207 §2.4,
  simple string comparison); a missing ``iss`` is refused when ``issuer_in_response``
  says the provider always sends one;
- any other provider's configured ``issuer`` is refused, even from the same origin (two
  providers that are one server must both say so, with the same ``issuer``);
- a provider without ``issuer``: an ``iss`` must come from the origin (scheme, host, port)
  of the provider's authorization URL, the server the browser was sent to. The origin,
  not the whole value, is compared: a server's issuer identifier is often its origin plus
  a path (a tenant, a realm) that the broker cannot know without ``issuer``, and a mix-up
  needs a server on another origin. An ``iss`` from another provider's authorization
  origin is named as that provider's in the refusal;
- no ``iss`` and nothing that requires one: accepted (most providers do not send it).

Pure: no I/O; the caller passes the specs of the other enabled providers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..catalog import OAuth2Provider, render_url, template_names

__all__ = ["IssuerRefusal", "check_issuer", "origin_of"]


@dataclass(frozen=True)
class IssuerRefusal:
    """Why a callback's ``iss`` was refused. ``reason`` names providers, never the value
    received (it came from the browser)."""

    missing: bool
    """True when ``iss`` was absent although the provider always sends one."""
    reason: str
    other: str | None = None
    """The other enabled provider the ``iss`` belongs to, when it is one."""


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute http(s) URL, lower-cased, default port
    dropped; None when ``url`` is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _authorization_origin(spec: OAuth2Provider, settings: Mapping[str, str]) -> str | None:
    url = spec.authorization_url
    if template_names(url):
        if not set(template_names(url)) <= set(settings):
            return None  # another provider's per-connection host: unknown here
        url = render_url(url, settings)
    return origin_of(url)


def check_issuer(
    iss: str | None,
    spec: OAuth2Provider,
    others: Iterable[OAuth2Provider],
    *,
    settings: Mapping[str, str] | None = None,
) -> IssuerRefusal | None:
    """None when a callback carrying ``iss`` may finish a flow of ``spec``; otherwise why not.

    ``others``: the other enabled OAuth2 providers (``spec`` itself among them is ignored).
    ``settings``: the flow's per-connection settings, which fill a templated authorization
    URL (a subdomain) before its origin is taken.
    """
    settings = settings or {}
    if iss is None:
        if spec.issuer is not None and spec.issuer_in_response:
            return IssuerRefusal(
                missing=True,
                reason=f"{spec.name} always sends iss (issuer_in_response) and none came",
            )
        return None
    if spec.issuer is not None and iss == spec.issuer:
        return None
    others = [o for o in others if o.name != spec.name]
    for other in others:
        if other.issuer is not None and iss == other.issuer:
            return IssuerRefusal(
                missing=False,
                reason=f"iss is the issuer of provider {other.name}, not {spec.name} "
                f"(if both are one server, set the same issuer for {spec.name})",
                other=other.name,
            )
    received = origin_of(iss)
    if spec.issuer is None and received is not None:
        if received == _authorization_origin(spec, settings):
            return None
        for other in others:
            if received == _authorization_origin(other, {}):
                return IssuerRefusal(
                    missing=False,
                    reason=f"iss comes from the server of provider {other.name}, "
                    f"not {spec.name}",
                    other=other.name,
                )
    expected = "its issuer" if spec.issuer is not None else "its authorization URL's origin"
    return IssuerRefusal(missing=False, reason=f"iss is not {spec.name}'s ({expected})")
