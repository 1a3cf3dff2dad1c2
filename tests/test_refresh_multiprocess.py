"""Several ``broker refresher`` processes on one database, against the real authorization
server with short-lived tokens and rotating refresh tokens (a replayed refresh token is
``invalid_grant`` and revokes the grant, like real providers).

- Refreshers on one database share the work: no refresh token is ever used twice (the
  server saw no reuse and no ``invalid_grant``), every grant is refreshed as often as its
  lifetime implies, the stored token is always valid, and every connection's final token
  is accepted by the provider's API.
- A refresher SIGKILLed while it holds leases: another one takes the work over once the
  leases run out. What the provider never processed is refreshed normally; a refresh the
  provider did process but whose answer died with the process has burned the refresh token
  (as at any rotating provider): that connection is marked ``reauth_required`` once, and
  not retried in a loop.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SERVICE_TOKEN

from broker.nodes import ExecutionContext
from broker.refresh import INTERRUPTED, lease_seconds
from tests import refresh_support
from tests.browser_support import free_port_url
from tests.oauth_support import Live
from tests.refresh_support import (
    Refresher,
    connect_many,
    family_of,
    real_expiry,
    refreshers,
    rows,
    tls_context,
)

refresh_live = refresh_support.refresh_live

LIFETIME = 5  # access token lifetime at the provider, seconds
SETTINGS: dict[str, Any] = {
    "server": {"access_token_lifetime": LIFETIME, "auto_approve": True},
    "refresh": {"interval_seconds": 1, "min_validity_seconds": 1},
    # Each sweep's line (at debug when it found nothing due): RefreshProcess.sweeps counts them.
    "log_level": "debug",
}


async def accepted_by_api(live: Live, tokens: dict[str, str]) -> dict[str, int]:
    """The provider's ``/api/me`` status for each group's access token."""
    async with httpx.AsyncClient(timeout=10, verify=tls_context()) as http:

        async def one(token: str) -> int:
            r = await http.get(
                live.server.userinfo_endpoint, headers={"Authorization": f"Bearer {token}"}
            )
            return r.status_code

        codes = await asyncio.gather(*(one(t) for t in tokens.values()))
    return dict(zip(tokens, codes, strict=True))


def first_issued(live: Live, family: str) -> float:
    with live.server.store.lock:
        return min(t.issued_at for t in live.server.store.by_access.values()
                   if t.family.id == family)


def issued_at(live: Live, access_token: str) -> float:
    with live.server.store.lock:
        return live.server.store.by_access[access_token].issued_at


async def test_refreshers_share_fifty_connections_without_a_double_refresh(
    refresh_live: Callable[..., Any], store_url: str, tmp_path: Path
) -> None:
    """3 refreshers on PostgreSQL (2 on one SQLite file), 50 connections, ~2 lifetimes."""
    count = 50
    workers = 2 if store_url.startswith("sqlite") else 3
    run = 8.0  # after the last connection; the first ones live ~2 s longer
    async with refresh_live(provider={"timeout_seconds": 3}, **SETTINGS) as live:
        server = live.server
        config = live.broker.settings.source
        assert config is not None
        async with refreshers(config, tmp_path, workers, wait=False) as procs:
            groups = await connect_many(live, count)  # while the refreshers start
            for proc in procs:
                await proc.running()
            connected_at = time.time()
            state = await rows(live.broker)
            assert sorted(state) == groups
            families = {g: family_of(server, d["access_token"]) for g, (_, d) in state.items()}
            assert len(set(families.values())) == count  # 50 distinct grants
            # While they run, the stored token of every connection is always valid.
            samples = expired = 0
            while time.time() < connected_at + run:
                await asyncio.sleep(0.4)
                now = time.time()
                for group, (row, data) in (await rows(live.broker)).items():
                    samples += 1
                    real = real_expiry(server, data["access_token"])
                    assert real is not None
                    if real <= now:
                        expired += 1
                    assert row.status == "connected", (group, row.last_error)
            # The stored tokens, read without refreshing, are accepted by the provider.
            final = {g: data["access_token"] for g, (_, data) in (await rows(live.broker)).items()}
            codes = await accepted_by_api(live, final)
            assert set(codes.values()) == {200}, codes
            ended = time.time()
        for proc in procs:
            assert proc.process is not None and proc.process.returncode == 0, proc.output()
            assert proc.problems() == [], proc.output()

        # Not one refresh token was used twice.
        assert server.reuse_detections == 0
        assert server.invalid_grant_count == 0
        refreshes = server.refresh_requests
        statuses = Counter(r.status for r in server.requests_seen("token")
                           if r.grant_type == "refresh_token")
        assert set(statuses) == {200}, statuses
        assert sum(refreshes.values()) == server.token_requests["refresh_token"]
        # Each grant was refreshed as often as its lifetime implies: the broker takes a
        # 5 s token to live 4..5 s (expiry kept in whole seconds, rounded down) and
        # refreshes it half its lifetime early (+ up to 10 % jitter), when a sweep (every
        # second) next comes by: every 1.25 .. ~4.5 s over the time the grant existed.
        per_family = [refreshes[families[g]] for g in groups]
        for group in groups:
            lived = ended - first_issued(live, families[group])
            n = refreshes[families[group]]
            assert lived / 4.5 - 1 <= n <= lived / 1.25 + 1, (group, n, lived)
        lived = ended - connected_at
        # Every refresh the server saw was a sweep's, and every process swept all along,
        # side by side. How the work splits depends on where each one's sweeps fall in the
        # second: a sweep claims what is due at that moment, and a refreshed token falls due
        # again 2.25 to 2.5 s after the sweep that refreshed it, so the process whose sweep
        # comes first after that window may get all of it, every time.
        swept = [proc.swept() for proc in procs]
        assert sum(swept) == sum(refreshes.values()), (swept, refreshes)
        assert all(p.sweeps() >= run - 2 for p in procs), [p.summary() for p in procs]
        assert expired == 0, f"{expired} of {samples} stored tokens were expired"

        # Afterwards, through the node API in this process: a token the provider accepts,
        # for all 50 (each used at once: one handed out may have min_validity (1 s) left).
        before = server.token_requests["refresh_token"]

        async def use(group: str) -> int:
            got = await ExecutionContext.local(live.broker, group).custom_integration("acme")
            return (await accepted_by_api(live, {group: got["access_token"]}))[group]

        codes = dict(zip(groups, await asyncio.gather(*(use(g) for g in groups)), strict=True))
        assert set(codes.values()) == {200}, codes
        assert server.invalid_grant_count == 0 and server.reuse_detections == 0
        print(
            f"\n{workers} refreshers, {count} grants, {lived:.1f} s: "
            f"{sum(per_family)} refreshes, per grant {min(per_family)}..{max(per_family)} "
            f"(mean {sum(per_family) / count:.1f}), per process {swept}, "
            f"stored-token samples {samples} (expired {expired}), "
            f"on-demand afterwards {server.token_requests['refresh_token'] - before}, "
            f"invalid_grant {server.invalid_grant_count}, reuse {server.reuse_detections}"
        )


async def test_a_killed_refresher_holding_leases_is_taken_over(
    refresh_live: Callable[..., Any], tmp_path: Path
) -> None:
    """SIGKILL while one sweep holds the leases of all 20 connections: 10 token requests in
    flight (3 stalled by the provider and never processed, 7 processed after 1 s, too
    late for the dead process) and 10 waiting their turn. A second refresher takes every
    row over once its lease has run out."""
    count = 20
    timeout = 1.0  # the provider's timeout_seconds: leases last 1 + 5 + 1 = 7 s
    lease = lease_seconds(timeout)
    async with refresh_live(provider={"timeout_seconds": timeout}, **SETTINGS) as live:
        server = live.server
        config = live.broker.settings.source
        assert config is not None
        groups = await connect_many(live, count)
        state = await rows(live.broker)
        families = {g: family_of(server, data["access_token"]) for g, (_, data) in state.items()}
        by_family = {f: g for g, f in families.items()}
        # Start the first refresher once all 20 are due: its first sweep claims them all.
        due = max(r.next_refresh_at.timestamp() for r, _ in state.values() if r.next_refresh_at)
        await asyncio.sleep(max(0.0, due - time.time()))
        server.timeout_next(3, seconds=30, grant_type="refresh_token")  # never processed
        server.delay_next(1000, seconds=1.0, grant_type="refresh_token")  # processed late
        first = Refresher(config, tmp_path / "first.log").start()
        try:
            await first.running()
            deadline = time.monotonic() + 15
            while len([r for r in server.requests_seen("token") if r.fault]) < 10:
                assert time.monotonic() < deadline, first.output()
                await asyncio.sleep(0.005)
            first.kill()
        finally:
            if first.process is not None and first.process.poll() is None:
                first.kill()
        killed_at = time.time()
        server.clear_faults()
        in_flight = [r for r in server.requests_seen("token") if r.grant_type == "refresh_token"]
        assert len(in_flight) == 10 and all(r.fault and r.status is None for r in in_flight)
        stalled = {by_family[r.family_id] for r in in_flight if r.fault == "timeout"}
        late = {by_family[r.family_id] for r in in_flight if r.fault == "delay"}
        assert (len(stalled), len(late)) == (3, 7)
        # The dead process held the lease of every row (in flight or waiting its turn).
        held = {
            g: row.lease_expires_at.timestamp()
            for g, (row, _) in (await rows(live.broker)).items()
            if row.lease_owner and row.lease_owner.startswith(f"{first.pid}-")
            and row.lease_expires_at is not None and row.lease_expires_at.timestamp() > killed_at
        }
        assert set(held) == set(groups)

        async with refreshers(config, tmp_path, 1) as (second,):
            await asyncio.sleep(max(0.0, killed_at + 1.5 - time.time()))
            # The late ones were processed by now: the provider rotated those refresh
            # tokens, and the new ones died with the process.
            lost = set()
            for group, (_, data) in (await rows(live.broker)).items():
                with server.store.lock:
                    if server.store.by_refresh[data["refresh_token"]].refresh_rotated:
                        lost.add(group)
            assert lost == late
            # Wait until every connection is either refreshed since the kill or marked.
            deadline = time.time() + lease + 10
            while True:
                state = await rows(live.broker)
                done = all(
                    (row.status == "reauth_required") if g in lost
                    else (row.status == "connected"
                          and issued_at(live, data["access_token"]) > killed_at)
                    for g, (row, data) in state.items()
                )
                if done:
                    break
                assert time.time() < deadline, (
                    {g: (r.status, r.lease_owner) for g, (r, _) in state.items()},
                    second.output(),
                )
                await asyncio.sleep(0.2)
            recovered_after = time.time() - killed_at
            requests_then = dict(server.refresh_requests)
            await asyncio.sleep(2.0)  # more sweeps: nothing is retried for a lost grant
            state = await rows(live.broker)
            tokens = {g: data["access_token"] for g, (row, data) in state.items() if g not in lost}
            codes = await accepted_by_api(live, tokens)
        assert second.process is not None and second.process.returncode == 0
        assert second.problems() == [], second.output()

        # The second refresher touched no row before the dead one's lease on it ran out.
        for group, until in held.items():
            after_kill = [r.at for r in server.requests_seen("token")
                          if r.family_id == families[group] and r.at > killed_at]
            assert after_kill and min(after_kill) >= until - 0.05, (group, after_kill, until)
        assert recovered_after <= lease + 2 * 1 + 3
        # Nothing lost but what the provider had already rotated; no token used twice but
        # those, once each; no retry loop for them.
        assert set(codes.values()) == {200}
        assert server.reuse_detections == len(lost)
        assert server.invalid_grant_count == len(lost)
        for group in groups:
            row = state[group][0]
            if group in lost:
                assert server.refresh_requests[families[group]] == 2  # the lost one, the replay
                assert requests_then.get(families[group]) == 2
                assert (row.status, row.next_refresh_at, row.last_error) == (
                    "reauth_required", None, "invalid_grant",
                )
            else:
                assert row.status == "connected" and row.failure_count == 0
        events = (await live.service.get(f"/groups/{min(lost)}/events")).json()["events"]
        assert [e["kind"] for e in events] == ["reauth_required", "connected"]
        assert events[0]["detail"] == {"error": "invalid_grant", "reason": INTERRUPTED}
        print(
            f"\nkilled holding {len(held)} leases ({len(stalled)} requests never processed, "
            f"{len(late)} answered after death, {count - 10} waiting); all taken over "
            f"{recovered_after:.1f} s after the kill (lease {lease:.0f} s); "
            f"reuse {server.reuse_detections}, invalid_grant {server.invalid_grant_count}"
        )


@pytest.mark.parametrize("command", ["refresher", "serve"])
async def test_sigterm_lets_refreshes_in_flight_finish(
    command: str, refresh_live: Callable[..., Any], tmp_path: Path
) -> None:
    """A graceful stop (SIGTERM, as on every deploy) while token requests are in flight:
    the process waits for their answers and stores them, then exits 0. Abandoning them
    would lose tokens the provider already rotated. ``broker serve`` also answers the node
    request in flight (a forced refresh) before it exits."""
    count = 10
    async with refresh_live(provider={"timeout_seconds": 3}, **SETTINGS) as live:
        server = live.server
        config = live.broker.settings.source
        assert config is not None
        await connect_many(live, count)
        server.delay_next(1000, seconds=1.0, grant_type="refresh_token")
        port, url = free_port_url()
        args = ("serve", "--port", str(port)) if command == "serve" else ("refresher",)
        proc = Refresher(config, tmp_path / f"{command}.log", command=args).start()
        node: asyncio.Task[httpx.Response] | None = None
        try:
            await proc.running()
            deadline = time.monotonic() + 15
            while sum(r.fault == "delay" for r in server.requests_seen("token")) < 3:
                assert time.monotonic() < deadline, proc.output()
                await asyncio.sleep(0.01)
            if command == "serve":
                async with httpx.AsyncClient(base_url=url, timeout=10, headers={
                        "Authorization": f"Bearer {SERVICE_TOKEN}"}) as client:
                    node = asyncio.create_task(client.get(
                        "/groups/g000/integrations/acme/credentials?force_refresh=1"))
                    await asyncio.sleep(0.3)  # the request is in, its refresh delayed
                    stopping = time.monotonic()
                    code = await proc.stop()
                    took = time.monotonic() - stopping
                    answer = await node
                assert answer.status_code == 200, answer.text
                assert answer.json()["credentials"]["access_token"]
            else:
                stopping = time.monotonic()
                code = await proc.stop()
                took = time.monotonic() - stopping
        finally:
            if proc.process is not None and proc.process.poll() is None:
                proc.kill()
        # uvicorn ends a graceful shutdown by re-raising the signal it caught (the exit
        # status says SIGTERM, as systemd and Kubernetes expect); the refresher exits 0.
        assert code == (-signal.SIGTERM if command == "serve" else 0), proc.output()
        assert "Application shutdown complete" in proc.output() or command != "serve"
        assert proc.problems() == [], proc.output()
        assert took < 5, took
        server.clear_faults()
        await asyncio.sleep(1.2)  # anything still at the provider is processed by now
        # Every stored refresh token is the current one: no answer was abandoned.
        for group, (row, data) in (await rows(live.broker)).items():
            with server.store.lock:
                assert not server.store.by_refresh[data["refresh_token"]].refresh_rotated, group
            assert row.lease_owner is None and row.status == "connected"
        assert server.reuse_detections == 0 and server.invalid_grant_count == 0
