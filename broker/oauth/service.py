"""The sign-in popup's flow, end to end, for every auth type connected through it: ticket,
start, finish (the auth type's ``begin`` and ``complete`` do what is theirs: for OAuth2,
the authorization URL, the issuer check and the code exchange).

``issue_ticket`` (the ticket route) validates the per-connection settings and records the
flow. ``start`` (``POST /oauth/start``, from a page of the broker's own) redeems the ticket,
binds the flow to the browser and returns the provider URL to send it to. ``finish`` (the
callback) consumes the flow (committed at once, so a state is used at most once whatever
happens next), checks it, exchanges the code and stores the tokens. A flow needs its connect
session, when it was made with one, to be valid at every step. Every failure after the
ticket is a ``FlowFailed`` with a message fit to show the user; nothing is stored unless the
whole flow succeeded.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from ..auth import kind
from ..catalog import PopupProvider
from ..connectvalues import ValueNotLearnt, learn, shown
from ..errors import BrokerError, CredentialCorrupt, InvalidInput
from ..sessions import find_session_by_hash
from .client import Borrowed
from .flows import Flow, consume_flow, create_ticket, hash_secret, new_verifier, redeem_ticket

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = [
    "FlowFailed",
    "FlowResult",
    "Ticket",
    "check_settings",
    "finish",
    "flow_cookie",
    "issue_ticket",
    "single",
    "start",
]

log = logging.getLogger("broker.oauth")
MAX_PARAM = 4096


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


@dataclass(frozen=True)
class Ticket:
    ticket: str
    expires_at: datetime


def flow_cookie(state: str) -> str:
    """The name of the cookie binding the flow for ``state`` to its browser (one per flow,
    so two sign-ins started in one browser do not overwrite each other's)."""
    return "broker_flow_" + hash_secret(state)[:16]


def check_settings(spec: PopupProvider, given: Mapping[str, Any]) -> dict[str, str]:
    """The per-connection settings from ``given``, validated (InvalidInput names the
    first field at fault)."""
    unknown = sorted(set(given) - set(spec.settings))
    if unknown:
        raise InvalidInput("Unknown setting.", field=str(unknown[0])[:64])
    values: dict[str, str] = {}
    for name, field in spec.settings.items():
        raw = given.get(name)
        if raw is not None and not isinstance(raw, str):
            raise InvalidInput(f"{field.title} must be a string.", field=name)
        value = (raw or field.default or "").strip()
        if not value:
            if field.required:
                raise InvalidInput(f"{field.title} is required.", field=name)
            continue
        if len(value) > field.max_length or not field.matches(value):
            example = f" (like {field.example})" if field.example else ""
            raise InvalidInput(f"{field.title} does not look right{example}.", field=name)
        values[name] = value
    return values


async def issue_ticket(
    broker: Broker,
    spec: PopupProvider,
    *,
    group_id: str,
    session_hash: str | None,
    settings: Mapping[str, Any],
    return_to: str | None,
) -> Ticket:
    """Record a flow awaiting its start; return its single-use ticket. Raises InvalidInput
    when a setting does not fit."""
    values = check_settings(spec, settings)
    for url in spec.urls():
        spec.render_url(url, values)  # a value the URL's host may not take: InvalidInput
    verifier = new_verifier() if spec.pkce else None
    async with broker.session() as db, db.begin():
        ticket, expires_at = await create_ticket(
            db,
            broker.keyring,
            group_id=group_id,
            integration=spec.name,
            session_hash=session_hash,
            verifier=verifier,
            settings=values,
            return_to=return_to,
            issuer=spec.issuer,
            now=broker.now(),
        )
    return Ticket(ticket, expires_at)


async def _session_lapsed(db: AsyncSession, flow: Flow, now: datetime) -> bool:
    """Whether the connect session the flow was made with has ended (a flow made with a
    service token has none to end)."""
    if flow.session_hash is None:
        return False
    grant = await find_session_by_hash(db, flow.session_hash)
    return grant is None or grant.expires_at <= now


SESSION_ENDED = "The connect session ended before the sign-in finished. Start again from the app."


async def start(broker: Broker, ticket: str, *, browser_nonce: str) -> tuple[str, str]:
    """Start the flow of ``ticket`` in the browser holding ``browser_nonce``; return the
    provider's authorization URL and the flow's state. Raises FlowFailed."""
    now = broker.now()
    corrupt = False
    async with broker.session() as db, db.begin():
        try:
            flow = await redeem_ticket(
                db, broker.keyring, ticket, browser_hash=hash_secret(browser_nonce), now=now
            )
        except CredentialCorrupt:
            corrupt, flow = True, None  # redeemed all the same: the ticket is spent
        lapsed = flow is not None and await _session_lapsed(db, flow, now)
    if corrupt:
        log.error("a flow in progress does not decrypt: check encryption_keys")
        raise FlowFailed(
            "This sign-in cannot continue. Start again from the app.", status_code=500
        )
    if flow is None:
        raise FlowFailed(
            "This sign-in was already started, or took too long to start. "
            "Start again from the app."
        )
    name = flow.integration
    if lapsed:
        raise FlowFailed(SESSION_ENDED, integration=name, status_code=401)
    spec = _popup_spec(broker, name)
    try:
        url = await kind(spec.auth_type).begin(broker, spec, flow)
    except InvalidInput as exc:  # the provider's allowed hosts changed since the ticket
        raise FlowFailed(exc.message, integration=name) from None
    return url, flow.state


def _popup_spec(broker: Broker, name: str) -> PopupProvider:
    """The enabled popup provider ``name``; FlowFailed when it is no longer enabled."""
    integration = broker.registry.get(name) if name in broker.registry else None
    spec = integration.provider if integration is not None else None
    if not isinstance(spec, PopupProvider):
        raise FlowFailed("This integration is no longer enabled.", integration=name)
    return spec


def single(
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
    state = single(params, "state")
    if not state:
        raise FlowFailed("The sign-in response has no state. Start again from the app.")
    now = broker.now()
    corrupt = False
    async with broker.session() as db, db.begin():
        try:
            flow = await consume_flow(db, broker.keyring, state)
        except CredentialCorrupt:
            # Consumed all the same (the DELETE commits): nobody can finish this flow.
            corrupt, flow = True, None
        lapsed = flow is not None and await _session_lapsed(db, flow, now)
    if corrupt:
        log.error("a flow in progress does not decrypt: check encryption_keys")
        raise FlowFailed(
            "This sign-in cannot be finished. Start again from the app.", status_code=500
        )
    if flow is None:
        raise FlowFailed("This sign-in link is invalid or was already used. Start again.")
    name = flow.integration
    if flow.expires_at <= now:
        raise FlowFailed("This sign-in took too long. Start again.", integration=name)
    if browser_nonce is None or not hmac.compare_digest(
        hash_secret(browser_nonce), flow.browser_hash or ""
    ):
        raise FlowFailed(
            "This sign-in was started in another browser. Start again here.", integration=name
        )
    if lapsed:
        raise FlowFailed(SESSION_ENDED, integration=name, status_code=401)
    spec = _popup_spec(broker, name)
    label = spec.display_name
    error = single(params, "error", name)
    if error is not None:
        if error == "access_denied":
            raise FlowFailed(f"Access to {label} was declined.", integration=name)
        raise FlowFailed(f"{label} could not complete the sign-in.", integration=name)
    transport = transport if transport is not None else broker.token_transport
    token = await kind(spec.auth_type).complete(
        broker, spec, flow, params, transport=transport
    )
    try:
        learnt = await learn(
            spec, kind(spec.auth_type).node_view(token), query=params,
            transport=Borrowed(transport),
        )
    except ValueNotLearnt as exc:
        raise FlowFailed(f"{exc.message} Start again.", integration=name,
                         status_code=502) from None
    token["extra"].update(learnt)
    placement = spec.placement()
    if placement is not None:
        try:
            placement.check_values(kind(spec.auth_type).node_view(token))
        except InvalidInput as exc:
            raise FlowFailed(
                f"{label} sent an address for its API that the broker may not use "
                f"({exc.field}).", integration=name, status_code=502,
            ) from None
    await broker.store_token(
        flow.group_id, name, spec.auth_type, token, hint=shown(spec, learnt)
    )
    return FlowResult(name, label, flow.group_id, flow.return_to)
