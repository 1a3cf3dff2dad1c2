"""A refresh cut off by a crash (issue 11, item 11): ``broker refresher`` processes on one
database, the real authorization server rotating refresh tokens (a replayed one is
``invalid_grant`` and revokes the grant) with a slow token endpoint, so that requests are
in flight; one refresher is SIGKILLed.

A refresh whose request the provider processed but whose answer was not yet committed dies
with the process: the provider has rotated the refresh token and the new one is gone.
Nothing saves that answer; what the broker does:

- only the connections whose refresh was in flight in the killed process are affected;
  every other one keeps refreshing (those the killed process had claimed but not started
  are taken over once its leases run out);
- the next attempt comes as soon as the dead process's lease runs out, not a sweep interval
  later (``broker.lapses``): a provider with a reuse grace period longer than the lease
  accepts the old refresh token again and nothing is lost;
- without a grace period, that attempt gets ``invalid_grant``: the connection is
  ``reauth_required``, once (no retry loop), and its event says why.

What was in flight is told by the provider and the database, not guessed: the rows the
killed process held when it died (their leases), the refresh tokens stored in them, the
requests that presented those tokens before the leases ran out (only the holder can), and
the answers the provider gave that were never used (``AuthServer.unused_refresh_answers``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.refresh import INTERRUPTED, lease_seconds
from tests import refresh_support
from tests.authserver.server import AuthServer
from tests.oauth_support import Live
from tests.refresh_support import (
    Refresher,
    connect_many,
    family_of,
    refreshers,
    rows,
)

refresh_live = refresh_support.refresh_live

TIMEOUT = 1.0  # the provider's timeout_seconds
LEASE = lease_seconds(TIMEOUT)  # 7 s
DELAY = 0.4  # the token endpoint answers refreshes after this long
LIFETIME = 4  # access tokens: each connection is refreshed about every 2 s


@dataclass(frozen=True)
class Held:
    """A row the killed process held a lease on when it died."""

    group: str
    family: str
    refresh_token: str  # the one stored, as the killed process had read it
    version: int
    lapse: float  # when its lease ran out (unix time)


async def held_by(live: Live, pid: int) -> dict[str, Held]:
    out = {}
    for group, (row, data) in (await rows(live.broker)).items():
        if row.lease_owner and row.lease_owner.startswith(f"{pid}-"):
            assert row.lease_expires_at is not None
            out[group] = Held(
                group, family_of(live.server, data["access_token"]), data["refresh_token"],
                row.version, row.lease_expires_at.timestamp(),
            )
    return out


def presented(server: AuthServer, refresh_token: str) -> list[float]:
    """When token requests presenting ``refresh_token`` reached the provider."""
    return [r.at for r in server.requests_seen("token")
            if r.params.get("refresh_token") == refresh_token]


async def in_flight_of(live: Live, pid: int) -> int:
    """Refreshes of process ``pid`` the provider is working on now, received in the last
    half of its delay: the provider is still at work on them when the caller acts (on a
    loaded machine this poll itself can take a good part of the delay)."""
    now = time.time()
    waiting = {r.params.get("refresh_token") for r in live.server.requests_seen("token")
               if r.grant_type == "refresh_token" and r.status is None
               and now - r.at < DELAY / 2}
    return sum(h.refresh_token in waiting for h in (await held_by(live, pid)).values())


async def api_status(live: Live, tokens: dict[str, str]) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=10) as http:
        codes = await asyncio.gather(*(
            http.get(live.server.userinfo_endpoint, headers={"Authorization": f"Bearer {t}"})
            for t in tokens.values()
        ))
    return {g: r.status_code for g, r in zip(tokens, codes, strict=True)}


def newest_issue(server: AuthServer, family: str) -> float:
    with server.store.lock:
        return max(t.issued_at for t in server.store.by_access.values() if t.family.id == family)


@pytest.mark.parametrize(
    "grace", [0.0, LEASE + 8.0], ids=["no-grace-period", "grace-period-longer-than-the-lease"]
)
async def test_sigkill_loses_only_the_refreshes_in_flight(
    refresh_live: Callable[..., Any], tmp_path: Path, grace: float
) -> None:
    """3 refreshers, 24 connections refreshed about every 2 s, the token endpoint answering
    after 0.4 s; one refresher is SIGKILLed while refreshes of its own are in flight."""
    count, workers = 24, 3
    async with refresh_live(
        provider={"timeout_seconds": TIMEOUT},
        server={"access_token_lifetime": LIFETIME, "auto_approve": True,
                "refresh_token_reuse_grace": grace},
        refresh={"interval_seconds": 1, "min_validity_seconds": 1},
    ) as live:
        server = live.server
        config = live.broker.settings.source
        assert config is not None
        async with refreshers(config, tmp_path, workers, wait=False) as procs:
            groups = await connect_many(live, count)
            for proc in procs:
                await proc.running()
            server.delay_next(10**6, seconds=DELAY, grant_type="refresh_token")
            await asyncio.sleep(2.5)  # the processes refreshing, requests in flight
            # Kill one while the provider works on refreshes of its own: at least 2 if that
            # comes within a few seconds. Which process has work depends on where its sweeps
            # fall in the second (one may find nothing due, sweep after sweep).
            deadline = time.monotonic() + 6
            while True:
                counts = {p.pid: await in_flight_of(live, p.pid) for p in procs}
                pid, n = max(counts.items(), key=lambda c: c[1])
                if n >= (2 if time.monotonic() < deadline else 1):
                    break
                assert time.monotonic() < deadline + 6, [p.summary() for p in procs]
                await asyncio.sleep(0.005)
            (victim,) = [p for p in procs if p.pid == pid]
            survivors = [p for p in procs if p is not victim]
            victim.kill()
            killed_at = time.time()
            held = await held_by(live, victim.pid)
            assert held, "the killed process held no lease"
            # In flight: the provider had the request (only the lease holder sends one) -
            # or had answered it and the answer was not committed yet.
            in_flight = {g for g, h in held.items()
                         if any(at < h.lapse for at in presented(server, h.refresh_token))}
            at_provider = n
            assert in_flight, held
            # The leases run out, the others take the rows over; let them run on a while.
            last_lapse = max(h.lapse for h in held.values())
            deadline = last_lapse + 6
            while True:
                state = await rows(live.broker)
                settled = all(
                    state[g][0].lease_owner is None or state[g][0].version > h.version
                    for g, h in held.items()
                ) and all(
                    state[g][0].status == "reauth_required" or state[g][0].version > h.version
                    for g, h in held.items()
                )
                if settled and time.time() > last_lapse + 2.5:
                    break
                assert time.time() < deadline, (
                    {g: (state[g][0].status, state[g][0].lease_owner) for g in held},
                    [p.output()[-2000:] for p in survivors],
                )
                await asyncio.sleep(0.1)
        for proc in survivors:  # stopped (SIGTERM): they stored every answer they got
            assert proc.process is not None and proc.process.returncode == 0, proc.output()
            assert proc.problems() == [], proc.output()
        server.clear_faults()
        state = await rows(live.broker)

        families = {g: family_of(server, d["access_token"]) for g, (_, d) in state.items()}
        by_family = {f: g for g, f in families.items()}
        stored = {d["refresh_token"] for _, d in state.values()}
        for h in held.values():  # the lost answer is of the grant the row had then
            by_family.setdefault(h.family, h.group)
        # The answers the provider gave and nobody stored: all of them were to a request
        # of the killed process, in flight when it died.
        orphans = [t for t in server.unused_refresh_answers() if t.refresh_token not in stored]
        assert {by_family[t.family.id] for t in orphans} == in_flight
        assert all(t.issued_at < held[by_family[t.family.id]].lapse for t in orphans)
        lost = {g for g, (row, _) in state.items() if row.status == "reauth_required"}

        # Each interrupted refresh was asked again just after the lease ran out.
        for g in in_flight:
            h = held[g]
            retry = [at for at in presented(server, h.refresh_token) if at >= h.lapse - 0.05]
            assert len(retry) == 1, (g, retry)  # once: no retry loop
            assert retry[0] <= h.lapse + 1.5, (g, retry[0] - h.lapse)

        if grace:
            # The provider accepted the old refresh token again: nothing lost.
            assert lost == set()
            assert server.grace_reuses == len(in_flight)
            assert server.reuse_detections == 0 and server.invalid_grant_count == 0
        else:
            # Lost: exactly the connections whose refresh was in flight.
            assert lost == in_flight
            assert server.reuse_detections == len(lost) == server.invalid_grant_count
            for g in lost:
                row = state[g][0]
                assert (row.last_error, row.next_refresh_at) == ("invalid_grant", None)
                events = (await live.service.get(f"/groups/{g}/events")).json()["events"]
                assert events[0]["kind"] == "reauth_required"
                assert events[0]["detail"] == {"error": "invalid_grant", "reason": INTERRUPTED}
                assert sum(e["kind"] == "reauth_required" for e in events) == 1

        # Every other connection kept refreshing: refreshed since the kill (those the killed
        # process held: since its lease ran out), connected, and its stored token (which
        # lives 4 s) accepted by the provider at the end.
        alive = [g for g in groups if g not in lost]
        for g in alive:
            row = state[g][0]
            assert (row.status, row.failure_count) == ("connected", 0), (g, row.last_error)
            since = held[g].lapse if g in held else killed_at
            assert newest_issue(server, families[g]) > since, g
        # Read the rows again just before: a token lives 4 s, and on a loaded machine the
        # checks above can take a good part of that. A token that expired between the read
        # and the call is read once more after a refresh cycle: it must then work.
        state = await rows(live.broker)
        codes = await api_status(live, {g: state[g][1]["access_token"] for g in alive})
        late = [g for g, code in codes.items() if code != 200]
        if late:
            await asyncio.sleep(LIFETIME / 2 + 0.5)
            state = await rows(live.broker)
            codes.update(await api_status(live, {g: state[g][1]["access_token"] for g in late}))
        assert set(codes.values()) == {200}, codes
        retried = [presented(server, held[g].refresh_token)[-1] - held[g].lapse
                   for g in sorted(in_flight)]
        print(
            f"\nkilled holding {len(held)} leases: {len(in_flight)} refreshes in flight "
            f"({at_provider} at the provider when polled just before the kill), "
            f"{len(held) - len(in_flight)} not started; lost {len(lost)}; "
            f"grace reuses {server.grace_reuses}; retried "
            + ", ".join(f"{d:+.2f}" for d in retried) + " s after the lease ran out"
        )


async def test_the_retry_comes_when_the_lease_runs_out_not_a_sweep_interval_later(
    refresh_live: Callable[..., Any], tmp_path: Path
) -> None:
    """The sweep runs every 30 s. A refresher is SIGKILLed with all 10 connections' refreshes
    in flight; the provider processes them (rotating the refresh tokens) and the answers
    die. The surviving refresher swept last before the kill, yet retries every one of them
    just after the leases run out (7 s), within the provider's 10 s grace period - at its
    next regular sweep, 30 s on, every connection would be lost."""
    count, grace = 10, LEASE + 3
    async with refresh_live(
        provider={"timeout_seconds": TIMEOUT},
        server={"access_token_lifetime": LIFETIME, "auto_approve": True,
                "refresh_token_reuse_grace": grace},
        refresh={"interval_seconds": 30, "min_validity_seconds": 1},
    ) as live:
        server = live.server
        config = live.broker.settings.source
        assert config is not None
        async with refreshers(config, tmp_path, 1) as (survivor,):
            # The survivor's first sweep ran at its start, before any connection existed:
            # its next regular one is 30 s away. Once all are due, the victim's first sweep
            # claims them all and asks the provider, which answers after 1 s.
            groups = await connect_many(live, count)
            state = await rows(live.broker)
            due = max(r.next_refresh_at.timestamp() for r, _ in state.values()
                      if r.next_refresh_at)
            await asyncio.sleep(max(0.0, due - time.time()) + 0.1)
            server.delay_next(count, seconds=1.0, grant_type="refresh_token")
            victim = Refresher(config, tmp_path / "victim.log").start()
            try:
                await victim.running()
                deadline = time.monotonic() + 10
                while await in_flight_of(live, victim.pid) < count:
                    assert time.monotonic() < deadline, victim.output()
                    await asyncio.sleep(0.005)
            finally:
                victim.kill()
            held = await held_by(live, victim.pid)
            assert set(held) == set(groups)
            last_lapse = max(h.lapse for h in held.values())
            deadline = last_lapse + 5
            while True:
                state = await rows(live.broker)
                if all(state[g][0].version > h.version and state[g][0].lease_owner is None
                       for g, h in held.items()):
                    break
                assert time.time() < deadline, (
                    {g: (r.status, r.lease_owner) for g, (r, _) in state.items()},
                    survivor.output()[-3000:],
                )
                await asyncio.sleep(0.05)
        assert survivor.problems() == [], survivor.output()
        retried = {}
        for g, h in held.items():
            first, *again = presented(server, h.refresh_token)
            assert first < h.lapse and len(again) == 1, (g, first, again)
            retried[g] = again[0] - h.lapse
        assert all(-0.05 <= d <= 1.0 for d in retried.values()), retried
        assert all(state[g][0].status == "connected" for g in groups)
        assert server.grace_reuses == count and server.reuse_detections == 0
        print(f"\nretried {min(retried.values()):+.2f} .. {max(retried.values()):+.2f} s after "
              f"the leases ran out (sweep interval 30 s, lease {LEASE:.0f} s)")
