"""``oauth2``: the authorization code flow, through the sign-in popup.

Connected through a ticket from the trigger route and the popup (``oauth.service``,
``web.popup``); what is stored is ``oauth.tokens.stored_token``'s; a node gets the access
token, its type, expiry and scope, the per-connection settings and the kept extra fields
(never the refresh token); renewed with the refresh token (``oauth.client.refresh``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from ..catalog import OAuth2Provider, ProviderBase
from ..errors import InvalidInput, TokenEndpointError
from ..integrations import Integration
from ..oauth import client
from ..oauth.client import Borrowed
from ..oauth.decisions import Outcome
from ..oauth.flows import Flow
from ..oauth.issuer import check_issuer
from ..oauth.service import FlowFailed, single
from ..oauth.tokens import stored_token
from ..providers import popup_integration
from .base import TokenKind

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["KIND", "OAuth2Kind", "authorization_url"]

log = logging.getLogger("broker.oauth")


class OAuth2Kind(TokenKind):
    name = "oauth2"
    title = "OAuth 2.0"
    connect = "popup"

    @property
    def spec(self) -> type[ProviderBase]:
        return OAuth2Provider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, OAuth2Provider)
        return popup_integration(spec)

    async def renew(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        assert isinstance(spec, OAuth2Provider)
        refresh_token = stored.get("refresh_token")
        if not refresh_token:
            raise TokenEndpointError(
                f"{spec.display_name}: no refresh token was issued",
                error="invalid_grant", status=None, retry_after=None,
                outcome=Outcome.reauth,
            )
        return await client.refresh(
            spec, refresh_token=refresh_token, settings=stored.get("settings") or {},
            transport=broker.token_transport,
        )

    async def begin(self, broker: Broker, spec: ProviderBase, flow: Flow) -> str:
        assert isinstance(spec, OAuth2Provider)
        return authorization_url(
            spec, state=flow.state, verifier=flow.verifier,
            redirect_uri=broker.settings.redirect_uri, settings=flow.settings,
        )

    async def complete(
        self, broker: Broker, spec: ProviderBase, flow: Flow,
        params: Mapping[str, list[str]], *, transport: httpx.AsyncBaseTransport,
    ) -> dict[str, Any]:
        assert isinstance(spec, OAuth2Provider)
        name, label = spec.name, spec.display_name
        iss = single(params, "iss", name)
        others = [
            i.provider for i in broker.registry if isinstance(i.provider, OAuth2Provider)
        ]
        refusal = check_issuer(iss, spec, others, settings=flow.settings)
        if refusal is not None:
            log.warning("refused an OAuth2 callback for %s: %s", name, refusal.reason)
            said = "say it came" if refusal.missing else "come"
            raise FlowFailed(
                f"The sign-in response did not {said} from {label}. Start again.",
                integration=name,
            )
        code = single(params, "code", name)
        if not code:
            raise FlowFailed(f"{label} did not return an authorization code.", integration=name)
        # The provider's clock for expires_in starts before its answer reaches us: count
        # from the request, so a slow answer never makes a token look longer-lived.
        requested_at = broker.now()
        try:
            response = await client.exchange_code(
                spec, code=code, code_verifier=flow.verifier,
                redirect_uri=broker.settings.redirect_uri, settings=flow.settings,
                transport=transport,
            )
        except TokenEndpointError as exc:
            reason = f" ({exc.error})" if exc.error else ""
            raise FlowFailed(
                f"{label} did not issue a token{reason}. Start again.", integration=name,
                status_code=502 if exc.outcome == Outcome.transient else 400,
            ) from None
        try:
            return stored_token(
                response, now=requested_at, default_lifetime=spec.default_lifetime_seconds,
                token_path=spec.token_path, extra_fields=spec.extra_fields,
                settings=flow.settings, expires=spec.expires,
            )
        except ValueError:
            raise FlowFailed(
                f"{label} answered without an access token.", integration=name,
                status_code=502,
            ) from None

    def revocable(self, spec: ProviderBase) -> bool:
        return isinstance(spec, OAuth2Provider) and (
            spec.revocation_url is not None or spec.revocation is not None
        )

    async def revoke(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> str:
        assert isinstance(spec, OAuth2Provider)
        if spec.revocation is not None:
            return await _revoke_as_described(broker, spec, stored)
        # The refresh token when there is one: revoking it ends the grant (RFC 7009 2.1).
        refresh_token = stored.get("refresh_token")
        token, hint = (
            (refresh_token, "refresh_token") if refresh_token
            else (stored.get("access_token"), "access_token")
        )
        if not isinstance(token, str) or not token:
            return "refused"
        try:
            status = await client.revoke(
                spec, token=token, token_type_hint=hint,
                settings=stored.get("settings") or {}, transport=broker.token_transport,
            )
        except (httpx.HTTPError, InvalidInput, OSError):
            return "unreachable"
        return "revoked" if status == 200 else "refused"


async def _revoke_as_described(
    broker: Broker, spec: OAuth2Provider, stored: Mapping[str, Any]
) -> str:
    """Revoke at a non-RFC endpoint (``spec.revocation``); the outcome, as ``revoke``."""
    described = spec.revocation
    assert described is not None and spec.client_id is not None
    client_id = spec.client_id.get_secret_value()
    try:
        url = spec.render_url(
            described.url, {**(stored.get("settings") or {}), "client_id": client_id}
        )
    except InvalidInput:
        return "unreachable"
    request = described.request(
        url, stored, client_id=client_id,
        client_secret=spec.client_secret.get_secret_value() if spec.client_secret else None,
    )
    if request is None:
        return "refused"
    try:
        async with httpx.AsyncClient(
            transport=Borrowed(broker.token_transport), timeout=spec.timeout_seconds,
            follow_redirects=False,
        ) as http:
            response = await http.send(request)
    except (httpx.HTTPError, OSError):
        return "unreachable"
    return "revoked" if response.status_code in described.ok_status else "refused"


def authorization_url(
    spec: OAuth2Provider, *, state: str, verifier: str | None, redirect_uri: str,
    settings: Mapping[str, str],
) -> str:
    assert spec.client_id is not None
    params: dict[str, Any] = dict(spec.authorization_params)
    if verifier is not None:
        params["code_challenge"] = create_s256_code_challenge(verifier)
        params["code_challenge_method"] = "S256"
    uri: str = prepare_grant_uri(
        spec.render_url(spec.authorization_url, settings),
        client_id=spec.client_id.get_secret_value(),
        response_type="code",
        redirect_uri=redirect_uri,
        scope=spec.scope_string(),
        state=state,
        **params,
    )
    return uri


KIND = OAuth2Kind()
