"""Handing credentials out, and refreshing them: on demand and for the sweep.

An OAuth2 credential handed out is valid for at least ``refresh.min_validity_seconds`` (or
half its lifetime, for tokens shorter than that); closer to expiry it is refreshed first.

Single flight, at two levels:

- In this process (``flights.Flights``), every caller wanting a refresh of one connection
  waits for the one refresh running (on-demand requests and the sweep alike), and callers
  that miss the cache for one connection share one read (and the refresh it may lead to).
- Across processes and replicas, the refresher takes a *lease* on the row (a conditional
  UPDATE: free, or its holder's lease ran out), longer than the token request's timeout
  (``refresh.lease_seconds``), so a crashed holder blocks nobody for long. After claiming
  it re-reads the row: if someone else refreshed meanwhile, that token is used. Callers
  that find the lease held wait for the holder's result by polling the row, instead of
  refreshing again. The new token is written only while the lease is still ours.

A holder that stops mid-refresh (SIGKILL, OOM) may take the provider's answer with it: at a
provider that rotates refresh tokens the one stored is then spent. Nothing between the
answer and its commit waits on purpose (``writes.RefreshWriter``), and the next holder asks
again with the same refresh token as soon as the lease runs out (``lapses.LapseWatch``),
which providers with a reuse grace period accept. A claim reports a lease it took over from
a holder that stopped (``refresh.interrupted_by``); if the provider then says
``invalid_grant``, the ``reauth_required`` event says why (``refresh.reauth_reason``).

Outcomes (see ``oauth.decisions``): success stores the new tokens (keeping the old refresh
token when none comes back) in the same statement that releases the lease, through
``writes.RefreshWriter`` (refreshes finishing together share a transaction); a transient
failure reschedules with backoff and leaves the connection ``connected`` — a still-valid
token keeps being handed out, an expired one gives ``IntegrationUnavailable``;
``invalid_grant`` re-reads the row once, then marks it ``reauth_required``; an operator
error (``invalid_client``) is logged once per provider and retried with backoff.

What nodes get: an API key's fields as stored; for OAuth2, ``access_token``,
``token_type``, ``expires_at``, ``scope``, the per-connection settings and the kept extra
fields — never the refresh token or a client secret.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError

from .auth import kind
from .cache import CredentialCache, Entry
from .errors import (
    CredentialCorrupt,
    IntegrationNeedsReauth,
    IntegrationNotConnected,
    IntegrationUnavailable,
    TokenEndpointError,
    UnknownIntegration,
)
from .events import record
from .flights import Flights
from .integrations import Integration
from .logs import fields
from .oauth.decisions import Outcome
from .refresh import (
    backoff,
    interrupted_by,
    lease_covers,
    lease_seconds,
    needs_refresh,
    reauth_reason,
)
from .store.models import Connection
from .store.repository import Refreshed
from .writes import RefreshWriter

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = ["ANSWERED", "Credentials", "expiry"]

log = logging.getLogger("broker.credentials")
POLL_SECONDS = 0.05

ANSWERED: ContextVar[Callable[[], None] | None] = ContextVar("broker_answered", default=None)
"""Called once a refresh's token request is over (answered, refused or failed), before its
answer is stored: the sweep's slot for token requests is free for the next refresh while
this one writes (``scheduler.sweep``). Unset everywhere else."""


def expiry(token: dict[str, Any]) -> datetime | None:
    value = token.get("expires_at")
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Renewal:
    """A refresh's outcome: the token to use, and whether it is a new one (False: the
    refresh failed or was not needed, and a still-valid token was kept)."""

    token: dict[str, Any] = field(repr=False)
    renewed: bool


def _view(auth_type: str, data: dict[str, Any]) -> dict[str, Any]:
    return kind(auth_type).node_view(data)


def _renewed(auth_type: str) -> bool:
    """Whether connections of ``auth_type`` hold a token the refresh engine renews."""
    return kind(auth_type).refreshable


def is_stale(token: dict[str, Any], now: datetime, min_validity: float) -> bool:
    lifetime = float(token.get("lifetime") or 0)
    if lifetime:
        min_validity = min(min_validity, lifetime / 2)
    return needs_refresh(expiry(token), now, min_validity=min_validity)


class Credentials:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.owner = f"{os.getpid()}-{secrets.token_hex(6)}"
        # Single flights per connection: refreshes, and cache-miss loads (read + refresh).
        self._refreshes: Flights[Renewal] = Flights()
        self._loads: Flights[tuple[str, dict[str, Any]]] = Flights()
        self._operator_errors_logged: set[str] = set()
        self.cache = CredentialCache(broker)
        self.writer = RefreshWriter(broker)

    # --- handing out ---------------------------------------------------------------------

    def cached(self, group_id: str, key: str) -> dict[str, Any] | None:
        """What a node gets, when the cache can hand it out with no I/O at all (a trusted
        entry that is not a renewable token, or one still fresh); None otherwise, and the
        caller takes the whole path (``get``)."""
        entry = self.cache.get((group_id, key))
        if entry is None or (
            _renewed(entry.auth_type)
            and (entry.status == "reauth_required" or self._stale(entry.data))
        ):
            return None
        self.broker.metrics.reads_from_cache.inc()
        return _view(entry.auth_type, entry.data)

    async def get(
        self,
        group_id: str,
        integration: Integration,
        *,
        force_refresh: bool = False,
        use_cache: bool = True,
    ) -> dict[str, Any]:
        """What a node gets (see the module doc). ``use_cache=False`` always reads the row."""
        key = integration.key
        metrics = self.broker.metrics
        if not use_cache or force_refresh:
            metrics.reads_from_store.inc()
            auth_type, data = await self._load(
                group_id, integration, force=force_refresh, use_cache=use_cache
            )
            return _view(auth_type, data)
        view = self.cached(group_id, key)
        if view is not None:
            return view
        entry = self.cache.get((group_id, key))
        if entry is not None:
            if entry.status == "reauth_required":
                raise IntegrationNeedsReauth(key, integration.name)
            metrics.reads_from_store.inc()
            # Cached but due: straight to the refresh, which reads the row under its lease.
            return _view(
                entry.auth_type,
                await self.refresh(group_id, integration, seen_version=entry.version),
            )
        metrics.reads_from_store.inc()
        flight = (group_id, key)
        started = self._loads.started(flight)
        if started is None:
            auth_type, data = await self._loads.run(
                flight, lambda: self._load(group_id, integration, use_cache=True)
            )
        elif not self.cache.invalidated_since(flight, started):
            # A burst of callers for one connection makes one read (and at most one
            # refresh), not one each queued for the pool ahead of the refresh.
            auth_type, data = await self._loads.join(flight)
        else:
            # The load in flight began before this process last changed the connection:
            # its answer may be older than a write this caller could have seen.
            auth_type, data = await self._load(group_id, integration, use_cache=True)
        return _view(auth_type, data)

    async def renew_rejected(
        self, group_id: str, integration: Integration, rejected: str | None
    ) -> dict[str, Any] | None:
        """What a node gets after the provider refused the access token ``rejected``.

        If the stored token is already another one (someone refreshed meanwhile), that one;
        else a forced refresh, the one single flight every caller of this connection
        shares. None when the connection's credential cannot be refreshed (an API key).
        Raises as ``get`` does, and IntegrationNeedsReauth when the provider refuses the
        refresh too.
        """
        key = integration.key
        flight = (group_id, key)
        auth_type = getattr(integration.provider, "auth_type", "")
        if self._refreshes.running(flight):
            return _view(auth_type, (await self._refreshes.join(flight)).token)
        async with self.broker.session() as db:
            found = await self.broker.repository.get(db, group_id, key)
        if found is None:
            raise IntegrationNotConnected([key], group_id)
        if not _renewed(found.info.auth_type):
            return None
        if found.info.status == "reauth_required":
            raise IntegrationNeedsReauth(key, integration.name)
        if found.data.get("access_token") != rejected:
            return _view(found.info.auth_type, found.data)
        token = await self.refresh(
            group_id, integration, seen_version=found.info.version, force=True
        )
        return _view(found.info.auth_type, token)

    async def _load(
        self, group_id: str, integration: Integration, *, use_cache: bool, force: bool = False
    ) -> tuple[str, dict[str, Any]]:
        """Read the connection (caching it), and refresh its token when due or ``force``.
        Returns its auth type and its stored data."""
        key = integration.key
        read_started = time.monotonic()
        try:
            async with self.broker.session() as db:
                found = await self.broker.repository.get(db, group_id, key)
        except CredentialCorrupt:
            await self._mark_corrupt(group_id, key)
            raise
        if found is None:
            raise IntegrationNotConnected([key], group_id)
        if use_cache:
            self.cache.put(
                (group_id, key),
                Entry(found.info.version, found.info.auth_type, found.info.status, found.data),
                read_started=read_started,
            )
        auth_type = found.info.auth_type
        if not _renewed(auth_type):
            return auth_type, found.data
        if found.info.status == "reauth_required":
            raise IntegrationNeedsReauth(key, integration.name)
        if found.info.status == "corrupt":
            raise CredentialCorrupt(f"connection {key!r} of group {group_id!r} is corrupt")
        token = found.data
        if force or self._stale(token):
            token = await self.refresh(
                group_id, integration, seen_version=found.info.version, force=force
            )
        return auth_type, token

    def _stale(self, token: dict[str, Any]) -> bool:
        min_validity = float(self.broker.settings.refresh.min_validity_seconds)
        return is_stale(token, self.broker.now(), min_validity)

    async def _mark_corrupt(self, group_id: str, key: str) -> None:
        """An operator-level error naming the connection (never its contents); the row is
        marked ``corrupt`` so the list shows it and the sweep leaves it alone."""
        log.error(
            "stored credential of connection %s/%s does not decrypt or belongs to another "
            "connection: check encryption_keys; the user must reconnect if the data is lost",
            group_id, key, extra=fields(event="corrupt", group=group_id, integration=key),
        )
        async with self.broker.session() as db, db.begin():
            result = await db.execute(
                update(Connection)
                .where(
                    Connection.group_id == group_id,
                    Connection.integration == key,
                    Connection.status != "corrupt",
                    # Sealed under a key this replica lacks (mid rolling restart): not
                    # corrupt, and other replicas read it. Never mark it for them.
                    Connection.key_id.in_(self.broker.keyring.key_ids),
                )
                .values(status="corrupt", next_refresh_at=None, updated_at=self.broker.now())
                .returning(Connection.id)
            )
            if result.first() is not None:
                await record(
                    db, group_id=group_id, integration=key, kind="corrupt",
                    now=self.broker.now(), webhooks=self.broker.settings.webhooks,
                )

    # --- refreshing ----------------------------------------------------------------------

    async def refresh(
        self,
        group_id: str,
        integration: Integration,
        *,
        seen_version: int | None,
        force: bool = False,
    ) -> dict[str, Any]:
        """The connection's fresh token; one refresh per connection at a time.

        ``seen_version``: the version the caller saw (a newer one means someone already
        refreshed).
        """
        renewal = await self._refresh(
            group_id, integration, seen_version=seen_version, force=force, claimed=None
        )
        return renewal.token

    async def refresh_claimed(
        self, group_id: str, integration: Integration, claimed: Connection
    ) -> bool:
        """Refresh a connection the caller (the sweep) has leased, ``claimed`` being its
        row as leased. True when it got a new token; False when the refresh failed and a
        still-valid token was kept."""
        renewal = await self._refresh(
            group_id, integration, seen_version=None, force=False, claimed=claimed
        )
        return renewal.renewed

    async def _refresh(
        self,
        group_id: str,
        integration: Integration,
        *,
        seen_version: int | None,
        force: bool,
        claimed: Connection | None,
    ) -> Renewal:
        flight = (group_id, integration.key)
        if self._refreshes.running(flight):
            outcome = self._refreshes.join(flight)
            if claimed is not None:  # the sweep's lease is redundant: the running refresh
                try:  # holds its own
                    await self._release(group_id, integration.key, {})
                except BaseException:
                    outcome.cancel()  # nobody will wait for it
                    raise
            return await outcome
        return await self._refreshes.run(
            flight,
            lambda: self._refresh_leased(
                group_id, integration, seen_version=seen_version, force=force, claimed=claimed
            ),
        )

    @staticmethod
    def _timeout(integration: Integration) -> float:
        """The token request's timeout (providers without one: 15 s)."""
        return float(getattr(integration.provider, "timeout_seconds", 15.0))

    def _lease_seconds(self, integration: Integration) -> float:
        return lease_seconds(self._timeout(integration))

    async def _refresh_leased(
        self,
        group_id: str,
        integration: Integration,
        *,
        seen_version: int | None,
        force: bool,
        claimed: Connection | None,
    ) -> Renewal:
        broker = self.broker
        key = integration.key
        lease = self._lease_seconds(integration)
        deadline = broker.now() + timedelta(seconds=lease + 5)
        timeout = self._timeout(integration)
        while True:
            row: Connection | None
            if claimed is not None and lease_covers(
                claimed.lease_expires_at, broker.now(), request_timeout=timeout
            ):
                row, claimed = claimed, None  # the sweep's claim is fresh: use its row
            elif claimed is not None:
                # The sweep's lease was taken too long ago to outlast the token request:
                # renew it, or take the normal path if it ran out.
                async with broker.session() as db, db.begin():
                    row = await broker.repository.renew_lease(
                        db, group_id, key, owner=self.owner,
                        until=broker.now() + timedelta(seconds=lease),
                    )
                claimed = None
            else:
                async with broker.session() as db, db.begin():
                    row = await broker.repository.claim(
                        db, group_id, key, owner=self.owner,
                        until=broker.now() + timedelta(seconds=lease),
                    )
            if row is not None:
                return await self._refresh_row(
                    group_id, integration, row, seen_version=seen_version, force=force
                )
            # Someone else holds the lease (or the row is gone): wait for their result.
            async with broker.session() as db:
                current = await broker.repository.get(db, group_id, key)
            if current is None:
                raise IntegrationNotConnected([key], group_id)
            if current.info.status == "reauth_required":
                raise IntegrationNeedsReauth(key, integration.name)
            changed = seen_version is not None and current.info.version != seen_version
            if changed and not self._stale(current.data):
                return Renewal(current.data, renewed=True)
            if broker.now() >= deadline:
                if (expiry(current.data) or broker.now()) > broker.now():
                    return Renewal(current.data, renewed=changed)
                raise IntegrationUnavailable(key, integration.name)
            await asyncio.sleep(POLL_SECONDS)

    async def _refresh_row(
        self,
        group_id: str,
        integration: Integration,
        row: Connection,
        *,
        seen_version: int | None,
        force: bool,
    ) -> Renewal:
        """We hold the lease on ``row``: refresh it unless someone just did."""
        broker = self.broker
        key = integration.key
        try:
            old = broker.keyring.open(group_id, key, row.credential)
        except CredentialCorrupt:
            await self._release(group_id, key, {})
            await self._mark_corrupt(group_id, key)
            raise
        refreshed_meanwhile = seen_version is not None and row.version != seen_version
        if row.status != "connected":
            await self._release(group_id, key, {})
            raise IntegrationNeedsReauth(key, integration.name)
        if refreshed_meanwhile and not self._stale(old):
            await self._release(group_id, key, {})
            return Renewal(old, renewed=True)  # by someone else
        if not force and seen_version is not None and not self._stale(old) and (
            row.next_refresh_at is None or row.next_refresh_at > broker.now()
        ):
            await self._release(group_id, key, {})
            return Renewal(old, renewed=False)
        now = broker.now()
        if (
            not force and seen_version is not None and row.failure_count
            and row.next_refresh_at is not None and row.next_refresh_at > now
            and (expiry(old) or now) > now
        ):
            # Backing off after a failed refresh (or told Retry-After): a still-valid token
            # is handed out without asking the provider again on every call.
            await self._release(group_id, key, {})
            return Renewal(old, renewed=False)
        if (
            not force and row.last_error == "http_429"
            and row.next_refresh_at is not None and row.next_refresh_at > now
        ):
            # Rate limited, and the token has run out: the provider said when to come back
            # (Retry-After), and asking before then on every node call would only prolong it.
            await self._release(group_id, key, {})
            raise IntegrationUnavailable(key, integration.name)
        taken_from = interrupted_by(row.lapsed_lease_owner, self.owner)
        if taken_from is not None:
            log.warning(
                "refresh of %s/%s: taking it over from %s, whose lease ran out unreleased "
                "(it stopped mid-refresh); asking the provider again with the same refresh "
                "token", group_id, key, taken_from,
                extra=fields(event="refresh_takeover", group=group_id, integration=key),
            )
        # The provider's clock for ``expires_in`` starts before its answer reaches us:
        # count from the request, so a slow answer never makes a token look longer-lived.
        requested_at = broker.now()
        clock = time.perf_counter()
        metrics = broker.metrics
        try:
            try:
                response = await self._token_request(integration, old)
            finally:
                answered = ANSWERED.get()
                if answered is not None:
                    answered()
        except TokenEndpointError as exc:
            metrics.refresh_seconds.labels(key).observe(time.perf_counter() - clock)
            metrics.refreshes.labels(key, str(exc.outcome)).inc()
            return await self._failed(
                group_id, integration, row, old, exc, took=time.perf_counter() - clock
            )
        took = time.perf_counter() - clock
        metrics.refresh_seconds.labels(key).observe(took)
        spec = integration.provider
        assert spec is not None
        auth = kind(spec.auth_type)
        now = broker.now()
        try:
            token = auth.token(spec, response, now=requested_at, old=old)
        except ValueError as exc:
            failure = TokenEndpointError(
                f"{spec.display_name}: {exc}", error=None, status=200, retry_after=None,
                outcome=Outcome.transient,
            )
            return await self._failed(group_id, integration, row, old, failure, took=took)
        auth.carry(old, token)
        expires_at = expiry(token)
        # The provider has answered, and may have retired the old refresh token: an answer
        # not stored is a connection lost. A failing database is retried while our lease
        # lasts (a write that did commit shows up as a newer version: ours, read below).
        retry_until = row.lease_expires_at or now + timedelta(
            seconds=self._lease_seconds(integration)
        )
        pause = 0.05
        refreshed = Refreshed(
            row.id, group_id, key, row.version, token,
            expires_at=expires_at,
            next_refresh_at=broker.next_refresh_at(requested_at, expires_at, spec),
            lease_owner=self.owner,
            kind="recovered" if row.failure_count else "refreshed",
        )
        while True:
            try:
                stored = await self.writer.store(refreshed)
                metrics.refreshes.labels(key, refreshed.kind).inc()
                log.info(
                    "%s %s/%s in %.0f ms", refreshed.kind, group_id, key, took * 1000,
                    extra=fields(event="refresh", group=group_id, integration=key,
                                 provider=spec.name, outcome=refreshed.kind, duration=took),
                )
                if stored:
                    # The provider works again: log its next operator error afresh.
                    self._operator_errors_logged.discard(key)
                break
            except (DBAPIError, OSError) as exc:  # OSError: the driver's connect errors
                if broker.now() + timedelta(seconds=pause) >= retry_until:
                    log.error(
                        "could not store the refreshed token of %s/%s (%s): the database "
                        "kept failing for the whole lease", group_id, key, type(exc).__name__,
                        extra=fields(event="refresh", group=group_id, integration=key,
                                     provider=spec.name, outcome="store_failed"),
                    )
                    raise
                log.warning(
                    "storing the refreshed token of %s/%s failed (%s); retrying",
                    group_id, key, type(exc).__name__,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
        if not stored:
            # Our lease ran out and someone else wrote meanwhile: theirs is current.
            async with broker.session() as db:
                current = await broker.repository.get(db, group_id, key)
            if current is None:
                raise IntegrationNotConnected([key], group_id)
            return Renewal(current.data, renewed=True)
        return Renewal(token, renewed=True)

    async def _token_request(self, integration: Integration, old: dict[str, Any]) -> Any:
        spec = integration.provider
        if spec is None or not kind(spec.auth_type).refreshable:
            raise UnknownIntegration(integration.key)
        return await kind(spec.auth_type).renew(self.broker, spec, old)

    async def _release(self, group_id: str, key: str, values: dict[str, Any]) -> bool:
        async with self.broker.session() as db, db.begin():
            return await self.broker.repository.release(
                db, group_id, key, owner=self.owner, values=values
            )

    async def _failed(
        self,
        group_id: str,
        integration: Integration,
        row: Connection,
        old: dict[str, Any],
        exc: TokenEndpointError,
        *,
        took: float | None = None,
    ) -> Renewal:
        broker = self.broker
        key = integration.key
        now = broker.now()
        error = exc.error or (f"http_{exc.status}" if exc.status else "no_response")
        provider_name = integration.provider.name if integration.provider else None
        outcome = exc.outcome
        if integration.provider is not None:
            # What the outcome means is the auth type's (client credentials are the user's).
            outcome = kind(integration.provider.auth_type).outcome(outcome)
        if outcome == Outcome.reauth:
            # Another replica may have rotated the refresh token under us (a lease that ran
            # out): re-read once before giving up on the grant.
            async with broker.session() as db:
                current = await broker.repository.get(db, group_id, key)
            if current is not None and current.info.version != row.version:
                await self._release(group_id, key, {})
                return Renewal(current.data, renewed=True)  # by another replica
            reason = reauth_reason(error, interrupted_by(row.lapsed_lease_owner, self.owner))
            log.warning(
                "connection %s/%s needs reauth: %s%s", group_id, key, exc,
                f" ({reason})" if reason else "",
                extra=fields(event="refresh", group=group_id, integration=key,
                             provider=provider_name, outcome="reauth_required", duration=took),
            )
            detail = {"error": error} if reason is None else {"error": error, "reason": reason}
            async with broker.session() as db, db.begin():
                await broker.repository.release(
                    db, group_id, key, owner=self.owner,
                    values={
                        "status": "reauth_required", "next_refresh_at": None,
                        "last_error": error, "failure_count": row.failure_count + 1,
                        "updated_at": now,
                    },
                )
                await record(
                    db, group_id=group_id, integration=key, kind="reauth_required", now=now,
                    webhooks=broker.settings.webhooks, **detail,
                )
            raise IntegrationNeedsReauth(key, integration.name) from None

        if outcome == Outcome.operator:
            provider = key
            if provider not in self._operator_errors_logged:
                self._operator_errors_logged.add(provider)
                log.error(
                    "provider %s rejects the broker's client credentials (%s): check its "
                    "client_id and client_secret in config.yaml; refreshes will be retried",
                    provider, error,
                    extra=fields(event="refresh", group=group_id, integration=key,
                                 provider=provider_name, outcome="operator_error",
                                 duration=took),
                )
        else:
            log.warning(
                "refresh of %s/%s failed (%s): %s", group_id, key, exc.outcome, exc,
                extra=fields(event="refresh", group=group_id, integration=key,
                             provider=provider_name, outcome=str(exc.outcome), duration=took),
            )
        failures = row.failure_count + 1
        delay = backoff(failures, retry_after=exc.retry_after)
        async with broker.session() as db, db.begin():
            await broker.repository.release(
                db, group_id, key, owner=self.owner,
                values={
                    "next_refresh_at": now + timedelta(seconds=delay),
                    "last_error": error, "failure_count": failures,
                },
            )
            await record(
                db, group_id=group_id, integration=key, kind="refresh_failed", now=now,
                webhooks=broker.settings.webhooks, error=error, outcome=str(exc.outcome),
                retry_in_seconds=round(delay, 1),
            )
        expires_at = expiry(old)
        if expires_at is not None and expires_at > now:
            return Renewal(old, renewed=False)
        raise IntegrationUnavailable(key, integration.name) from None
