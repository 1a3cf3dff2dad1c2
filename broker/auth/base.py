"""The protocol every auth type implements, and the behaviour they share by default.

An auth type is one module of ``broker.auth`` holding one ``AuthKind``: what its provider
files look like (``spec``, a ``catalog.ProviderBase`` subclass), how a connection is made
(``integration``: a form posted to the trigger route, or a sign-in popup), what is stored
and what a node gets of it (``node_view``), whether the refresh engine renews it
(``refreshable``) and how (``renew``: the token request; the engine's single flight,
leases and outcomes are shared by every refreshable type, in ``credentials``), and what a
refreshed credential keeps of the old one (``carry``), and whether and how a disconnected
one is revoked at the provider (``revocable``, ``revoke``); for the types connected
through the popup, where the browser goes and what the callback becomes (``begin``,
``complete``). How the credential goes on a request is the spec's
(``ProviderBase.default_auth``, overridden by ``api.auth``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..oauth.tokens import node_view, stored_token

if TYPE_CHECKING:
    import httpx

    from ..catalog import ProviderBase
    from ..integrations import Integration
    from ..oauth.flows import Flow
    from ..runtime import Broker

__all__ = ["AuthKind", "TokenKind"]


class AuthKind:
    """One auth type. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    """The ``auth_type`` of its provider files and stored connections."""
    title: ClassVar[str]
    """What the connect page calls it ("API key", "OAuth 2.0")."""
    connect: ClassVar[Literal["form", "popup"]] = "form"
    """How a user connects: the provider's fields posted to the trigger route, or a
    sign-in popup."""
    refreshable: ClassVar[bool] = False
    """Whether its credential is a token the refresh engine renews before expiry."""
    signs: ClassVar[bool] = False
    """Whether each API request is signed with secrets only the broker holds (``signer``)
    rather than carrying a credential a node could hold (``api.auth``)."""
    renews_without_refresh_token: ClassVar[bool] = False
    """Whether a renewal needs no refresh token (the client credentials grant is asked
    again): a token of such a type never counts as non-expiring for lacking one."""

    @property
    def spec(self) -> type[ProviderBase]:
        """Its provider schema."""
        raise NotImplementedError

    def integration(self, spec: ProviderBase) -> Integration:
        """The Integration an enabled provider of this type becomes."""
        raise NotImplementedError

    def node_view(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """What a node gets of a stored credential (default: all of it)."""
        return dict(stored)

    def signer(
        self, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Callable[[httpx.Request], None] | None:
        """Types that ``sign``: what signs an API request in place, for the stored
        credential (None: it cannot sign)."""
        return None

    async def begin(self, broker: Broker, spec: ProviderBase, flow: Flow) -> str:
        """Popup types: the URL to send the browser to for ``flow`` (its ``state`` must
        come back on the callback). Raises InvalidInput for a setting the provider's
        URLs may no longer take."""
        raise NotImplementedError(f"{self.name} is not connected through a popup")

    async def complete(
        self, broker: Broker, spec: ProviderBase, flow: Flow,
        params: Mapping[str, list[str]], *, transport: httpx.AsyncBaseTransport,
    ) -> dict[str, Any]:
        """Popup types: the credential to store from the callback's query ``params``
        (the flow already checked: state, browser, session, no ``error``). Raises
        ``oauth.service.FlowFailed`` with what the user should read."""
        raise NotImplementedError(f"{self.name} is not connected through a popup")

    async def renew(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """The token endpoint's answer to a renewal of ``stored`` (refreshable types).
        Raises TokenEndpointError."""
        raise NotImplementedError(f"{self.name} credentials are not renewed")

    def revocable(self, spec: ProviderBase) -> bool:
        """Whether a disconnected credential of ``spec`` is revoked at the provider."""
        return False

    async def revoke(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> str:
        """Revoke a disconnected credential at the provider (``revocable`` types); the
        outcome for the event: ``revoked``, ``refused`` (an error status) or
        ``unreachable``. Never raises for the provider's failures."""
        raise NotImplementedError(f"{self.name} credentials are not revoked")

    def token(
        self, spec: ProviderBase, response: Mapping[str, Any], *, now: datetime,
        old: Mapping[str, Any],
    ) -> dict[str, Any]:
        """What is stored of a renewal's answer (refreshable types); ValueError (naming
        no value) when it holds no token. ``carry`` then adds what is kept of ``old``."""
        raise NotImplementedError(f"{self.name} credentials are not renewed")

    def carry(self, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        """Copy into a renewed credential what it keeps of the old one (default: nothing
        beyond what ``oauth.tokens.stored_token`` keeps)."""

    def outcome(self, outcome: str) -> str:
        """What a failed renewal's outcome (``oauth.decisions.Outcome``) means for this
        type's connections (default: as classified)."""
        return outcome


class TokenKind(AuthKind):
    """A type whose credential is an OAuth2 token the refresh engine renews: a node gets
    ``oauth.tokens.node_view`` of it (never the refresh token or client credentials)."""

    refreshable = True

    def node_view(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        return node_view(stored)

    def token(
        self, spec: ProviderBase, response: Mapping[str, Any], *, now: datetime,
        old: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The token endpoint's answer as ``oauth.tokens.stored_token`` keeps it, read as
        the spec's token endpoint says (``catalog.TokenEndpoint``)."""
        from ..catalog import TokenEndpoint

        assert isinstance(spec, TokenEndpoint)
        return stored_token(
            response,
            now=now,
            default_lifetime=spec.default_lifetime_seconds,
            token_path=spec.token_path,
            extra_fields=spec.extra_fields,
            previous_refresh_token=old.get("refresh_token"),
            previous_extra=old.get("extra"),
            settings=old.get("settings"),
            expires=spec.expires,
            renewable=self.renews_without_refresh_token,
        )
