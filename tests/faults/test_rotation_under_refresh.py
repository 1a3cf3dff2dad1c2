"""``broker keys rotate`` while refreshes are happening (issue #6, item 17).

Two replicas share the database and refresh the same connections over and over (forced
refreshes at a provider that rotates refresh tokens, so a refresh overwritten by a stale
copy would leave a dead refresh token behind):

- the *rotator* has ``encryption_keys: [new, old]`` and runs ``Broker.rotate_keys`` in
  small batches, pass after pass;
- a *lagging* replica has the new key but not first yet (``[old, new]``): what it
  refreshes is written under the old key again, even behind the rotation (one pass has
  such a rewrite placed deterministically, to check that ``remaining`` reports it).

Afterwards: no row lost or overwritten (every refresh token is the provider's current
one), rows rewritten behind the rotation were reported in ``remaining``, and once the
lagging replica has the new key first a second rotation leaves every row readable with
the new key alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

from broker.crypto import Keyring, generate_key
from broker.errors import CredentialCorrupt
from broker.runtime import Broker, RotationResult
from tests import oauth_support
from tests.faults.fault_support import connect, replica, stored_rows
from tests.oauth_support import Live

live_factory = oauth_support.live_factory

GROUPS = [f"g{i}" for i in range(8)]
ROTATE_SECONDS = 1.5


def with_keys(live: Live, *keys: str) -> Any:
    return live.broker.settings.model_copy(
        update={"encryption_keys": [SecretStr(k) for k in keys]}
    )


def current_refresh_token(live: Live, refresh_token: str) -> bool:
    """Whether the provider still honours ``refresh_token`` (issued, not yet rotated)."""
    with live.server.store.lock:
        tok = live.server.store.by_refresh.get(refresh_token)
        return tok is not None and not tok.refresh_rotated and not tok.family.revoked


async def refresh_forever(replica: Broker, groups: list[str], stop: asyncio.Event) -> int:
    """Forced refreshes of every connection at once, round after round, until ``stop``."""
    done = 0
    while not stop.is_set():
        await asyncio.gather(
            *(replica.credentials(g, "acme", force_refresh=True) for g in groups)
        )
        done += len(groups)
    return done


async def test_rotation_racing_two_refreshing_replicas_loses_nothing_and_a_rerun_finishes(
    live_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with live_factory() as live:
        await asyncio.gather(*(connect(live, g) for g in GROUPS))
        old = live.broker.settings.encryption_keys[0].get_secret_value()
        new = generate_key()
        async with replica(with_keys(live, new, old)) as rotator, replica(
            with_keys(live, old, new)
        ) as lagging:
            stop = asyncio.Event()
            loops = [
                asyncio.create_task(refresh_forever(lagging, GROUPS, stop)),
                asyncio.create_task(refresh_forever(rotator, GROUPS[::-1], stop)),
            ]
            passes: list[RotationResult] = []
            end = time.monotonic() + ROTATE_SECONDS
            while time.monotonic() < end:
                passes.append(await rotator.rotate_keys(batch_size=3))
                await asyncio.sleep(0.01)
            stop.set()
            refreshes = await asyncio.gather(*loops)
            assert min(refreshes) >= len(GROUPS)  # both replicas really refreshed throughout
            assert sum(p.changed for p in passes) >= len(GROUPS)
            assert all(p.corrupt == [] for p in passes)

            # One more pass, with the lagging replica rewriting (under the old key) a row
            # the pass has already done, before the pass counts what is left: reported.
            for group_id in GROUPS[:3]:  # so that the pass has rows to do
                await lagging.credentials(group_id, "acme", force_refresh=True)
            lowest = (await stored_rows(rotator))[0].group_id  # done by the first batch
            rewritten = asyncio.Event()
            rewrites: list[asyncio.Task[None]] = []

            async def rewrite() -> None:
                await lagging.credentials(lowest, "acme", force_refresh=True)
                rewritten.set()

            def after_batch(changed: int) -> None:
                if not rewrites:
                    rewrites.append(asyncio.create_task(rewrite()))

            count = rotator.database.count_not_under

            async def count_once_rewritten(key_id: str) -> int:
                await rewritten.wait()
                return await count(key_id)

            with monkeypatch.context() as patch:
                patch.setattr(rotator.database, "count_not_under", count_once_rewritten)
                mid = await rotator.rotate_keys(batch_size=2, after_batch=after_batch)
            assert mid.changed >= 3 and mid.remaining == 1

            # The lagging replica gets the new key first; a second rotation finishes.
            final = await rotator.rotate_keys(batch_size=2)
            assert (final.changed, final.remaining, final.corrupt) == (1, 0, [])

        # Nothing lost or overwritten: every row opens with the new key alone, and holds
        # the refresh token the provider issued last for it.
        only_new = Keyring([new.encode()])
        rows = await stored_rows(live.broker)
        assert sorted(r.group_id for r in rows) == GROUPS
        assert {r.status for r in rows} == {"connected"}
        for row in rows:
            data = only_new.open(row.group_id, row.integration, row.credential)
            assert current_refresh_token(live, data["refresh_token"]), row.group_id
        assert live.server.invalid_grant_count == 0
        assert live.server.reuse_detections == 0
        print(f"{len(passes)} passes, remaining {[p.remaining for p in passes]}, "
              f"refreshes {refreshes}")


async def test_a_replica_without_the_new_key_yet_marks_no_row_corrupt(
    live_factory: Callable[..., Any],
) -> None:
    """Mid rolling restart a replica still has only the old key when rows are written
    under the new one. It cannot read those, but they are not corrupt: it must not mark
    them (a corrupt mark would take the connection away from every replica)."""
    async with live_factory() as live:  # this replica: the old key alone
        await connect(live, "g1")
        old = live.broker.settings.encryption_keys[0].get_secret_value()
        new = generate_key()
        async with replica(with_keys(live, new, old)) as restarted:
            await restarted.credentials("g1", "acme", force_refresh=True)  # new key now
            live.broker.tokens.cache.clear()
            with pytest.raises(CredentialCorrupt):
                await live.broker.credentials("g1", "acme")
            (row,) = await stored_rows(live.broker)
            assert row.status == "connected"
            assert row.next_refresh_at is not None
            r = await live.service.get("/groups/g1/integrations")
            assert r.json()["integrations"][0]["status"] == "connected"
            # The restarted replica is unaffected.
            assert (await restarted.credentials("g1", "acme", force_refresh=True))
        assert live.server.invalid_grant_count == 0
