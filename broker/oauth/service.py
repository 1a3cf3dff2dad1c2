"""The authorization-code flow, end to end: begin (authorize route) and finish (callback).

``begin`` validates the per-connection settings, records the flow and returns the provider
URL to redirect the popup to. ``finish`` consumes the flow (committed at once, so a state
is used at most once whatever happens next), checks it, exchanges the code and stores the
tokens. Every failure is a ``FlowFailed`` with a message fit to show the user; nothing is
stored unless the whole flow succeeded.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from ..catalog import OAuth2Provider, render_url
from ..errors import BrokerError, InvalidInput, TokenEndpointError
from . import client
from .flows import consume_flow, hash_secret, new_verifier, start_flow
from .issuer import check_issuer
from .tokens import stored_token

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["FlowFailed", "FlowResult", "begin", "check_settings", "finish", "flow_cookie"]

MAX_PARAM = 4096
log = logging.getLogger("broker.oauth")


class FlowFailed(BrokerError):
    """The flow cannot finish; ``message`` is what the user sees."""

    def __init__(self, message: str, *, integration: str | None = None, status_code: int = 400):
        super().__init__(message)
        self.message = message
        self.integration = integration
        self.status_code = status_code


@dataclass(frozen=True)
class FlowResult:
    integration: str
    display_name: str
    group_id: str
    return_to: str | None


def flow_cookie(state: str) -> str:
    """The name of the cookie binding the flow for ``state`` to its browser (one per flow,
    so two sign-ins started in one browser do not overwrite each other's)."""
    return "broker_flow_" + hash_secret(state)[:16]


def check_settings(spec: OAuth2Provider, given: Mapping[str, str]) -> dict[str, str]:
    """The per-connection settings from ``given`` (query parameters), validated."""
    values: dict[str, str] = {}
    for name, field in spec.settings.items():
        value = (given.get(name) or field.default or "").strip()
        if not value:
            if field.required:
                raise InvalidInput(f"{field.title} is required.", field=name)
            continue
        if len(value) > field.max_length or not field.matches(value):
            example = f" (like {field.example})" if field.example else ""
            raise InvalidInput(f"{field.title} does not look right{example}.", field=name)
        values[name] = value
    return values


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
        render_url(spec.authorization_url, settings),
        client_id=spec.client_id.get_secret_value(),
        response_type="code",
        redirect_uri=redirect_uri,
        scope=spec.scope_string(),
        state=state,
        **params,
    )
    return uri


async def begin(
    broker: Broker,
    spec: OAuth2Provider,
    *,
    group_id: str,
    session_hash: str | None,
    query: Mapping[str, str],
    return_to: str | None,
    browser_nonce: str,
) -> tuple[str, str]:
    """Record a flow; return the provider's authorization URL and the flow's state."""
    settings = check_settings(spec, query)
    verifier = new_verifier() if spec.pkce else None
    async with broker.session() as db, db.begin():
        state = await start_flow(
            db,
            broker.keyring,
            group_id=group_id,
            integration=spec.name,
            session_hash=session_hash,
            verifier=verifier,
            settings=settings,
            return_to=return_to,
            browser_hash=hash_secret(browser_nonce),
            issuer=spec.issuer,
            now=broker.now(),
        )
    url = authorization_url(
        spec,
        state=state,
        verifier=verifier,
        redirect_uri=broker.settings.redirect_uri,
        settings=settings,
    )
    return url, state


def _single(
    params: Mapping[str, list[str]], name: str, integration: str | None = None
) -> str | None:
    values = params.get(name) or []
    if len(values) > 1:
        raise FlowFailed(
            f"The sign-in response repeats {name!r}; start again.", integration=integration
        )
    if values and (len(values[0]) > MAX_PARAM or "\x00" in values[0]):
        raise FlowFailed(
            f"The sign-in response has a malformed {name!r}; start again.",
            integration=integration,
        )
    return values[0] if values else None


async def finish(
    broker: Broker,
    params: Mapping[str, list[str]],
    *,
    browser_nonce: str | None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FlowResult:
    """Finish the flow named by ``state`` in ``params`` (the callback's query)."""
    state = _single(params, "state")
    if not state:
        raise FlowFailed("The sign-in response has no state. Start again from the app.")
    async with broker.session() as db, db.begin():
        flow = await consume_flow(db, broker.keyring, state)
    if flow is None:
        raise FlowFailed("This sign-in link is invalid or was already used. Start again.")
    name = flow.integration
    if flow.expires_at <= broker.now():
        raise FlowFailed("This sign-in took too long. Start again.", integration=name)
    if browser_nonce is None or not hmac.compare_digest(
        hash_secret(browser_nonce), flow.browser_hash or ""
    ):
        raise FlowFailed(
            "This sign-in was started in another browser. Start again here.", integration=name
        )
    integration = broker.registry.get(name) if name in broker.registry else None
    spec = integration.provider if integration is not None else None
    if not isinstance(spec, OAuth2Provider):
        raise FlowFailed("This integration is no longer enabled.", integration=name)
    label = spec.display_name

    error = _single(params, "error", name)
    if error is not None:
        if error == "access_denied":
            raise FlowFailed(f"Access to {label} was declined.", integration=name)
        raise FlowFailed(f"{label} could not complete the sign-in.", integration=name)
    iss = _single(params, "iss", name)
    others = [i.provider for i in broker.registry if isinstance(i.provider, OAuth2Provider)]
    refusal = check_issuer(iss, spec, others, settings=flow.settings)
    if refusal is not None:
        log.warning("refused an OAuth2 callback for %s: %s", name, refusal.reason)
        said = "say it came" if refusal.missing else "come"
        raise FlowFailed(
            f"The sign-in response did not {said} from {label}. Start again.", integration=name
        )
    code = _single(params, "code", name)
    if not code:
        raise FlowFailed(f"{label} did not return an authorization code.", integration=name)

    try:
        response = await client.exchange_code(
            spec,
            code=code,
            code_verifier=flow.verifier,
            redirect_uri=broker.settings.redirect_uri,
            settings=flow.settings,
            transport=transport if transport is not None else broker.token_transport,
        )
    except TokenEndpointError as exc:
        reason = f" ({exc.error})" if exc.error else ""
        raise FlowFailed(
            f"{label} did not issue a token{reason}. Start again.",
            integration=name,
            status_code=502 if exc.outcome == "transient" else 400,
        ) from None
    now = broker.now()
    try:
        token = stored_token(
            response,
            now=now,
            default_lifetime=spec.default_lifetime_seconds,
            token_path=spec.token_path,
            extra_fields=spec.extra_fields,
            settings=flow.settings,
        )
    except ValueError:
        raise FlowFailed(
            f"{label} answered without an access token.", integration=name, status_code=502
        ) from None
    await broker.store_token(flow.group_id, name, "oauth2", token, hint={})
    return FlowResult(name, label, flow.group_id, flow.return_to)
