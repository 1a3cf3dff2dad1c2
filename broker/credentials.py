"""Handing credentials out: decrypt, refresh on demand, show nodes only what they need.

An OAuth2 credential handed out is valid for at least ``refresh.min_validity_seconds`` (or
half its lifetime, for tokens shorter than that); closer to expiry it is refreshed first.
In this process, concurrent requests for one connection share one refresh (one future);
the refreshed row is written only if no one else changed it meanwhile.

What nodes get: an API key's fields as stored; for OAuth2, ``access_token``,
``token_type``, ``expires_at``, ``scope``, the per-connection settings and the kept extra
fields — never the refresh token or a client secret.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .catalog import OAuth2ClientCredentialsProvider, OAuth2Provider
from .errors import (
    IntegrationNeedsReauth,
    IntegrationNotConnected,
    IntegrationUnavailable,
    TokenEndpointError,
)
from .integrations import Integration
from .oauth import client
from .oauth.decisions import Outcome
from .oauth.tokens import node_view, stored_token
from .refresh import needs_refresh
from .store.repository import Credential

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = ["Credentials"]

log = logging.getLogger("broker.credentials")
TOKEN_TYPES = ("oauth2", "oauth2_cc")


def expiry(token: dict[str, Any]) -> datetime | None:
    value = token.get("expires_at")
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) else None


class Credentials:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._inflight: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}

    async def get(
        self, group_id: str, integration: Integration, *, force_refresh: bool = False
    ) -> dict[str, Any]:
        key = integration.key
        async with self.broker.session() as db:
            found = await self.broker.repository.get(db, group_id, key)
        if found is None:
            raise IntegrationNotConnected([key], group_id)
        if found.info.auth_type not in TOKEN_TYPES:
            return found.data
        if found.info.status == "reauth_required":
            raise IntegrationNeedsReauth(key, integration.name)
        token = found.data
        if force_refresh or self._stale(token):
            token = await self._refresh_shared(group_id, integration, found, force_refresh)
        return node_view(token)

    def _stale(self, token: dict[str, Any]) -> bool:
        expires_at = expiry(token)
        lifetime = float(token.get("lifetime") or 0)
        min_validity = float(self.broker.settings.refresh.min_validity_seconds)
        if lifetime:
            min_validity = min(min_validity, lifetime / 2)
        return needs_refresh(expires_at, self.broker.now(), min_validity=min_validity)

    async def _refresh_shared(
        self, group_id: str, integration: Integration, found: Credential, force: bool
    ) -> dict[str, Any]:
        flight = (group_id, integration.key)
        pending = self._inflight.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            result = await self._refresh(group_id, integration, found, force)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it; no "never retrieved" noise
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[flight]

    async def _refresh(
        self, group_id: str, integration: Integration, found: Credential, force: bool
    ) -> dict[str, Any]:
        broker = self.broker
        key = integration.key
        spec = integration.provider
        old = found.data
        try:
            if isinstance(spec, OAuth2Provider):
                refresh_token = old.get("refresh_token")
                if not refresh_token:
                    raise TokenEndpointError(
                        f"{spec.display_name}: no refresh token stored",
                        error="invalid_grant", status=None, retry_after=None,
                        outcome=Outcome.reauth,
                    )
                response = await client.refresh(
                    spec, refresh_token=refresh_token, settings=old.get("settings") or {}
                )
            elif isinstance(spec, OAuth2ClientCredentialsProvider):
                creds = old.get("client") or {}
                response = await client.client_credentials(
                    spec,
                    client_id=creds.get("client_id", ""),
                    client_secret=creds.get("client_secret", ""),
                    scopes=creds.get("scopes"),
                    audience=creds.get("audience"),
                )
            else:
                return old
        except TokenEndpointError as exc:
            return await self._failed(group_id, integration, found, exc)
        now = broker.now()
        token = stored_token(
            response,
            now=now,
            default_lifetime=spec.default_lifetime_seconds,
            token_path=spec.token_path,
            extra_fields=spec.extra_fields,
            previous_refresh_token=old.get("refresh_token"),
            settings=old.get("settings"),
        )
        if "client" in old:
            token["client"] = old["client"]
        async with broker.session() as db, db.begin():
            stored = await broker.repository.replace_if_version(
                db, group_id, key, found.info.version, token,
                expires_at=expiry(token),
                next_refresh_at=broker.next_refresh_at(now, expiry(token)),
            )
        if stored is None:
            # Someone else refreshed (or reconnected) meanwhile: theirs is the current one.
            async with broker.session() as db:
                current = await broker.repository.get(db, group_id, key)
            if current is None:
                raise IntegrationNotConnected([key], group_id)
            return current.data
        return token

    async def _failed(
        self, group_id: str, integration: Integration, found: Credential, exc: TokenEndpointError
    ) -> dict[str, Any]:
        broker = self.broker
        key = integration.key
        if exc.outcome == Outcome.reauth:
            log.warning("connection %s/%s needs reauth: %s", group_id, key, exc)
            async with broker.session() as db, db.begin():
                await broker.repository.set_status(
                    db, group_id, key, "reauth_required", last_error=str(exc)
                )
            raise IntegrationNeedsReauth(key, integration.name) from None
        log.warning("refresh of %s/%s failed (%s): %s", group_id, key, exc.outcome, exc)
        expires_at = expiry(found.data)
        if expires_at is not None and expires_at > broker.now():
            return found.data
        raise IntegrationUnavailable(key, integration.name) from None
