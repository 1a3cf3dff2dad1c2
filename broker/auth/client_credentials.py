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
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ..catalog import OAuth2ClientCredentialsProvider, ProviderBase
from ..connectvalues import learn, shown
from ..credentials import expiry
from ..errors import CredentialRejected, ProviderUnreachable, TokenEndpointError
from ..integrations import Integration
from ..oauth import client
from ..oauth.client import Borrowed
from ..oauth.decisions import Outcome
from ..oauth.tokens import node_view, stored_token
from ..providers import base_integration, check_api_values, read_fields
from .base import TokenKind

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
    name = spec.name

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        data = await read_fields(spec, request)
        creds = {
            "client_id": data["client_id"],
            "client_secret": data["client_secret"],
            "scopes": data.get("scopes", "").split() or None,
            "audience": data.get("audience"),
        }
        broker = db.info["broker"]
        now = broker.now()  # expiry counted from the request (see oauth2.py)
        try:
            response = await _request(broker, spec, creds)
        except TokenEndpointError as exc:
            reason = f" ({exc.error})" if exc.error else ""
            if exc.outcome == Outcome.transient:
                raise ProviderUnreachable(
                    f"{spec.display_name} could not issue a token right now{reason}. "
                    "Try again later."
                ) from None
            raise CredentialRejected(
                f"{spec.display_name} did not accept these client credentials{reason}.",
                field="client_secret",
            ) from None
        try:
            token = stored_token(
                response, now=now, default_lifetime=spec.default_lifetime_seconds,
                token_path=spec.token_path, extra_fields=spec.extra_fields,
                expires=spec.expires, renewable=True,
            )
        except ValueError:
            raise ProviderUnreachable(
                f"{spec.display_name} answered without an access token."
            ) from None
        learnt = await learn(spec, node_view(token), transport=Borrowed(broker.token_transport))
        token["extra"].update(learnt)
        check_api_values(spec, node_view(token))
        token["client"] = creds
        expires_at = expiry(token)
        await broker.repository.put(
            db, str(group.id), name, token, auth_type=spec.auth_type,
            hint={"client_id": data["client_id"], **shown(spec, learnt)},
            expires_at=expires_at,
            next_refresh_at=broker.next_refresh_at(now, expires_at, spec),
        )
        return {"integration": name, "status": "connected"}

    return base_integration(spec, complete)


KIND = ClientCredentialsKind()
