"""``token_exchange``: fields the user gives, exchanged at a token URL for a token.

    auth_type: token_exchange
    fields:
      subdomain: {title: Subdomain, secret: false, pattern: "^[a-z0-9-]{1,63}$"}
      username: {title: User name, secret: false}
      password: {title: Password}
    token_url: "https://{subdomain}.example.com/api/login"   # over non-secret fields
    token_request_format: json          # or form
    token_headers: {X-Client: broker}   # templates over the fields
    token_body: {user: "{username}", pass: "{password}"}
    token_path: data.token              # where the token is in the answer
    expires_in_path: data.expiresIn     # its lifetime in seconds (none: the default)
    default_lifetime_seconds: 3600
    apply: {headers: {X-Session-Token: "{access_token}"}}   # default: Bearer

Connected by posting the fields to the trigger route: the broker makes the exchange at
once; a refusal (a 4xx) is a 422 ``credential_rejected``, anything else that is not a
token a 502, and nothing is stored either way. Stored: the token, the non-secret fields
(handed to nodes and usable in ``api.base_url``, as settings are) and every field under
``fields``, which a node never gets and the exchange is repeated with before the token
expires (the refresh engine's single flight and leases, as for OAuth2). A refusal then
means the user's fields no longer work: the connection needs reconnecting.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import Field, model_validator
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ..apispec import Apply
from ..catalog import FieldsProvider, ProviderBase, render
from ..errors import CredentialRejected, TokenEndpointError
from ..integrations import Integration
from ..oauth.decisions import Outcome
from ..oauth.tokenpost import post_for_token
from ..oauth.tokens import NODE_KEYS, dig, stored_token
from ..providers import base_integration, check_api_values, read_fields
from ..urltemplates import check_template, template_names
from .base import TokenKind
from .tokenconnect import connect_with_token

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["KIND", "TokenExchangeKind", "TokenExchangeProvider", "classify"]

class TokenExchangeProvider(FieldsProvider):
    """See the module docstring."""

    auth_type: Literal["token_exchange"]
    token_url: str
    token_request_format: Literal["json", "form"] = "json"
    token_headers: dict[str, str] = Field(default_factory=dict)
    token_body: dict[str, str] = Field(min_length=1)
    token_path: str = Field(default="access_token", min_length=1)
    expires_in_path: str | None = "expires_in"
    extra_fields: dict[str, str] = Field(default_factory=dict)
    """Values kept from the answer: name -> path (handed to nodes)."""
    default_lifetime_seconds: int = Field(default=3600, ge=5, le=90 * 86400)
    expires: Literal["when_told", "never"] = "when_told"
    timeout_seconds: float = Field(default=15.0, gt=0, le=120)

    @model_validator(mode="after")
    def _exchange(self) -> TokenExchangeProvider:
        if self.verify is not None:
            raise ValueError("verify: the exchange itself checks a token_exchange credential")
        for label, templates in (("token_headers", self.token_headers),
                                 ("token_body", self.token_body)):
            for template in templates.values():
                unknown = template_names(template) - set(self.fields)
                if unknown:
                    raise ValueError(f"{label} names {sorted(unknown)} which are not fields")
        # A secret never goes in a URL: the token URL may use non-secret fields only.
        check_template(self.token_url, self.public_fields(), self.allowed_hosts)
        return self

    def public_fields(self) -> dict[str, Any]:
        """The non-secret fields: a node gets them, and URLs may use them."""
        return {name: f for name, f in self.fields.items() if not f.secret}

    def credential_names(self) -> set[str]:
        return {*NODE_KEYS, *self.public_fields(), *self.extra_fields}

    def url_values(self) -> dict[str, Any]:
        return self.public_fields()

    def default_auth(self) -> Apply:
        return self.apply or Apply(headers={"Authorization": "Bearer {access_token}"})

    def header_fields(self) -> frozenset[str]:
        names = set(super().header_fields())
        for template in self.token_headers.values():
            names |= template_names(template)
        return frozenset(names & set(self.fields))

    def request(self, data: Mapping[str, str]) -> httpx.Request:
        """The exchange request for the fields ``data`` (pure: nothing is sent)."""
        url = self.render_url(self.token_url, {k: data[k] for k in self.public_fields()
                                               if k in data})
        headers = {"Accept": "application/json",
                   **{k: render(v, data) for k, v in self.token_headers.items()}}
        body = {k: render(v, data) for k, v in self.token_body.items()}
        if self.token_request_format == "json":
            return httpx.Request("POST", url, headers=headers, json=body)
        return httpx.Request("POST", url, headers=headers, data=body)

    def read(self, answer: Any, *, now: datetime, old: Mapping[str, Any]) -> dict[str, Any]:
        """What is stored of the exchange's JSON ``answer``; ValueError (naming no value)
        when it holds no token."""
        token = dig(answer, self.token_path)
        if not isinstance(token, str) or not token:
            raise ValueError(f"the answer has no token at {self.token_path!r}")
        lifetime = dig(answer, self.expires_in_path) if self.expires_in_path else None
        extra = {name: dig(answer, path) for name, path in self.extra_fields.items()}
        return stored_token(
            {"access_token": token, "expires_in": lifetime, "extra": extra},
            now=now, default_lifetime=self.default_lifetime_seconds,
            extra_fields={name: f"extra.{name}" for name in self.extra_fields},
            previous_extra=old.get("extra"), settings=old.get("settings"),
            expires=self.expires, renewable=True,
        )


def classify(status: int | None) -> Outcome:
    """What a failed exchange means: no answer, a 5xx, 408 or 429 will pass; any other
    4xx refuses the user's fields; anything else (a redirect) is the configuration's."""
    if status is None or status >= 500 or status in (408, 429):
        return Outcome.transient
    if 400 <= status < 500:
        return Outcome.reauth
    return Outcome.operator


class TokenExchangeKind(TokenKind):
    name = "token_exchange"
    title = "Token exchange"
    renews_without_refresh_token = True

    @property
    def spec(self) -> type[ProviderBase]:
        return TokenExchangeProvider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, TokenExchangeProvider)
        return _integration(spec)

    async def renew(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        assert isinstance(spec, TokenExchangeProvider)
        return await exchange(broker, spec, stored.get("fields") or {})

    def token(
        self, spec: ProviderBase, response: Mapping[str, Any], *, now: datetime,
        old: Mapping[str, Any],
    ) -> dict[str, Any]:
        assert isinstance(spec, TokenExchangeProvider)
        return spec.read(response, now=now, old=old)

    def carry(self, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        if "fields" in old:
            new["fields"] = old["fields"]


async def exchange(
    broker: Broker, spec: TokenExchangeProvider, data: Mapping[str, str]
) -> dict[str, Any]:
    """The exchange's JSON answer for the fields ``data``. Raises TokenEndpointError
    (status, ``Retry-After`` and outcome; never the request or the answer)."""
    try:
        request = spec.request(data)
    except (KeyError, ValueError):
        raise TokenEndpointError(
            f"{spec.display_name} token exchange: the stored fields no longer fit the "
            "provider's configuration", error=None, status=None, retry_after=None,
            outcome=Outcome.reauth,
        ) from None
    return await post_for_token(
        request, transport=broker.token_transport, timeout_seconds=spec.timeout_seconds,
        label=f"{spec.display_name} token exchange", classify=lambda status, _: classify(status),
    )


def _integration(spec: TokenExchangeProvider) -> Integration:
    """Connected by posting the fields; the broker makes the exchange at once."""

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        data = await read_fields(spec, request)
        public = {k: v for k, v in data.items() if k in spec.public_fields()}
        check_api_values(spec, public)
        broker = db.info["broker"]

        def refused(exc: TokenEndpointError) -> CredentialRejected | None:
            if exc.outcome != Outcome.reauth:
                return None  # the provider's trouble, not these credentials
            secrets = [n for n, f in spec.fields.items() if f.secret]
            return CredentialRejected(
                f"{spec.display_name} did not accept these credentials. Check them and "
                "try again.", field=secrets[0] if secrets else None,
            )

        return await connect_with_token(
            db, str(group.id), spec, ask=lambda: exchange(broker, spec, data),
            read=lambda answer, now: spec.read(answer, now=now, old={"settings": public}),
            refused=refused, keep=("fields", dict(data)), hint=spec.credential_hint(data),
        )

    return base_integration(spec, complete)


KIND = TokenExchangeKind()
