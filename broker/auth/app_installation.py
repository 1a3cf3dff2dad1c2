"""``app_installation``: the user installs the operator's app (a GitHub App) through the
popup; the broker signs an app JWT and exchanges it for an installation token, again before
each one expires.

    auth_type: app_installation
    install_url: "https://github.com/apps/{app_slug}/installations/new"   # + state
    connect_values:
      installation_id: {from: callback, name: installation_id, pattern: "^[0-9]{1,20}$"}
    ownership:                      # the installation must be one the user can access
      token_url: "https://github.com/login/oauth/access_token"   # the callback's code ->
      check_url: "https://api.github.com/user/installations?per_page=100"  # a user token
      list_path: installations
      id_member: id
    app_jwt: {algorithm: RS256, lifetime_seconds: 540, skew_seconds: 60, iss: "{client_id}"}
    token_url: "https://api.github.com/app/installations/{installation_id}/access_tokens"
    token_headers: {Accept: application/vnd.github+json}
    token_path: token
    expires_at_path: expires_at      # ISO 8601 (or expires_in_path: seconds)
    # the operator's, in config.yaml: app_slug, client_id, client_secret, private_key

An installation id on the callback proves nothing (anyone can put any id there: GitHub's
docs say so), so with ``ownership`` the broker also exchanges the callback's ``code`` for
a user token (used once, never stored), lists the installations that user can access and
refuses an id not among them. ``setup_action=request`` (an installation awaiting an
owner's approval) is refused with a message saying so. The app JWT (``iat``
``skew_seconds`` in the past, ``exp`` at most 10 minutes on) is signed with joserfc (the
JOSE library Authlib builds on);
``token_url`` may name callback values (held to their patterns). Stored: the installation
token and the learnt values; renewed by a new app JWT. A node gets the token, its expiry
and the installation id — never the app's key or secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..catalog import FieldSpec, PopupProvider, ProviderBase
from ..connectvalues import ValueNotLearnt, from_callback
from ..errors import InvalidInput, TokenEndpointError
from ..integrations import Integration
from ..oauth.decisions import Outcome
from ..oauth.flows import Flow
from ..oauth.service import FlowFailed, single
from ..oauth.tokenpost import post_for_token
from ..oauth.tokens import NODE_KEYS, dig, stored_token
from ..providers import popup_integration
from ..urltemplates import check_template, template_names
from .base import TokenKind
from .keys import signing_key

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["KIND", "AppInstallationKind", "AppInstallationProvider", "classify"]


class AppJwt(BaseModel):
    """The app's own JWT (RS256 by default; GitHub: at most 10 minutes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["RS256", "RS384", "RS512", "ES256"] = "RS256"
    lifetime_seconds: int = Field(default=540, ge=30, le=600)
    skew_seconds: int = Field(default=60, ge=0, le=120)
    iss: str = "{client_id}"
    """``{client_id}`` or ``{app_id}``."""


class Ownership(BaseModel):
    """How the broker proves the installation is the user's (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str = "installation_id"
    """The callback value that names the installation."""
    code_param: str = "code"
    token_url: str
    check_url: str
    headers: dict[str, str] = Field(default_factory=dict)
    list_path: str
    id_member: str = "id"


class AppInstallationProvider(PopupProvider):
    """See the module docstring."""

    auth_type: Literal["app_installation"]
    install_url: str
    app_slug: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,99}$")
    app_id: str | None = Field(default=None, pattern=r"^[0-9]{1,20}$")
    client_id: SecretStr | None = None
    client_secret: SecretStr | None = None
    private_key: SecretStr | None = None
    app_jwt: AppJwt = AppJwt()
    ownership: Ownership | None = None
    token_url: str
    token_headers: dict[str, str] = Field(default_factory=dict)
    token_path: str = "token"
    expires_at_path: str | None = "expires_at"
    expires_in_path: str | None = None
    default_lifetime_seconds: int = Field(default=3600, ge=60, le=86400)
    timeout_seconds: float = Field(default=15.0, gt=0, le=120)

    @model_validator(mode="after")
    def _app(self) -> AppInstallationProvider:
        missing = [
            name for name in ("app_slug", "client_id", "private_key")
            if getattr(self, name) is None
        ]
        if self.ownership is not None and self.client_secret is None:
            missing.append("client_secret")
        if missing:
            raise ValueError(
                f"{', '.join(missing)}: the operator's app settings; set them in config.yaml "
                "(e.g. private_key: ${GITHUB_APP_PRIVATE_KEY})"
            )
        if template_names(self.install_url) - {"app_slug"}:
            raise ValueError("install_url may name {app_slug} only")
        if template_names(self.app_jwt.iss) - {"client_id", "app_id"}:
            raise ValueError("app_jwt.iss may name {client_id} or {app_id} only")
        if "{app_id}" in self.app_jwt.iss and self.app_id is None:
            raise ValueError("app_jwt.iss names {app_id}: set app_id in config.yaml")
        check_template(self.token_url, self.callback_fields(), self.allowed_hosts)
        if self.ownership is not None and self.ownership.value not in self.callback_fields():
            raise ValueError(f"ownership.value: {self.ownership.value!r} is not a callback value")
        return self

    def callback_fields(self) -> dict[str, FieldSpec]:
        """The callback values, as fields with their patterns (for URL templates)."""
        return {
            name: FieldSpec(title=name, secret=False, pattern=value.pattern)
            for name, value in self.connect_values.items() if value.source == "callback"
        }

    def credential_names(self) -> set[str]:
        return {*NODE_KEYS}

    def install(self, state: str) -> str:
        """The install page's URL for a flow's ``state`` (pure)."""
        assert self.app_slug is not None
        url = self.install_url.replace("{app_slug}", quote(self.app_slug, safe=""))
        return str(httpx.URL(url).copy_merge_params({"state": state}))

    def app_token(self, now: datetime) -> str:
        """The app's JWT at ``now`` (pure). InvalidInput when the key cannot sign."""
        from joserfc import jwt
        from joserfc.errors import JoseError

        assert self.client_id is not None and self.private_key is not None
        iss = self.app_jwt.iss.replace("{client_id}", self.client_id.get_secret_value())
        iss = iss.replace("{app_id}", self.app_id or "")
        issued = int(now.timestamp()) - self.app_jwt.skew_seconds
        claims = {"iss": iss, "iat": issued, "exp": issued + self.app_jwt.lifetime_seconds}
        try:
            signed = jwt.encode(
                {"alg": self.app_jwt.algorithm, "typ": "JWT"}, claims,
                signing_key(self.private_key.get_secret_value(), self.app_jwt.algorithm),
                algorithms=[self.app_jwt.algorithm],
            )
        except (JoseError, ValueError, TypeError):
            raise InvalidInput(
                f"{self.display_name}: the app's private key cannot sign "
                f"{self.app_jwt.algorithm} (check private_key in config.yaml)."
            ) from None
        return str(signed)

    def token_request(self, values: Mapping[str, str], now: datetime) -> httpx.Request:
        """The installation token request for the learnt ``values`` (pure). InvalidInput
        for a value its pattern refuses (checked at the callback; again here, as it is
        about to go in a URL) or a key that cannot sign."""
        for name, field in self.callback_fields().items():
            if name in values and not field.matches(values[name]):
                raise InvalidInput(f"The {name} cannot be used.", field=name)
        url = self.render_url(self.token_url, values)
        headers = {"Accept": "application/json", **self.token_headers,
                   "Authorization": f"Bearer {self.app_token(now)}"}
        return httpx.Request("POST", url, headers=headers)

    def read(self, answer: Mapping[str, Any], *, now: datetime,
             old: Mapping[str, Any]) -> dict[str, Any]:
        """What is stored of an installation token answer; ValueError without a token."""
        token = dig(answer, self.token_path)
        if not isinstance(token, str) or not token:
            raise ValueError(f"the answer has no token at {self.token_path!r}")
        lifetime: Any = dig(answer, self.expires_in_path) if self.expires_in_path else None
        if self.expires_at_path:
            lifetime = _seconds_until(dig(answer, self.expires_at_path), now)
        return stored_token(
            {"access_token": token, "expires_in": lifetime}, now=now,
            default_lifetime=self.default_lifetime_seconds,
            previous_extra=old.get("extra"), renewable=True,
        )


def _seconds_until(value: Any, now: datetime) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (at - now).total_seconds() if at.tzinfo is not None else None


def classify(status: int | None, error: str | None) -> Outcome:
    """A failed installation token request: 401 is the app's JWT (the operator's key),
    another 4xx the installation (removed, suspended: the user reinstalls)."""
    if status is None or status >= 500 or status in (408, 429):
        return Outcome.transient
    if status == 401:
        return Outcome.operator
    return Outcome.reauth if 400 <= status < 500 else Outcome.operator


class AppInstallationKind(TokenKind):
    name = "app_installation"
    title = "App installation"
    connect = "popup"
    renews_without_refresh_token = True

    @property
    def spec(self) -> type[ProviderBase]:
        return AppInstallationProvider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, AppInstallationProvider)
        return popup_integration(spec)

    async def begin(self, broker: Broker, spec: ProviderBase, flow: Flow) -> str:
        assert isinstance(spec, AppInstallationProvider)
        return spec.install(flow.state)

    async def complete(
        self, broker: Broker, spec: ProviderBase, flow: Flow,
        params: Mapping[str, list[str]], *, transport: httpx.AsyncBaseTransport,
    ) -> dict[str, Any]:
        assert isinstance(spec, AppInstallationProvider)
        name, label = spec.name, spec.display_name
        if single(params, "setup_action", name) == "request":
            raise FlowFailed(
                f"The {label} installation was requested, not made: an owner of the account "
                "must approve it. Connect again once they have.", integration=name,
            )
        try:
            values = from_callback(spec.connect_values, params, label)
        except ValueNotLearnt as exc:
            raise FlowFailed(f"{exc.message} Start again.", integration=name) from None
        if spec.ownership is not None:
            await _check_ownership(broker, spec, params, values, transport)
        requested_at = broker.now()  # expiry counted from the request (see oauth2.py)
        try:
            answer = await post_for_token(
                spec.token_request(values, requested_at), transport=transport,
                timeout_seconds=spec.timeout_seconds, label=f"{label} installation token",
                classify=classify,
            )
            token = spec.read(answer, now=requested_at, old={})
        except InvalidInput as exc:
            raise FlowFailed(exc.message, integration=name, status_code=500) from None
        except TokenEndpointError as exc:
            raise FlowFailed(
                f"{label} did not issue a token for this installation. Start again.",
                integration=name,
                status_code=502 if exc.outcome == Outcome.transient else 400,
            ) from None
        except ValueError:
            raise FlowFailed(f"{label} answered without a token.", integration=name,
                             status_code=502) from None
        token["extra"].update(values)
        return token

    async def renew(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        assert isinstance(spec, AppInstallationProvider)
        values = {k: str(v) for k, v in (stored.get("extra") or {}).items()}
        try:
            request = spec.token_request(values, broker.now())
        except InvalidInput:  # the app's key, or a stored value no longer acceptable
            raise TokenEndpointError(
                f"{spec.display_name}: the installation token request cannot be made",
                error=None, status=None, retry_after=None, outcome=Outcome.operator,
            ) from None
        return await post_for_token(
            request, transport=broker.token_transport, timeout_seconds=spec.timeout_seconds,
            label=f"{spec.display_name} installation token", classify=classify,
        )

    def token(
        self, spec: ProviderBase, response: Mapping[str, Any], *, now: datetime,
        old: Mapping[str, Any],
    ) -> dict[str, Any]:
        assert isinstance(spec, AppInstallationProvider)
        return spec.read(response, now=now, old=old)


async def _check_ownership(
    broker: Broker, spec: AppInstallationProvider, params: Mapping[str, list[str]],
    values: Mapping[str, str], transport: httpx.AsyncBaseTransport,
) -> None:
    """FlowFailed unless the user who came back can access the installation named on the
    callback (their user token is used for this one check and dropped)."""
    own = spec.ownership
    assert own is not None and spec.client_id is not None and spec.client_secret is not None
    name, label = spec.name, spec.display_name
    refused = FlowFailed(
        f"{label} did not confirm that this installation is yours. Start again.",
        integration=name,
    )
    code = single(params, own.code_param, name)
    if not code:
        raise refused
    exchange = httpx.Request("POST", own.token_url, headers={"Accept": "application/json"},
                             data={"grant_type": "authorization_code", "code": code,
                                   "client_id": spec.client_id.get_secret_value(),
                                   "client_secret": spec.client_secret.get_secret_value()})
    try:
        user = await post_for_token(
            exchange, transport=transport, timeout_seconds=spec.timeout_seconds,
            label=f"{label} user token", classify=classify,
        )
        user_token = user.get("access_token")
        if not isinstance(user_token, str) or not user_token:
            raise refused
        listing = await post_for_token(
            httpx.Request("GET", own.check_url, headers={
                "Accept": "application/json", **own.headers,
                "Authorization": f"Bearer {user_token}"}),
            transport=transport, timeout_seconds=spec.timeout_seconds,
            label=f"{label} installations", classify=classify,
        )
    except TokenEndpointError as exc:
        if exc.outcome == Outcome.transient:
            raise FlowFailed(f"{label} could not be reached. Start again.", integration=name,
                             status_code=502) from None
        raise refused from None
    found = dig(listing, own.list_path)
    ids = {str(item.get(own.id_member)) for item in found or [] if isinstance(item, Mapping)}
    if not isinstance(found, list) or values.get(own.value) not in ids:
        raise refused


KIND = AppInstallationKind()
