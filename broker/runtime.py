"""The running broker: settings, keys, database, registry, in one object.

``Broker.open(settings)`` is the only way in. It checks the keys against the stored data
*before* it migrates or writes anything, so a wrong key changes nothing:

1. ``encryption_keys`` from config; when empty and the store is a SQLite file, the key file
   beside it (``broker.db`` -> ``broker.key``), created with mode 0600 only when the
   database holds no data yet. PostgreSQL always needs configured keys.
2. Every stored row's key id must belong to a configured key, or the broker refuses to start
   and says how many rows are sealed under which unknown key.
3. Pending migrations are applied.
4. Connections parked while their provider was disabled (the sweep parks a due connection
   whose provider it does not have) are due again if this broker has the provider.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from .apitransport import AiohttpTransport
from .config import Settings
from .credentials import Credentials, expiry
from .crypto import Keyring, load_or_create_key_file, parse_key
from .errors import EncryptionKeyError, SchemaOutOfDate
from .integrations import Group, Registry, default_registry
from .metrics import Metrics
from .oauth import client
from .plugins import load_plugins
from .providers import integration_for
from .refresh import keep_alive_at, next_refresh_at
from .revocations import Revocations
from .store.database import Database
from .store.repository import Repository, utcnow

__all__ = ["Broker"]

log = logging.getLogger("broker")


class Broker:
    _current: ClassVar[Broker | None] = None

    def __init__(
        self, settings: Settings, keyring: Keyring, database: Database, registry: Registry,
        nodes: list[type[Any]],
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.database = database
        self.registry = registry
        self.nodes = nodes
        # The database's clock, as seen from here: every replica of a PostgreSQL deployment
        # then agrees on when a token expires, whatever its own clock says.
        self.clock_offset = timedelta(0)
        self.clock: Callable[[], datetime] = lambda: utcnow() + self.clock_offset
        self.repository = Repository(
            keyring, clock=lambda: self.clock(), webhooks=settings.webhooks
        )
        self.metrics = Metrics()
        self.tokens = Credentials(self)
        self.revocations = Revocations(self)
        # One keep-alive connection pool for every token request (see oauth.client).
        self.token_transport = client.token_transport()
        # One pool for calls to providers' APIs (the proxy route and ctx.client).
        self.api_pool = AiohttpTransport(max_connections=settings.proxy.max_connections)
        self.api_transport = client.Borrowed(self.api_pool)  # shared: no client closes it
        # The proxy route sends requests it builds itself through this client (no default
        # headers are added to them); trust_env off: no per-request proxy lookups.
        self.api_client = httpx.AsyncClient(transport=self.api_transport, trust_env=False)
        database.info["broker"] = self

    @classmethod
    def current(cls) -> Broker | None:
        """The broker most recently opened in this process (for sessions it did not make)."""
        return cls._current

    @classmethod
    async def open(cls, settings: Settings, *, migrate: bool = True) -> Broker:
        """Check keys, apply migrations, load providers and plugins. See the module doc."""
        registry = Registry()
        for name, spec in settings.resolved_providers.items():
            registry.add(integration_for(spec), source=f"providers.{name} in config")
        nodes: list[type[Any]] = []
        for plugin_integrations, plugin_nodes, source in load_plugins(
            settings.plugins, base_dir=settings.base_dir
        ):
            registry.extend(plugin_integrations, source=source)
            nodes.extend(plugin_nodes)
        for integration in default_registry:
            if integration.key not in registry:
                registry.add(integration, source="register_integration")

        database = Database(settings.database_url)
        try:
            keyring = await _keyring(settings, database)
            if migrate:
                applied = await database.upgrade()
                if applied:
                    log.info("database migrated: applied %s", ", ".join(applied))
            else:
                pending = await database.pending_migrations()
                if pending:
                    raise SchemaOutOfDate(
                        f"database needs migrations {pending}: run `broker db upgrade`"
                    )
        except BaseException:
            await database.dispose()
            raise
        broker = cls(settings, keyring, database, registry, nodes)
        try:
            await broker.calibrate_clock()
            await broker._resume_parked()
        except BaseException:
            await broker.close()
            raise
        Broker._current = broker
        return broker

    async def _resume_parked(self) -> None:
        """Step 4 of ``open``: the providers enabled here get their parked connections back."""
        async with self.session() as db, db.begin():
            resumed = await self.repository.resume_parked(
                db, [integration.key for integration in self.registry]
            )
        if resumed:
            log.info("%d connection(s) of providers enabled again are due for refresh", resumed)

    async def calibrate_clock(self) -> timedelta:
        """Measure this machine's clock against PostgreSQL's (SQLite shares the machine's)."""
        if self.database.is_sqlite:
            return self.clock_offset
        before = utcnow()
        server = await self.database.server_time()
        after = utcnow()
        offset = server - (before + (after - before) / 2)
        if abs(offset.total_seconds()) > 1 and abs(
            (offset - self.clock_offset).total_seconds()
        ) > 1:
            log.warning(
                "this machine's clock is %.1f s off the database's; using the database's",
                -offset.total_seconds(),
            )
        self.clock_offset = offset
        return offset

    async def close(self) -> None:
        await self.revocations.drain()
        await self.tokens.cache.close()
        await self.token_transport.aclose()
        await self.api_client.aclose()
        await self.api_pool.aclose()
        await self.database.dispose()
        if Broker._current is self:
            Broker._current = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session on the broker's database; the integration API accepts it as ``db``."""
        async with self.database.session() as session:
            yield session

    def now(self) -> datetime:
        return self.clock()

    async def credentials(
        self, group_id: str, name: str, *, force_refresh: bool = False
    ) -> dict[str, Any]:
        """What a node gets for one connection, with a token valid right now.

        Raises UnknownIntegration, IntegrationNotConnected, IntegrationNeedsReauth,
        IntegrationUnavailable or CredentialCorrupt.
        """
        return await self.tokens.get(
            group_id, self.registry.get(name), force_refresh=force_refresh
        )

    def next_refresh_at(
        self, now: datetime, expires_at: datetime | None, spec: Any = None
    ) -> datetime | None:
        """When the sweep should next refresh a token expiring at ``expires_at``."""
        refresh = self.settings.refresh
        at = None
        if expires_at is not None:
            at = next_refresh_at(
                now, expires_at, interval=refresh.interval_seconds,
                min_validity=refresh.min_validity_seconds,
            )
        return keep_alive_at(at, now, getattr(spec, "refresh_token_idle_refresh_days", None))

    async def store_token(
        self, group_id: str, name: str, auth_type: str, token: dict[str, Any],
        *, hint: dict[str, Any],
    ) -> None:
        """Store (or replace) an OAuth2 connection's tokens in one transaction."""
        expires_at = expiry(token)
        async with self.session() as db, db.begin():
            await self.repository.put(
                db, group_id, name, token, auth_type=auth_type, hint=hint,
                expires_at=expires_at,
                next_refresh_at=self.next_refresh_at(
                    self.now(), expires_at, self.registry.get(name).provider
                ),
            )

    async def missing(self, group_id: str, names: list[str]) -> list[str]:
        """Which of ``names`` are not connected for ``group_id``."""
        missing = []
        async with self.session() as db:
            for name in names:
                integration = self.registry.get(name)
                status = await integration.get_status(db, Group(group_id))
                if status is not True and status != "connected":
                    missing.append(name)
        return missing


    async def rotate_keys(
        self, *, batch_size: int = 500, after_batch: Callable[[int], None] | None = None
    ) -> RotationResult:
        """Re-encrypt every row under the primary key, one committed batch at a time.

        Resumable: a crash loses at most the batch in flight, and a rerun skips the rows
        already under the primary key.
        """
        result = RotationResult(key_id=self.keyring.primary_key_id)
        after_id = 0
        while True:
            async with self.session() as db, db.begin():
                batch = await self.repository.rotate_batch(
                    db, after_id=after_id, batch_size=batch_size
                )
            if batch.examined == 0:
                # Rows changed by someone else mid-rotation were skipped; say so.
                remaining = await self.database.count_not_under(self.keyring.primary_key_id)
                result.remaining = remaining - len(result.corrupt)
                return result
            after_id = batch.last_id
            result.changed += batch.changed
            result.corrupt += batch.corrupt
            if after_batch is not None:
                after_batch(result.changed)


@dataclass
class RotationResult:
    key_id: str
    changed: int = 0
    remaining: int = 0
    """Rows still under an older key (changed during the run by an old-key writer)."""
    corrupt: list[int] = field(default_factory=list)


async def _keyring(settings: Settings, database: Database) -> Keyring:
    keys = [
        parse_key(k.get_secret_value(), where=f"encryption_keys[{i}]")
        for i, k in enumerate(settings.encryption_keys)
    ]
    key_file = settings.default_key_file()
    if not keys and key_file is None:
        raise EncryptionKeyError(
            "encryption_keys is empty: set at least one key (`broker keys generate`) "
            "when the database is not a local SQLite file"
        )
    stored = await database.stored_key_ids()
    if not keys:
        assert key_file is not None
        key, created = load_or_create_key_file(key_file, may_create=not stored)
        if created:
            log.warning(
                "created a new encryption key in %s (mode 0600): back it up; "
                "without it the stored credentials cannot be read",
                key_file,
            )
        keys = [key]
    keyring = Keyring(keys)
    unknown = keyring.can_open(list(stored))
    if unknown:
        rows = sum(stored[k] for k in unknown)
        raise EncryptionKeyError(
            f"{rows} stored credential(s) are encrypted under key id(s) {', '.join(unknown)}, "
            f"and no configured key has that id (configured: {', '.join(keyring.key_ids)}). "
            "Add the key they were written with to encryption_keys. Nothing was changed."
        )
    return keyring
