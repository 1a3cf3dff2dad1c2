"""Events and signed webhooks, end to end: a grant revoked at the real authorization server
is recorded as ``reauth_required`` and POSTed, signed, to a real loopback receiver by the
sweep; a receiver that fails is retried later; no event carries a secret."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import select

from broker.errors import IntegrationNeedsReauth
from broker.nodes import ExecutionContext
from broker.runtime import Broker
from broker.scheduler import sweep
from broker.store.models import WebhookDelivery
from broker.webhooks import SIGNATURE_HEADER, deliver_due, sign, verify_signature
from tests import refresh_support
from tests.oauth_support import Live
from tests.refresh_support import WebhookReceiver, connect, rows

refresh_live = refresh_support.refresh_live

SECRET = "whsec-0123456789abcdef-test"


def advance(broker: Broker, seconds: float) -> None:
    base = broker.clock
    broker.clock = lambda: base() + timedelta(seconds=seconds)


def now_of(broker: Broker) -> int:
    return int(broker.now().timestamp())


async def api_events(live: Live, group_id: str = "g1") -> list[dict[str, Any]]:
    r = await live.service.get(f"/groups/{group_id}/events")
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


async def deliveries(broker: Broker) -> list[WebhookDelivery]:
    async with broker.session() as db:
        return list(await db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


async def test_revoked_grant_is_recorded_and_delivered_signed(
    refresh_live: Callable[..., Any],
) -> None:
    receiver = WebhookReceiver()
    async with receiver.running(), refresh_live(
        webhooks=[{"url": receiver.url, "secret": SECRET}]
    ) as live:
        await connect(live, "g1")
        assert live.server.revoke_user_grants("alice") == 1
        advance(live.broker, 3600 - 60)  # due for the sweep
        result = await sweep(live.broker)
        assert (result.claimed, result.failed) == (1, 1)
        # The same sweep sent both events (connected, then reauth_required), signed.
        assert result.delivered == 2
        events = await api_events(live)
        assert [e["kind"] for e in events] == ["reauth_required", "connected"]
        assert events[0]["detail"] == {"error": "invalid_grant"}
        assert events[0]["integration"] == "acme" and events[0]["group_id"] == "g1"

        delivered = receiver.delivered()
        assert len(delivered) == 2
        for headers, body in delivered:
            signature = headers[SIGNATURE_HEADER.lower()]
            assert verify_signature(SECRET, signature, body, now=now_of(live.broker))
            assert not verify_signature("another-secret-0123456789", signature, body,
                                        now=now_of(live.broker))
            assert not verify_signature(SECRET, signature, body + b" ", now=now_of(live.broker))
            assert not verify_signature(SECRET, signature, body, now=now_of(live.broker) + 301)
            assert headers["content-type"] == "application/json"
        # The body is the event as the API lists it.
        assert sorted(receiver.events(), key=lambda e: e["id"]) == sorted(
            events, key=lambda e: e["id"]
        )
        assert {d.status for d in await deliveries(live.broker)} == {"delivered"}
        # Nothing is sent twice.
        assert (await sweep(live.broker)).delivered == 0
        assert len(receiver.received) == 2


async def test_a_failing_receiver_is_retried_later(refresh_live: Callable[..., Any]) -> None:
    receiver = WebhookReceiver(statuses=[500])
    async with receiver.running(), refresh_live(
        webhooks=[{"url": receiver.url, "secret": SECRET}]
    ) as live:
        await connect(live, "g1")  # one event: connected
        assert await deliver_due(live.broker) == 0  # the receiver answered 500
        (delivery,) = await deliveries(live.broker)
        assert delivery.status == "pending" and delivery.attempts == 1
        assert delivery.last_error == "HTTP 500"
        assert delivery.next_attempt_at is not None
        retry_in = (delivery.next_attempt_at - live.broker.now()).total_seconds()
        assert 0.5 <= retry_in <= 2.5
        assert await deliver_due(live.broker) == 0  # not yet due: not sent again
        assert len(receiver.received) == 1
        advance(live.broker, 10)
        assert (await sweep(live.broker)).delivered == 1
        (delivery,) = await deliveries(live.broker)
        assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == (
            "delivered", 2, None,
        )
        (_, _, s1), (second, body, s2) = receiver.received
        assert (s1, s2) == (500, 200)
        assert verify_signature(
            SECRET, second[SIGNATURE_HEADER.lower()], body, now=now_of(live.broker)
        )
        assert json.loads(body)["kind"] == "connected"


async def test_a_receiver_that_never_answers_well_is_given_up(
    refresh_live: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = WebhookReceiver(statuses=[503] * 20)
    async with receiver.running(), refresh_live(
        webhooks=[{"url": receiver.url, "secret": SECRET}]
    ) as live:
        await connect(live, "g1")
        for _ in range(12):
            await deliver_due(live.broker)
            advance(live.broker, 3700)  # past the longest delivery backoff
        (delivery,) = await deliveries(live.broker)
        assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == (
            "failed", 8, None,
        )
        assert len(receiver.received) == 8
        assert "given up" in caplog.text


async def test_events_and_webhooks_carry_no_secret(refresh_live: Callable[..., Any]) -> None:
    receiver = WebhookReceiver(statuses=[500])
    async with receiver.running(), refresh_live(
        webhooks=[{"url": receiver.url, "secret": SECRET}]
    ) as live:
        await connect(live, "g1")
        secrets_seen: set[str] = {live.client_secret, SECRET, SERVICE_TOKEN}

        async def collect() -> None:
            for _, data in (await rows(live.broker)).values():
                secrets_seen.update(
                    v for k, v in data.items() if k in ("access_token", "refresh_token")
                )

        await collect()
        advance(live.broker, 3600 - 60)
        live.server.fail_next(1, status=503, grant_type="refresh_token")
        await sweep(live.broker)  # refresh_failed
        advance(live.broker, 5)
        await sweep(live.broker)  # recovered (a new token pair)
        await collect()
        live.server.revoke_user_grants("alice")
        ctx = ExecutionContext.local(live.broker, "g1")
        with pytest.raises(IntegrationNeedsReauth):
            await ctx.custom_integration("acme", force_refresh=True)  # reauth_required
        advance(live.broker, 60)
        await deliver_due(live.broker)
        events = await api_events(live)
        kinds = [e["kind"] for e in events]
        for kind in ("connected", "refresh_failed", "recovered", "reauth_required"):
            assert kind in kinds, kinds
        texts = [json.dumps(events)] + [body.decode() for _, body, _ in receiver.received]
        assert len(texts) > 3
        for text in texts:
            for secret in secrets_seen:
                assert secret not in text
            for name in ("access_token", "refresh_token", "client_secret", "code_verifier"):
                assert name not in text
        assert len(secrets_seen) >= 7  # two token pairs, client secret, webhook, service


def test_signature_format() -> None:
    body = b'{"kind":"connected"}'
    header = sign(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature(SECRET, header, body, now=1_700_000_100)
    assert not verify_signature(SECRET, header, body, now=1_700_000_400)  # too old
    assert not verify_signature(SECRET, header, body, now=1_699_999_600)  # from the future
    for broken in ("", "t=abc,v1=00", "v1=00", "t=1700000000", header.replace("v1=", "v1=0")):
        assert not verify_signature(SECRET, broken, body, now=1_700_000_000)


async def test_deliveries_left_when_every_webhook_is_removed_are_given_up(
    broker: Broker, make_settings: Callable[..., Any]
) -> None:
    """Pending deliveries keep their events from being pruned: with no webhook configured
    any more, the next delivery pass gives them up instead of leaving them forever."""
    from broker.events import record

    hooked = await Broker.open(make_settings(
        database_url=broker.settings.database_url,
        encryption_keys=[k.get_secret_value() for k in broker.settings.encryption_keys],
        webhooks=[{"url": "https://hooks.invalid/broker", "secret": SECRET}],
    ))
    try:
        async with hooked.session() as db, db.begin():
            for n in range(3):
                await record(db, group_id=f"g{n}", integration="openweathermap",
                             kind="connected", now=hooked.now(),
                             webhooks=hooked.settings.webhooks)
    finally:
        await hooked.close()
    assert [d.status for d in await deliveries(broker)] == ["pending"] * 3

    assert broker.settings.webhooks == []
    assert await deliver_due(broker) == 0
    left = await deliveries(broker)
    assert [(d.status, d.next_attempt_at, d.last_error) for d in left] == [
        ("failed", None, "webhook no longer configured")
    ] * 3
