"""The refresh engine under a misbehaving token endpoint (the real authorization server,
short-lived tokens): 500s, timeouts, slow answers, 429 + Retry-After, a wrong client
secret, and two replicas refreshing one connection on demand at once.

"Valid" is the provider's word here: every token a node receives is checked against the
authorization server's own record of when it expires, not against the broker's belief."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from broker.errors import IntegrationNeedsReauth, IntegrationUnavailable
from broker.nodes import ExecutionContext
from broker.runtime import Broker
from broker.scheduler import sweep
from tests import refresh_support
from tests.oauth_support import Live
from tests.refresh_support import connect, family_of, newest_expiry, real_expiry, rows

refresh_live = refresh_support.refresh_live

LIFETIME = 5  # seconds; the shortest lifetime the broker takes as it is (MIN_LIFETIME)


def advance(broker: Broker, seconds: float) -> None:
    """Move one broker's clock (not the provider's) forward."""
    base = broker.clock
    broker.clock = lambda: base() + timedelta(seconds=seconds)


@dataclass
class Call:
    started: float
    returned: float
    token: str | None  # None: IntegrationUnavailable
    expires_at: int | None = None


async def node_calls(
    live: Live, seconds: float, *, until_not: str, every: float = 0.05
) -> list[Call]:
    """A node asking for the acme credential of g1 every ``every`` s, for ``seconds`` at
    most: until it has received a token other than ``until_not``."""
    ctx = ExecutionContext.local(live.broker, "g1")
    calls: list[Call] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if calls and calls[-1].token not in (None, until_not):
            break
        started = time.time()
        try:
            got = await ctx.custom_integration("acme")
        except IntegrationUnavailable:
            calls.append(Call(started, time.time(), None))
        else:
            calls.append(Call(started, time.time(), got["access_token"], got["expires_at"]))
        await asyncio.sleep(every)
    return calls


def check_calls(live: Live, calls: list[Call], family: str) -> None:
    """No node ever got a token the provider considered expired, the broker never believed
    a token lives longer than the provider said, and "unavailable" was only answered when
    no valid token existed (1 s: the broker keeps expiry in whole seconds, rounded down)."""
    for call in calls:
        if call.token is None:
            newest = newest_expiry(live.server, family, issued_before=call.returned)
            assert newest < call.returned + 1.0, call
            continue
        real = real_expiry(live.server, call.token)
        assert real is not None
        assert real > call.returned, f"expired token handed out: {call}, expired at {real}"
        assert call.expires_at is not None and call.expires_at <= real + 1e-6, (call, real)


async def status_of(live: Live) -> str:
    listing = (await live.service.get("/groups/g1/integrations")).json()
    (acme,) = [i for i in listing["integrations"] if i["name"] == "acme"]
    return str(acme["status"])


async def event_kinds(live: Live) -> list[str]:
    r = await live.service.get("/groups/g1/events")
    return [e["kind"] for e in r.json()["events"]]


@pytest.mark.parametrize("fault", ["500", "timeout", "slow"])
async def test_token_endpoint_trouble_then_recovery(
    refresh_live: Callable[..., Any], fault: str
) -> None:
    """The token endpoint misbehaves from the first refresh on, past the old token's
    expiry: the valid token keeps being handed out, then "unavailable" (never an expired
    token), then the broker recovers by itself; the connection is never marked."""
    async with refresh_live(
        server={"access_token_lifetime": LIFETIME},
        # A slow answer must arrive within the client's timeout: one that comes later was
        # still processed, and at a rotating provider that burns the refresh token (see
        # test_refresh_multiprocess: a lost answer ends in reauth_required).
        provider={"timeout_seconds": 3 if fault == "slow" else 1},
    ) as live:
        await connect(live, "g1")
        first = (await rows(live.broker))["g1"][1]["access_token"]
        family = family_of(live.server, first)
        if fault == "500":
            live.server.fail_next(4, status=500, grant_type="refresh_token")
        elif fault == "timeout":  # stalled past the client's 1 s timeout, not processed
            live.server.timeout_next(2, seconds=4, grant_type="refresh_token")
        else:  # answered, but only after 2 s
            live.server.delay_next(1, seconds=2, grant_type="refresh_token")
        calls = await node_calls(live, LIFETIME + 5, until_not=first)

        check_calls(live, calls, family)
        assert calls[0].token == first
        assert calls[-1].token is not None and calls[-1].token != first
        assert live.server.invalid_grant_count == 0
        assert live.server.reuse_detections == 0
        assert await status_of(live) == "connected"
        kinds = await event_kinds(live)
        assert "reauth_required" not in kinds
        failed = kinds.count("refresh_failed")
        if fault == "slow":
            assert failed == 0
            assert not [c for c in calls if c.token is None]
        else:
            assert failed == {"500": 4, "timeout": 2}[fault]
            assert kinds[0] in ("recovered", "refreshed") and "recovered" in kinds
            # Until the old token expired, nodes kept getting it after the provider's
            # trouble began (timed from the first failed request the provider saw, not from
            # the first call, which a loaded machine can start late).
            trouble = min(r.at for r in live.server.requests_seen("token") if r.fault)
            assert [c for c in calls if c.token == first and c.started > trouble]
        # Every token request was single flight: one per attempt, none in parallel.
        refreshes = live.server.refresh_requests_for(family)
        assert refreshes == live.server.token_requests["refresh_token"]
        assert refreshes <= failed + 3


async def test_a_slow_answer_does_not_make_a_token_look_longer_lived(
    refresh_live: Callable[..., Any],
) -> None:
    """The provider rotates the token, then its answer takes 1.5 s to arrive: the broker
    counts the lifetime from its request, so it never believes the token lives longer than
    the provider says (else it would hand it out after it expired)."""
    async with refresh_live(
        server={"access_token_lifetime": 60}, provider={"timeout_seconds": 5}
    ) as live:
        await connect(live, "g1")
        live.server.timeout_next(1, seconds=1.5, process=True, grant_type="refresh_token")
        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("acme", force_refresh=True)
        real = real_expiry(live.server, got["access_token"])
        assert real is not None
        assert got["expires_at"] <= real
        row, data = (await rows(live.broker))["g1"]
        assert row.expires_at is not None and row.expires_at.timestamp() <= real
        assert data["access_token"] == got["access_token"]
        assert live.server.reuse_detections == 0


async def test_429_retry_after_is_honoured(refresh_live: Callable[..., Any]) -> None:
    async with refresh_live() as live:
        await connect(live, "g1")
        first = (await rows(live.broker))["g1"][1]["access_token"]
        live.server.rate_limit_next(1, retry_after=120, grant_type="refresh_token")
        advance(live.broker, 3600 - 30)  # stale (under a minute left), still valid
        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("acme")
        assert got["access_token"] == first
        row, _ = (await rows(live.broker))["g1"]
        assert row.next_refresh_at is not None
        wait = (row.next_refresh_at - live.broker.now()).total_seconds()
        assert wait >= 120 - 1
        assert row.last_error == "http_429" and row.failure_count == 1
        # Within Retry-After, neither nodes (the token is still valid) nor the sweep ask.
        for _ in range(5):
            assert (await ctx.custom_integration("acme"))["access_token"] == first
        assert (await sweep(live.broker)).claimed == 0
        assert live.server.token_requests["refresh_token"] == 1
        advance(live.broker, 121)
        result = await sweep(live.broker)
        assert (result.claimed, result.refreshed) == (1, 1)
        assert (await ctx.custom_integration("acme"))["access_token"] != first
        assert live.server.token_requests["refresh_token"] == 2
        assert (await event_kinds(live))[:2] == ["recovered", "refresh_failed"]


async def test_invalid_client_is_an_operator_error_not_the_users(
    refresh_live: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's client secret no longer matches the provider's: connections stay
    connected, one ERROR line names the provider, refreshes are retried with backoff, and
    the connections recover once the secret matches again."""
    async with refresh_live() as live:
        await connect(live, "g1")
        await connect(live, "g2")
        with live.server.store.lock:
            client = live.server.store.clients[live.client_id]
            client.client_secret = "rotated-by-the-provider-0123456789"
        caplog.set_level(logging.INFO, logger="broker")
        advance(live.broker, 3600 - 60)  # both due for the sweep, still valid
        result = await sweep(live.broker)
        # Both failed (nodes still get the valid tokens meanwhile).
        assert (result.claimed, result.refreshed, result.failed) == (2, 0, 2)
        state = await rows(live.broker)
        delays = []
        for group in ("g1", "g2"):
            row, _ = state[group]
            assert row.status == "connected"
            assert row.failure_count == 1 and row.last_error == "invalid_client"
            assert row.next_refresh_at is not None
            delays.append((row.next_refresh_at - live.broker.now()).total_seconds())
        assert all(0 < d <= 1.0 for d in delays)
        advance(live.broker, 5)
        assert (await sweep(live.broker)).claimed == 2  # retried...
        state = await rows(live.broker)
        assert {state[g][0].failure_count for g in ("g1", "g2")} == {2}
        advance(live.broker, 5)
        before = live.broker.now()
        assert (await sweep(live.broker)).claimed == 2
        after = live.broker.now()
        state = await rows(live.broker)
        # ...with a growing backoff: 4 s with jitter, 2 to 4 s from the failure (which
        # happened between ``before`` and ``after``: a loaded machine takes its time).
        for g in ("g1", "g2"):
            at = state[g][0].next_refresh_at
            assert (at - before).total_seconds() >= 2
            assert (at - after).total_seconds() <= 4
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        message = errors[0].getMessage()
        assert "acme" in message and "client_secret" in message
        assert live.client_secret not in message
        assert "rotated-by-the-provider" not in caplog.text
        ctx = ExecutionContext.local(live.broker, "g1")
        assert (await ctx.custom_integration("acme"))["access_token"]  # still valid
        assert live.server.invalid_grant_count == 0
        # The operator fixes it: the next retry recovers both.
        with live.server.store.lock:
            client.client_secret = live.client_secret
        advance(live.broker, 10)
        result = await sweep(live.broker)
        assert (result.claimed, result.refreshed) == (2, 2)
        state = await rows(live.broker)
        assert {state[g][0].failure_count for g in ("g1", "g2")} == {0}
        assert (await event_kinds(live))[0] == "recovered"


async def test_two_replicas_refreshing_on_demand_make_one_token_request(
    refresh_live: Callable[..., Any],
) -> None:
    """Two Broker objects on one database (two replicas) get the expired credential at
    the same moment, 50 callers each: one token request, one new token for all."""
    async with refresh_live() as live:
        await connect(live, "g1")
        first = (await rows(live.broker))["g1"][1]["access_token"]
        other = await Broker.open(live.broker.settings)
        try:
            for broker in (live.broker, other):
                advance(broker, 3600 + 5)  # expired, as both replicas see it
            a = ExecutionContext.local(live.broker, "g1")
            b = ExecutionContext.local(other, "g1")
            got = await asyncio.gather(
                *(ctx.custom_integration("acme") for _ in range(50) for ctx in (a, b))
            )
        finally:
            await other.close()
        tokens = {g["access_token"] for g in got}
        assert len(tokens) == 1 and tokens != {first}
        assert live.server.token_requests["refresh_token"] == 1
        assert live.server.invalid_grant_count == 0
        assert (await event_kinds(live)).count("refreshed") == 1


async def test_a_revoked_grant_is_marked_once_and_not_retried(
    refresh_live: Callable[..., Any],
) -> None:
    async with refresh_live() as live:
        await connect(live, "g1")
        live.server.revoke_user_grants("alice")
        advance(live.broker, 3600 - 60)
        assert (await sweep(live.broker)).failed == 1
        ctx = ExecutionContext.local(live.broker, "g1")
        for _ in range(3):
            with pytest.raises(IntegrationNeedsReauth):
                await ctx.custom_integration("acme")
        advance(live.broker, 3600)
        assert (await sweep(live.broker)).claimed == 0
        assert live.server.token_requests["refresh_token"] == 1
        assert (await event_kinds(live)).count("reauth_required") == 1
