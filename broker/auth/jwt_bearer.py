"""``jwt_bearer``: a signed assertion exchanged for a token (RFC 7523), minted again before
each token expires.

    auth_type: jwt_bearer
    fields:
      key_file: {title: Service account key (JSON), format: json, max_length: 16384}
      subject: {title: User to act as, secret: false, required: false}
    private_key_from: key_file.private_key      # the user's key (Google) ...
    # private_key: ${SALESFORCE_JWT_KEY}        # ... or the operator's (Salesforce, Box),
    # client_id: ${SALESFORCE_CONSUMER_KEY}     # with the app's id, as {client_id}
    key_id: "{key_file.private_key_id}"         # the JWT header's kid (optional)
    algorithm: RS256                            # RS256/384/512, PS256, ES256/384
    claims:                                     # templates over the fields
      iss: "{key_file.client_email}"
      sub: "{subject}"                          # an empty claim is left out
      aud: "https://oauth2.googleapis.com/token"
      scope: "https://www.googleapis.com/auth/spreadsheets"
    assertion_lifetime_seconds: 3600
    token_url: "https://oauth2.googleapis.com/token"

Templates name fields, and members of a ``format: json`` field by path
(``{key_file.client_email}``). The assertion carries ``iss``, ``aud``, ``iat`` (a little
before now, ``assertion_skew_seconds``, for token servers whose clocks run behind),
``exp``, a fresh ``jti`` and the other claims; it is signed with Authlib
(``JWTBearerGrant.sign``) and posted as ``grant_type=urn:ietf:params:oauth:grant-type:
jwt-bearer&assertion=...``. At connect a key that cannot be read or used is a 422 naming
its field and nothing is sent; a refusal is a 422 ``credential_rejected``, no answer a
502; nothing is stored either way. Stored: the token, the non-secret fields (a node gets
them) and every field under ``fields`` (the key among them), which no node, page or log
ever gets. Renewed by signing a new assertion.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx
from joserfc.errors import JoseError
from pydantic import Field, SecretStr, model_validator
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ..apispec import Apply
from ..catalog import FieldsProvider, ProviderBase
from ..errors import (
    CredentialRejected,
    InvalidInput,
    TokenEndpointError,
)
from ..integrations import Integration
from ..oauth.decisions import Outcome, classify
from ..oauth.tokenpost import post_for_token
from ..oauth.tokens import NODE_KEYS, dig, stored_token
from ..providers import base_integration, check_api_values, read_fields
from ..urltemplates import check_template
from .base import TokenKind
from .keys import signing_key
from .tokenconnect import connect_with_token

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["GRANT_TYPE", "KIND", "JwtBearerKind", "JwtBearerProvider", "fill"]

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)((?:\.[A-Za-z0-9_-]+)*)\}")


def placeholders(template: str) -> list[tuple[str, str]]:
    """The ``(field, member path)`` each placeholder of ``template`` names."""
    return [(m.group(1), m.group(2).lstrip(".")) for m in _PLACEHOLDER.finditer(template)]


def fill(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with each ``{field}`` or ``{field.member.path}`` replaced: a field's
    value, or the member of a JSON field's object. KeyError naming the field when one is
    missing or is not a string there."""

    def one(match: re.Match[str]) -> str:
        name, path = match.group(1), match.group(2).lstrip(".")
        value = values.get(name)
        if path:
            value = dig(value, path) if isinstance(value, Mapping) else None
        if not isinstance(value, str):
            raise KeyError(name)
        return value

    return _PLACEHOLDER.sub(one, template)


class JwtBearerProvider(FieldsProvider):
    """See the module docstring."""

    auth_type: Literal["jwt_bearer"]
    token_url: str
    algorithm: Literal["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"] = "RS256"
    private_key: SecretStr | None = None
    """The operator's PEM private key (config.yaml, ``${ENV}``)."""
    private_key_from: str | None = None
    """Where the user's key is: a field, or ``field.member`` of a JSON field."""
    client_id: str | None = None
    """The operator's app id (Salesforce's consumer key), as ``{client_id}`` in claims."""
    key_id: str | None = None
    claims: dict[str, str]
    assertion_lifetime_seconds: int = Field(default=3600, ge=30, le=3600)
    assertion_skew_seconds: int = Field(default=30, ge=0, le=300)
    token_params: dict[str, str] = Field(default_factory=dict)
    extra_fields: dict[str, str] = Field(default_factory=dict)
    default_lifetime_seconds: int = Field(default=3600, ge=5, le=90 * 86400)
    timeout_seconds: float = Field(default=15.0, gt=0, le=120)

    @model_validator(mode="after")
    def _assertion(self) -> JwtBearerProvider:
        if self.verify is not None:
            raise ValueError("verify: the token request itself checks a jwt_bearer credential")
        if (self.private_key is None) == (self.private_key_from is None):
            raise ValueError("give private_key (the operator's) or private_key_from (the "
                             "user's field), one of them")
        missing = {"iss", "aud"} - set(self.claims)
        if missing:
            raise ValueError(f"claims: {sorted(missing)} are required")
        templates = [*self.claims.values(), *self.token_params.values(), self.key_id or ""]
        if self.private_key_from is not None:
            templates.append("{" + self.private_key_from + "}")
            root = self.private_key_from.split(".")[0]
            if root in self.fields and not self.fields[root].secret:
                raise ValueError("private_key_from: the field holding a key must be secret")
        for template in templates:
            for name, _ in placeholders(template):
                if name == "client_id" and name not in self.fields:
                    if self.client_id is None:
                        raise ValueError(
                            f"{template!r} names client_id: set it in config.yaml "
                            "(e.g. client_id: ${MY_CONSUMER_KEY})"
                        )
                elif name not in self.fields:
                    raise ValueError(f"{template!r} names {name!r}, which is not a field")
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
        return frozenset()

    def key_field(self) -> str | None:
        """The field a bad key is blamed on (None: the operator's key)."""
        return self.private_key_from.split(".")[0] if self.private_key_from else None

    def values(self, data: Mapping[str, str]) -> dict[str, Any]:
        """The fields with each JSON field parsed (templates dig into them); an optional
        field not given is empty (a claim it fills is then left out)."""
        values: dict[str, Any] = {}
        for name, field in self.fields.items():
            value = data.get(name)
            if value is None:
                value = "" if not field.required else None
            elif field.format == "json":
                value = json.loads(value)
            if value is not None:
                values[name] = value
        if self.client_id is not None and "client_id" not in self.fields:
            values["client_id"] = self.client_id
        return values

    def assertion(self, data: Mapping[str, str], now: datetime) -> str:
        """The signed assertion for the fields ``data`` at ``now``. InvalidInput naming
        the field at fault when a value is missing or the key cannot sign (pure)."""
        from authlib.oauth2.rfc7523 import JWTBearerGrant

        values = self.values(data)
        try:
            claims = {k: fill(v, values) for k, v in self.claims.items()}
            kid = fill(self.key_id, values) if self.key_id else None
            key = (self.private_key.get_secret_value() if self.private_key is not None
                   else fill("{" + (self.private_key_from or "") + "}", values))
        except KeyError as exc:
            field = str(exc.args[0])
            title = self.fields[field].title if field in self.fields else field
            raise InvalidInput(f"{title} lacks a value the sign-in needs.", field=field) from None
        claims = {k: v for k, v in claims.items() if v != ""}
        issued = int(now.timestamp()) - self.assertion_skew_seconds
        header: dict[str, str] = {"alg": self.algorithm, "typ": "JWT"}
        if kid:
            header["kid"] = kid
        try:
            signed = JWTBearerGrant.sign(
                signing_key(key, self.algorithm), claims.pop("iss"), claims.pop("aud"),
                subject=claims.pop("sub", None), issued_at=issued,
                expires_at=issued + self.assertion_lifetime_seconds, claims=claims,
                header=header,
            )
        except (JoseError, ValueError, TypeError, KeyError):  # they never hold the key
            blamed = self.key_field()
            title = self.fields[blamed].title if blamed else "The provider's private key"
            raise InvalidInput(
                f"{title}: its private key cannot be read or cannot sign {self.algorithm}.",
                field=blamed,
            ) from None
        return signed.decode("ascii") if isinstance(signed, bytes) else str(signed)

    def request(self, data: Mapping[str, str], now: datetime) -> httpx.Request:
        """The token request for the fields ``data`` at ``now`` (pure)."""
        values = self.values(data)
        url = self.render_url(self.token_url, {k: v for k, v in data.items()
                                               if k in self.public_fields()})
        params = {k: fill(v, values) for k, v in self.token_params.items()}
        body = {"grant_type": GRANT_TYPE, "assertion": self.assertion(data, now), **params}
        return httpx.Request("POST", url, data=body, headers={"Accept": "application/json"})

    def read(self, answer: Mapping[str, Any], *, now: datetime,
             old: Mapping[str, Any]) -> dict[str, Any]:
        return stored_token(
            answer, now=now, default_lifetime=self.default_lifetime_seconds,
            extra_fields=self.extra_fields, previous_extra=old.get("extra"),
            settings=old.get("settings"), renewable=True,
        )


class JwtBearerKind(TokenKind):
    name = "jwt_bearer"
    title = "Service account (JWT)"
    renews_without_refresh_token = True

    @property
    def spec(self) -> type[ProviderBase]:
        return JwtBearerProvider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, JwtBearerProvider)
        return _integration(spec)

    async def renew(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        assert isinstance(spec, JwtBearerProvider)
        return await request_token(broker, spec, stored.get("fields") or {})

    def token(
        self, spec: ProviderBase, response: Mapping[str, Any], *, now: datetime,
        old: Mapping[str, Any],
    ) -> dict[str, Any]:
        assert isinstance(spec, JwtBearerProvider)
        return spec.read(response, now=now, old=old)

    def carry(self, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        if "fields" in old:
            new["fields"] = old["fields"]

    def outcome(self, outcome: str) -> str:
        # A refused assertion is the key's or the subject's: the user reconnects.
        return Outcome.reauth if outcome == Outcome.operator else outcome


async def request_token(
    broker: Broker, spec: JwtBearerProvider, data: Mapping[str, str]
) -> dict[str, Any]:
    """The token endpoint's answer to a fresh assertion for the fields ``data``. Raises
    TokenEndpointError; a key that no longer signs is the user's to fix (reauth)."""
    try:
        request = spec.request(data, broker.now())
    except (InvalidInput, KeyError, ValueError):
        raise TokenEndpointError(
            f"{spec.display_name}: the stored key no longer signs an assertion",
            error=None, status=None, retry_after=None, outcome=Outcome.reauth,
        ) from None
    return await post_for_token(
        request, transport=broker.token_transport, timeout_seconds=spec.timeout_seconds,
        label=f"{spec.display_name} token endpoint", classify=classify,
    )


def _integration(spec: JwtBearerProvider) -> Integration:
    """Connected by posting the fields; the broker signs an assertion and gets a token."""

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        data = await read_fields(spec, request)
        public = {k: v for k, v in data.items() if k in spec.public_fields()}
        check_api_values(spec, public)
        broker = db.info["broker"]
        spec.assertion(data, broker.now())  # a key that cannot sign: 422, nothing sent

        def refused(exc: TokenEndpointError) -> CredentialRejected:
            reason = f" ({exc.error})" if exc.error else ""
            return CredentialRejected(
                f"{spec.display_name} did not accept this key{reason}. Check it and try "
                "again.", field=spec.key_field(),
            )

        hint = spec.credential_hint(public)
        with contextlib.suppress(KeyError):  # who the token acts as: sub, else iss
            who = fill(spec.claims.get("sub") or "", spec.values(data))
            hint["account"] = who or fill(spec.claims["iss"], spec.values(data))
        return await connect_with_token(
            db, str(group.id), spec, ask=lambda: request_token(broker, spec, data),
            read=lambda answer, now: spec.read(answer, now=now, old={"settings": public}),
            refused=refused, keep=("fields", dict(data)), hint=hint,
        )

    return base_integration(spec, complete)


KIND = JwtBearerKind()
