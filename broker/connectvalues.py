"""Values learnt at connect: what a connection's API calls need that only the connect
itself can tell (QuickBooks' company id, Atlassian's cloud id, Mailchimp's data centre).

A provider file declares them under ``connect_values``::

    connect_values:
      realm_id:                  # from the sign-in callback's query (OAuth2 only)
        from: callback
        name: realmId            # the query parameter (default: the value's name)
        pattern: "^[0-9]{1,32}$"
      cloud_id:                  # from a request made right after connect, with the new
        from: lookup             # credential applied as api.auth says (or headers:)
        url: "https://api.atlassian.com/oauth/token/accessible-resources"
        path: "0.id"             # where in the JSON answer (dotted; digits index lists)
        pattern: "^[0-9a-f-]{36}$"
      dc:
        from: lookup
        url: "https://login.mailchimp.com/oauth2/metadata"
        headers: {Authorization: "OAuth {access_token}"}
        path: dc
        pattern: "^[a-z]{2}[0-9]{1,3}$"

Every value needs a pattern it must match in full: learnt values go into API addresses
(``api.base_url`` may name them) and to nodes. They are stored with the connection (kept
across refreshes), handed to nodes, and shown in the connection list unless ``secret``. A
value that cannot be learnt — the parameter is missing, the lookup fails or answers
without it, or it does not match — fails the connect with a message naming the value, and
nothing is stored. A lookup's answer is read up to 1 MiB and never repeated in a message.

``pick`` and ``from_callback`` are pure; ``look_up`` makes the requests, and ``learn``
does both for a provider and a new credential.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ProviderUnreachable
from .oauth.tokens import dig
from .urltemplates import template_names

if TYPE_CHECKING:
    from .catalog import ProviderBase

__all__ = [
    "ConnectValue", "ValueNotLearnt", "from_callback", "learn", "look_up", "pick", "shown",
]

MAX_ANSWER_BYTES = 1024 * 1024


class ValueNotLearnt(ProviderUnreachable):
    """A value the connection needs could not be learnt: the connect fails (502)."""

    code = "connect_value_missing"


class ConnectValue(BaseModel):
    """One value learnt at connect (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: Literal["callback", "lookup"] = Field(alias="from")
    pattern: str
    secret: bool = False
    name: str | None = None
    """``callback``: the query parameter (default: the value's own name)."""
    url: str | None = None
    """``lookup``: the URL (a fixed https URL; it may name no value)."""
    method: Literal["GET", "POST"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    """``lookup``: headers, templates over what a node gets (``{access_token}``); an
    ``Authorization`` here replaces the one ``api.auth`` would apply."""
    path: str | None = None
    """``lookup``: where the value is in the JSON answer."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern {value!r} is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _source(self) -> ConnectValue:
        if self.source == "callback":
            if self.url or self.path or self.headers:
                raise ValueError("a callback value has a name, not a url, path or headers")
        else:
            if not self.url or not self.path:
                raise ValueError("a lookup needs a url and a path")
            if self.name:
                raise ValueError("a lookup has a path, not a name")
            if template_names(self.url):
                raise ValueError(f"lookup url {self.url!r}: it may not name a value")
            if not self.url.startswith("https://") and not self.url.startswith("http://"):
                raise ValueError(f"lookup url {self.url!r} is not an http(s) URL")
        return self

    def matches(self, value: Any) -> str | None:
        """``value`` as a string when it fits the pattern (a number counts as its
        digits), else None."""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        text = str(value)
        return text if re.fullmatch(self.pattern, text) else None


def _filled(templates: Mapping[str, str], texts: Mapping[str, str]) -> dict[str, str]:
    """The templates that can be filled from ``texts``, filled."""
    filled: dict[str, str] = {}
    for name, template in templates.items():
        try:
            filled[name] = template.format_map(texts)
        except KeyError:
            continue
    return filled


def shown(spec: ProviderBase, learnt: Mapping[str, str]) -> dict[str, str]:
    """What the connection list may show of the values learnt: the non-secret ones."""
    return {k: v for k, v in learnt.items() if not spec.connect_values[k].secret}


def from_callback(
    values: Mapping[str, ConnectValue], query: Mapping[str, list[str]], label: str
) -> dict[str, str]:
    """The callback values from the callback's ``query``; ValueNotLearnt naming the first
    missing or unfit one."""
    learnt: dict[str, str] = {}
    for name, spec in values.items():
        if spec.source != "callback":
            continue
        given = query.get(spec.name or name) or []
        value = spec.matches(given[0]) if len(given) == 1 else None
        if value is None:
            raise ValueNotLearnt(f"{label} did not say which {name} this connection is for.")
        learnt[name] = value
    return learnt


def pick(spec: ConnectValue, answer: Any, name: str, label: str) -> str:
    """The value at ``spec.path`` in a lookup's JSON ``answer``; ValueNotLearnt when it is
    missing or does not fit the pattern (the message never repeats it)."""
    assert spec.path is not None
    value = spec.matches(dig(answer, spec.path))
    if value is None:
        raise ValueNotLearnt(f"{label} did not tell the {name} this connection needs.")
    return value


async def look_up(
    values: Mapping[str, ConnectValue],
    *,
    auth_headers: Mapping[str, str],
    auth_query: Mapping[str, str],
    credential: Mapping[str, Any],
    label: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, str]:
    """The lookup values, each from its request made with the credential applied
    (``auth_headers`` and ``auth_query``, what ``api.auth`` gives; a lookup's own headers
    take precedence). ValueNotLearnt for the first that cannot be learnt."""
    learnt: dict[str, str] = {}
    texts = {k: "" if v is None else str(v) for k, v in credential.items()}
    for name, spec in values.items():
        if spec.source != "lookup":
            continue
        assert spec.url is not None
        try:
            own = {k: v.format_map(texts) for k, v in spec.headers.items()}
        except KeyError:
            raise ValueNotLearnt(f"{label}: the {name} lookup needs a value this connection "
                                 "does not have.") from None
        headers = {"Accept": "application/json", **auth_headers}
        lowered = {k.lower() for k in own}
        headers = {k: v for k, v in headers.items() if k.lower() not in lowered} | own
        url = httpx.URL(spec.url).copy_merge_params(dict(auth_query))
        answer = await _fetch(spec, url, headers, transport, name=name, label=label)
        learnt[name] = pick(spec, answer, name, label)
    return learnt


async def _fetch(
    spec: ConnectValue, url: httpx.URL, headers: Mapping[str, str],
    transport: httpx.AsyncBaseTransport | None, *, name: str, label: str,
) -> Any:
    failed = ValueNotLearnt(f"{label} could not be asked for the {name} this connection "
                            "needs. Try again later.")
    async with httpx.AsyncClient(
        transport=transport, timeout=spec.timeout_seconds, follow_redirects=False
    ) as http:
        try:
            async with http.stream(spec.method, url, headers=dict(headers)) as response:
                if response.status_code != 200:
                    raise failed
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise failed
        except httpx.HTTPError:
            raise failed from None
    try:
        return json.loads(bytes(body))
    except ValueError:
        raise failed from None


async def learn(
    spec: ProviderBase,
    credential: Mapping[str, Any],
    *,
    query: Mapping[str, list[str]] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, str]:
    """Every value ``spec`` learns at connect, for the new ``credential`` (what a node
    would get of it) and the callback's ``query``. ValueNotLearnt for the first that
    cannot be learnt; nothing is stored by this."""
    values = spec.connect_values
    if not values:
        return {}
    label = spec.display_name
    learnt = from_callback(values, query or {}, label)
    auth = spec.api.auth if spec.api is not None and spec.api.auth else spec.default_auth()
    texts = {k: "" if v is None else str(v) for k, v in {**credential, **learnt}.items()}
    # A header or parameter naming a value still to be learnt (Xero-tenant-id:
    # {tenant_id}) cannot go on the lookups that learn it: they go without it.
    headers = _filled(auth.headers, texts)
    params = _filled(auth.query, texts)
    return learnt | await look_up(
        values, auth_headers=headers, auth_query=params, credential=texts, label=label,
        transport=transport,
    )
