"""A provider's API, as data: where it is, what every call needs, how the credential goes on.

A provider file's ``api`` section::

    api:
      base_url: "https://{subdomain}.zendesk.com/api/v2"  # a URL template (urltemplates)
      headers: {Accept: application/json}                 # sent on every call
      auth:                                               # how the credential is applied
        headers: {Authorization: "Bearer {access_token}"}
        query: {}
      values: {cloud_id: "^[0-9a-f-]{36}$"}   # patterns for kept extra fields in base_url
      refresh_on: [401]                        # "this token is no longer good"
      retry_on: [429, 502, 503, 504]
      retries: 2
      max_retry_wait_seconds: 30
      wait_headers: [{name: Retry-After, format: retry_after}]
      timeout_seconds: 30

``auth`` defaults by auth type: OAuth2 tokens go in ``Authorization: Bearer
{access_token}``; an API key uses the provider's own ``apply``. Its templates name what a
node would get (the access token, settings, kept extra fields, an API key's fields).

``base_url`` is rendered by ``urltemplates.render_url`` (every value percent-encoded,
held to its pattern, the host checked against ``allowed_hosts``) over the connection's
settings or fields and its kept extra fields. One more form is allowed here: a template
that *starts* with a placeholder whose value is a whole origin, such as Salesforce's
``{instance_url}/services/data/v62.0``. The value must then be ``https://<host>`` and
nothing else, match its pattern under ``values``, and its host must be in
``allowed_hosts``, which such a template requires.

Everything here is pure: rendering and checking, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidInput
from .urltemplates import host_allowed, render_url, template_names

__all__ = [
    "DEFAULT_WAIT_HEADERS",
    "ApiSpec",
    "Apply",
    "Placement",
    "WaitHeader",
    "origin_placeholder",
    "render_base_url",
]

# RFC 9110 token: what a header name may be made of.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ORIGIN_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]{0,63})\}(?=/|$)")
# Stands in for an origin value while the rest of a template is checked and rendered.
_STAND_IN = "https://origin.invalid"


def header_safe(value: str) -> bool:
    """Whether ``value`` can be sent as (part of) an HTTP header value: printable ASCII
    and spaces only. Anything else is refused before a request is made: httpx cannot
    encode other characters (a 500), and CR/LF would split the header."""
    return all(" " <= c <= "~" for c in value)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Apply(_Model):
    """How a credential goes on a request: header and query templates.

    ``{api_key}`` in a template is replaced by the credential's value ``api_key``.
    """

    headers: dict[str, str] = {}
    query: dict[str, str] = {}

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header, template in value.items():
            if not HEADER_NAME.fullmatch(header) or not header_safe(template):
                raise ValueError(
                    f"{header!r} is not a header name, or its template is not printable ASCII"
                )
        return value

    def names(self) -> set[str]:
        """The credential values the templates use."""
        out: set[str] = set()
        for template in (*self.headers.values(), *self.query.values()):
            out |= template_names(template)
        return out


BEARER = Apply(headers={"Authorization": "Bearer {access_token}"})


class WaitHeader(_Model):
    """A response header that says how long to wait before trying again.

    ``retry_after``: seconds or an HTTP date (RFC 9110); ``seconds``: a number of seconds;
    ``epoch``: the Unix time at which to try again; ``epoch_ms``: the same in milliseconds.
    """

    name: str = Field(pattern=HEADER_NAME.pattern)
    format: Literal["retry_after", "seconds", "epoch", "epoch_ms"] = "retry_after"
    statuses: list[int] = [429, 503]
    """The answers it is read on. Rate-limit headers such as ``X-RateLimit-Reset`` come
    on every answer, and mean nothing for a 502; Retry-After is defined for 429 and 503."""


DEFAULT_WAIT_HEADERS = (WaitHeader(name="Retry-After", format="retry_after"),)


class ApiSpec(_Model):
    """See the module docstring."""

    base_url: str
    headers: dict[str, str] = {}
    auth: Apply | None = None
    values: dict[str, str] = {}
    """Patterns for the kept extra fields ``base_url`` uses (a provider sends those)."""
    refresh_on: list[int] = [401]
    retry_on: list[int] = [429, 502, 503, 504]
    retries: int = Field(default=2, ge=0, le=10)
    max_retry_wait_seconds: float = Field(default=30.0, ge=0, le=3600)
    wait_headers: list[WaitHeader] = list(DEFAULT_WAIT_HEADERS)
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header, text in value.items():
            if not HEADER_NAME.fullmatch(header) or not header_safe(text):
                raise ValueError(f"{header!r} is not a header name, or its value is not "
                                 "printable ASCII")
            if "{" in text:
                raise ValueError(f"{header!r}: static headers take no placeholders (the "
                                 "credential goes under auth)")
        return value

    @field_validator("values")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{name}: not a valid regular expression: {exc}") from exc
        return value

    @field_validator("refresh_on", "retry_on")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 400 <= status <= 599:
                raise ValueError(f"{status} is not an error status (400-599)")
        return value


@dataclass(frozen=True)
class Placement:
    """A provider's ``api`` section with what it leaves to the provider resolved: how
    the credential goes on (``auth``: the section's, else the auth type's default) and
    the hosts the base URL may reach. The form the client and the proxy use."""

    api: ApiSpec
    auth: Apply
    allowed_hosts: tuple[str, ...]
    patterns: Mapping[str, str]
    """The patterns of values the base URL may name: ``api.values`` and the values
    learnt at connect."""

    def apply(self, credential: Mapping[str, object]) -> tuple[dict[str, str], dict[str, str]]:
        """The headers and query parameters that carry ``credential``.

        Raises InvalidInput naming a value the credential lacks or one that cannot go in
        a header; the message never holds the value.
        """
        values = {k: "" if v is None else str(v) for k, v in credential.items()}
        headers: dict[str, str] = {}
        for header, template in self.auth.headers.items():
            value = _fill(template, values)
            if not header_safe(value):
                raise InvalidInput(
                    "The stored credential contains characters that cannot be sent.",
                    field=header,
                )
            headers[header] = value
        query = {name: _fill(template, values) for name, template in self.auth.query.items()}
        return headers, query

    def secret_values(self, credential: Mapping[str, object]) -> list[str]:
        """The credential values the placement sends (to keep them out of an answer)."""
        names = self.auth.names()
        return [str(credential[n]) for n in sorted(names) if credential.get(n)]

    def check_values(self, values: Mapping[str, object]) -> None:
        """At connect: the base URL must render over the connection's values, so a value
        that would send its calls elsewhere is refused before anything is stored
        (InvalidInput naming it). Values not known yet (learnt after connect) are left
        to the first call."""
        present = {k: v for k, v in values.items() if v is not None}
        if template_names(self.api.base_url) <= set(present):
            self.base(present)

    def base(self, values: Mapping[str, object]) -> str:
        """The base URL for a connection with these values (see ``render_base_url``)."""
        return render_base_url(
            self.api.base_url, {k: str(v) for k, v in values.items() if v is not None},
            patterns=self.patterns, allowed_hosts=self.allowed_hosts,
        )


def _fill(template: str, values: Mapping[str, str]) -> str:
    try:
        return template.format_map(values)
    except KeyError as exc:
        name = str(exc.args[0])
        raise InvalidInput(
            f"The stored credential has no value {name!r}, which the provider's API needs.",
            field=name,
        ) from None


def origin_placeholder(template: str) -> str | None:
    """The name of the placeholder a template starts with, when its value is an origin."""
    match = _ORIGIN_PLACEHOLDER.match(template)
    return match.group(1) if match else None


def stand_in(template: str) -> str:
    """``template`` with its origin placeholder (if any) replaced by a fixed origin, for
    the checks and the rendering of the rest."""
    name = origin_placeholder(template)
    return template if name is None else _STAND_IN + template[len(name) + 2 :]


def render_base_url(
    template: str,
    values: Mapping[str, str],
    *,
    patterns: Mapping[str, str],
    allowed_hosts: tuple[str, ...] | list[str],
) -> str:
    """``template`` rendered over ``values`` (see the module docstring).

    Raises InvalidInput naming a value that is missing, does not match its pattern, or
    cannot be used in the address.
    """
    for name in template_names(template):
        if name not in values:
            raise InvalidInput(
                f"This connection has no {name!r}, which the provider's API address needs.",
                field=name,
            )
        pattern = patterns.get(name)
        if pattern is not None and re.fullmatch(pattern, values[name]) is None:
            raise InvalidInput(
                f"The value of {name!r} cannot be used in the provider's address.", field=name
            )
    origin = origin_placeholder(template)
    if origin is None:
        return render_url(template, values, allowed_hosts=allowed_hosts)
    value = values[origin]
    parts = urlsplit(value)
    refused = InvalidInput(
        f"The value of {origin!r} cannot be used in the provider's address.", field=origin
    )
    try:
        port = parts.port
    except ValueError:
        raise refused from None
    host = parts.hostname or ""
    if (
        parts.scheme != "https" or not host or parts.username or parts.password
        or port is not None or parts.path not in ("", "/") or parts.query or parts.fragment
        or value.rstrip("/") != f"https://{parts.netloc}" or parts.netloc.lower() != host
        or not allowed_hosts or not host_allowed(host, allowed_hosts)
    ):
        raise refused
    rest = render_url(stand_in(template), values)[len(_STAND_IN) :]
    return f"https://{host}{rest}"
