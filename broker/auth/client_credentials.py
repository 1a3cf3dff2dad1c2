"""``oauth2_cc``: client credentials the user submits; the broker fetches the tokens.

Connected by posting a client id and secret (and optional scopes, audience) to the trigger
route: a token is requested at once, and nothing is stored unless the provider issues one.
Stored: the token, and the client credentials to renew it with (``client``), which a node
never gets. Renewed with the client credentials grant. A provider refusing them
(``invalid_client``) is the user's to fix, not the operator's: the connection then needs
reconnecting.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ..catalog import OAuth2ClientCredentialsProvider, ProviderBase
from ..errors import CredentialRejected, TokenEndpointError
from ..integrations import Integration
from ..oauth import client
from ..oauth.decisions import Outcome
from ..oauth.tokens import stored_token
from ..providers import base_integration, read_fields
from .base import TokenKind
from .tokenconnect import connect_with_token

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["KIND", "ClientCredentialsKind"]


class ClientCredentialsKind(TokenKind):
    name = "oauth2_cc"
    title = "Client credentials"
    renews_without_refresh_token = True

    @property
    def spec(self) -> type[ProviderBase]:
        return OAuth2ClientCredentialsProvider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, OAuth2ClientCredentialsProvider)
        return _integration(spec)

    async def renew(
        self, broker: Broker, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        assert isinstance(spec, OAuth2ClientCredentialsProvider)
        return await _request(broker, spec, stored.get("client") or {})

    def carry(self, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        if "client" in old:
            new["client"] = old["client"]

    def outcome(self, outcome: str) -> str:
        # The client credentials are the user's, not the operator's: they must fix them.
        return Outcome.reauth if outcome == Outcome.operator else outcome


async def _request(
    broker: Broker, spec: OAuth2ClientCredentialsProvider, creds: Mapping[str, Any]
) -> Mapping[str, Any]:
    """A token for the client credentials ``creds`` (as stored under ``client``)."""
    return await client.client_credentials(
        spec,
        client_id=creds.get("client_id", ""),
        client_secret=creds.get("client_secret", ""),
        scopes=creds.get("scopes"),
        audience=creds.get("audience"),
        transport=broker.token_transport,
    )


def _integration(spec: OAuth2ClientCredentialsProvider) -> Integration:
    """Connected by submitting a client id and secret; the broker fetches the token."""

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        data = await read_fields(spec, request)
        creds = {
            "client_id": data["client_id"],
            "client_secret": data["client_secret"],
            "scopes": data.get("scopes", "").split() or None,
            "audience": data.get("audience"),
        }
        broker = db.info["broker"]

        def refused(exc: TokenEndpointError) -> CredentialRejected:
            reason = f" ({exc.error})" if exc.error else ""
            return CredentialRejected(
                f"{spec.display_name} did not accept these client credentials{reason}.",
                field="client_secret",
            )

        def read(response: Mapping[str, Any], now: datetime) -> dict[str, Any]:
            return stored_token(
                response, now=now, default_lifetime=spec.default_lifetime_seconds,
                token_path=spec.token_path, extra_fields=spec.extra_fields,
                expires=spec.expires, renewable=True,
            )

        return await connect_with_token(
            db, str(group.id), spec, ask=lambda: _request(broker, spec, creds), read=read,
            refused=refused, keep=("client", creds), hint={"client_id": data["client_id"]},
        )

    return base_integration(spec, complete)


KIND = ClientCredentialsKind()
