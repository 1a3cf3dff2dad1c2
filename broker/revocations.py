"""Revoking a disconnected credential at its provider.

When a user disconnects a connection whose auth type can revoke it (``AuthKind.revocable``:
an OAuth2 provider with a ``revocation_url``), the credential is revoked there (RFC 7009)
*after* the row's deletion has committed — a disconnect that rolls back revokes nothing —
best effort and bounded in time (``TIMEOUT``): the disconnect never waits for the provider
and never fails because of it. The outcome is recorded as a ``revoked`` event with
``outcome``: ``revoked``, ``refused`` (the provider answered an error) or ``unreachable``.
The credential itself is held only in memory meanwhile, and never logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .auth import kind
from .events import record

if TYPE_CHECKING:
    from .catalog import ProviderBase
    from .runtime import Broker

__all__ = ["Revocations"]

log = logging.getLogger("broker.revocations")
TIMEOUT = 10.0


class Revocations:
    """The broker's revocations in flight (see the module docstring)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self, group_id: str, integration: str, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run(group_id, integration, spec, stored)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, group_id: str, integration: str, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> None:
        broker = self.broker
        try:
            async with asyncio.timeout(TIMEOUT):
                outcome = await kind(spec.auth_type).revoke(broker, spec, stored)
        except TimeoutError:
            outcome = "unreachable"
        try:
            async with broker.session() as db, db.begin():
                await record(
                    db, group_id=group_id, integration=integration, kind="revoked",
                    now=broker.now(), webhooks=broker.settings.webhooks, outcome=outcome,
                )
        except Exception as exc:  # the revocation happened; only its record is lost
            log.warning(
                "could not record the revocation of %s/%s (%s)",
                group_id, integration, type(exc).__name__,
            )

    async def drain(self, seconds: float = 5.0) -> None:
        """Let revocations in flight finish for up to ``seconds``; cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
