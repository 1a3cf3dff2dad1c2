"""Webhook deliveries are never sent twice while an attempt is running: two deliverers on one
database (SQLite and PostgreSQL) against real receivers on 127.0.0.1, with the attempt
timeout and the claim margin made short through ``deliver_due``'s parameters."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from broker.config import Settings
from broker.integrations import Group, register_custom_integration
from broker.runtime import Broker
from broker.store.models import WebhookDelivery
from broker.webhooks import claim_covers, deliver_due
from tests.refresh_support import WebhookReceiver

SECRET = "whsec-0123456789abcdef-test"
TIMEOUT = 0.6  # one attempt, all of it
MARGIN = 0.2  # a claim outlasts its attempt by this much


@asynccontextmanager
async def two_deliverers(
    store_url: str, make_settings: Callable[..., Settings], url: str
) -> AsyncIterator[tuple[Broker, Broker]]:
    """Two brokers on the test store, the webhook at ``url`` configured on both."""
    settings = make_settings(database_url=store_url, webhooks=[{"url": url, "secret": SECRET}])
    a, b = await Broker.open(settings), await Broker.open(settings)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def test_a_claim_covers_an_attempt_with_half_the_margin_to_spare() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    fresh = now + timedelta(seconds=15)  # a batch's claim: timeout 10 + margin 5
    assert claim_covers(fresh, now, timeout=10, margin=5)
    assert claim_covers(fresh, now + timedelta(seconds=2.5), timeout=10, margin=5)
    assert not claim_covers(fresh, now + timedelta(seconds=2.6), timeout=10, margin=5)
    assert not claim_covers(fresh, now + timedelta(seconds=20), timeout=10, margin=5)


async def connect_keys(broker: Broker, count: int) -> None:
    """``count`` API-key connections: one ``connected`` event, so one delivery, each."""
    for i in range(count):
        async with broker.session() as db, db.begin():
            await register_custom_integration(
                db, Group(f"g{i}"), "openweathermap", {"api_key": f"{i:032x}"}
            )


async def deliveries(broker: Broker) -> list[WebhookDelivery]:
    async with broker.session() as db:
        return list(await db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


async def keep_delivering(broker: Broker, sent: list[int]) -> None:
    """Call ``deliver_due`` until no delivery is pending; ``sent`` gets what each call sent."""
    while any(d.status == "pending" for d in await deliveries(broker)):
        sent.append(
            await deliver_due(broker, limit=20, attempt_timeout=TIMEOUT, claim_margin=MARGIN)
        )
        await asyncio.sleep(0.05)


async def test_two_deliverers_send_each_delivery_once_to_a_slow_receiver(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """Each POST takes 0.3 s: a batch of 8 takes 2.4 s, three times its first claim. The
    second deliverer takes over the deliveries whose claim ran out before their turn came;
    the first skips those, and renews the claim of the others before sending them."""
    receiver = WebhookReceiver(delay=0.3)
    async with receiver.running(), two_deliverers(store_url, make_settings, receiver.url) as (
        a, b,
    ):
        await connect_keys(a, 8)
        sent_a: list[int] = []
        sent_b: list[int] = []

        async def second() -> None:
            await asyncio.sleep(0.1)  # the first deliverer claims the whole batch
            await keep_delivering(b, sent_b)

        await asyncio.wait_for(
            asyncio.gather(keep_delivering(a, sent_a), second()), timeout=30
        )
        posts = Counter(json.loads(body)["id"] for _, body, _ in receiver.received)
        assert len(posts) == 8 and set(posts.values()) == {1}, posts
        assert sum(sent_a) + sum(sent_b) == 8
        assert sum(sent_b) >= 1, "the first deliverer's claims never ran out: no contention"
        assert {(d.status, d.attempts) for d in await deliveries(a)} == {("delivered", 1)}


@asynccontextmanager
async def trickling_receiver() -> AsyncIterator[tuple[str, list[float]]]:
    """An HTTP endpoint on 127.0.0.1 that answers 200 and then sends its body one byte every
    0.1 s, never finishing: no single read ever waits long. Yields its URL and the times at
    which requests arrived."""
    arrived: list[float] = []
    stopping = asyncio.Event()
    handlers: list[asyncio.Future[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        finished = asyncio.get_running_loop().create_future()
        handlers.append(finished)
        arrived.append(time.monotonic())
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while not stopping.is_set():
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            finished.set_result(None)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook", arrived
    finally:
        stopping.set()
        server.close()
        await asyncio.gather(*handlers)
        await server.wait_closed()


async def test_an_attempt_that_never_ends_is_cut_off_and_not_sent_again_meanwhile(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """The receiver answers but never finishes its body. The attempt ends after
    ``attempt_timeout`` in all; while it runs, the other deliverer, calling ``deliver_due``
    over and over, sends nothing."""
    async with trickling_receiver() as (url, arrived), two_deliverers(
        store_url, make_settings, url
    ) as (a, b):
        await connect_keys(a, 1)
        started = time.monotonic()
        first = asyncio.create_task(
            deliver_due(a, attempt_timeout=TIMEOUT, claim_margin=MARGIN)
        )
        while not arrived:  # the first attempt is under way
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.01)
        other: list[int] = []
        while not first.done() and time.monotonic() - started < 5:
            other.append(await asyncio.wait_for(
                deliver_due(b, attempt_timeout=TIMEOUT, claim_margin=MARGIN), timeout=5
            ))
            await asyncio.sleep(0.05)
        sent = await asyncio.wait_for(first, timeout=5)
        took = time.monotonic() - started
        assert sent == 0 and TIMEOUT <= took < TIMEOUT + 2.0, took
        assert len(arrived) == 1, "sent again while the first attempt was running"
        assert sum(other) == 0 and len(other) >= 1, other  # it tried while the attempt ran
        (delivery,) = await deliveries(a)
        assert (delivery.status, delivery.attempts, delivery.last_error) == (
            "pending", 1, "timeout",
        )
        assert delivery.next_attempt_at is not None and delivery.next_attempt_at > a.now()
