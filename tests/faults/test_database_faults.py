"""The database failing a share of reads and writes (issue #6, item 12).

Faults are injected below the broker (``DatabaseFaults``: SQLAlchemy's
``before_cursor_execute`` raising ``OperationalError``), and on PostgreSQL by killing the
broker's real server connections with ``pg_terminate_backend``. What must hold:

- every HTTP error is a 503 ``service_unavailable`` with a clear message, never a 500;
- no secret leaks anywhere (answers, logs) and nothing is written unencrypted;
- no refresh token is lost: the provider rotates refresh tokens, so a refresh whose answer
  was not stored would leave the connection holding a dead refresh token;
- when the database is healthy again the broker works again, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.exc import OperationalError

from broker.scheduler import sweep
from tests import oauth_support
from tests.faults.fault_support import advance, connect, injected_faults, stored_rows
from tests.oauth_support import Live

live_factory = oauth_support.live_factory

# The UPDATE that stores a refreshed token (Repository.store_refreshed).
STORE_REFRESHED = r"^UPDATE connections SET status=\S+, credential="
UNAVAILABLE = "The credential store is unavailable. Try again shortly."


def check_error(response: httpx.Response) -> None:
    """An error answer is a 503, never a 500: JSON naming the store, or — for the OAuth2
    callback, which a popup opened — the result page telling its opener it failed."""
    assert response.status_code == 503, (response.status_code, response.text)
    if response.url.path == "/oauth/callback":
        message = oauth_support.page_data(response)["message"]
        assert message["status"] == "error" and "unavailable" in message["error"], message
        return
    error = response.json()["error"]
    assert error == {"code": "service_unavailable", "message": UNAVAILABLE}, error


async def credentials(live: Live, group_id: str, *, force: bool = False) -> httpx.Response:
    query = "?force_refresh=1" if force else ""
    return await live.service.get(f"/groups/{group_id}/integrations/acme/credentials{query}")


async def refresh_tokens(live: Live) -> dict[str, str]:
    """The refresh token each connection holds now (read from the store, no refresh)."""
    tokens = {}
    for row in await stored_rows(live.broker):
        data = live.broker.keyring.open(row.group_id, row.integration, row.credential)
        tokens[row.group_id] = data["refresh_token"]
    return tokens


async def test_a_refresh_whose_write_fails_keeps_its_new_refresh_token(
    live_factory: Callable[..., Any],
) -> None:
    """The provider answered (and rotated the refresh token: the old one is now dead), then
    the UPDATE storing the answer fails twice: the broker retries the write, so the
    connection keeps the only refresh token that still works."""
    async with live_factory() as live:
        await connect(live, "g1")
        before = (await refresh_tokens(live))["g1"]
        with injected_faults(live.broker) as faults:
            faults.fail_next(STORE_REFRESHED, 2)
            r = await credentials(live, "g1", force=True)
            assert faults.injected == 2
        assert r.status_code == 200, r.text
        assert live.server.token_requests["refresh_token"] == 1
        after = (await refresh_tokens(live))["g1"]
        assert after != before
        r = await credentials(live, "g1", force=True)  # uses the stored refresh token
        assert r.status_code == 200, r.text
        assert live.server.token_requests["refresh_token"] == 2
        assert live.server.invalid_grant_count == 0
        assert live.server.reuse_detections == 0


async def popup(live: Live, group_id: str) -> list[httpx.Response]:
    """A user connecting ``group_id``: the app opens a connect session, the popup goes to
    the authorize route, the user consents, the provider redirects to the callback. The
    broker's answers, up to the first one that is not a step forward."""
    answers = [await live.service.post("/connect-sessions", json={"group_id": group_id})]
    if answers[-1].status_code != 201:
        return answers
    session = answers[-1].json()["token"]
    async with live.browser() as browser:
        answers.append(await live.authorize(browser, group_id=group_id, session=session))
        if answers[-1].status_code != 200:
            return answers
        callback = await live.consent(browser, answers[-1].json()["location"])
        answers.append(await browser.get(callback))
    return answers


def secrets_issued(live: Live) -> set[str]:
    """Every access and refresh token the provider ever issued to the broker."""
    with live.server.store.lock:
        tokens = set(live.server.store.by_access) | set(live.server.store.by_refresh)
    return {t for t in tokens if t}


async def stored_text(live: Live) -> str:
    """Every row of every broker table, as text."""
    from broker.store.models import Base

    parts = []
    async with live.broker.session() as db:
        for table in Base.metadata.sorted_tables:
            for row in (await db.execute(table.select())).all():
                parts.append(repr(tuple(row)))
    return "\n".join(parts)


def files_under(root: Path) -> list[tuple[Path, bytes]]:
    """Every file under ``root`` with its content (the SQLite database, its WAL, ...)."""
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def working_refresh_token(live: Live, refresh_token: str) -> bool:
    with live.server.store.lock:
        tok = live.server.store.by_refresh.get(refresh_token)
        return tok is not None and not tok.refresh_rotated and not tok.family.revoked


async def test_a_quarter_of_statements_failing_gives_503s_loses_no_refresh_token_and_recovers(
    live_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Connect sessions, OAuth callbacks, reads, forced refreshes, listings and sweeps while
    25 % of all SQL statements fail: only 200s and 503 ``service_unavailable``; afterwards
    (same process, no restart) every connection reads and refreshes, holds a refresh token
    the provider still honours, and no token ever reached a log line or the store in
    clear."""
    caplog.set_level(logging.INFO)
    async with live_factory() as live:
        groups = [f"g{i}" for i in range(4)]
        for group_id in groups:
            await connect(live, group_id)
        answers: list[httpx.Response] = []
        sweep_failures = 0
        with injected_faults(live.broker, rate=0.25, seed=12) as faults:
            for n in range(8):
                advance(live.broker, 3000)  # every token is due, older ones stale
                first, second, *others = await asyncio.gather(
                    popup(live, f"new{n}a"),
                    popup(live, f"new{n}b"),
                    *(credentials(live, g) for g in groups),
                    *(credentials(live, g, force=True) for g in groups[:2]),
                    live.service.get("/groups/g1/integrations"),
                    live.service.get("/groups/g1/events"),
                )
                answers += first + second + others
                try:
                    await sweep(live.broker)
                except Exception as exc:  # the sweep's own claim failed: it runs again
                    assert "InjectedFault" in repr(exc), repr(exc)
                    sweep_failures += 1
            assert faults.injected >= 30, faults.injected

        ok = [a for a in answers if a.status_code in (200, 201, 302)]
        errors = [a for a in answers if a not in ok]
        assert ok and errors
        for error in errors:
            check_error(error)
        # (test_a_callback_whose_store_fails... fails the callback itself on purpose.)
        callbacks = [a for a in answers if a.url.path == "/oauth/callback"]
        connected_pages = [a for a in callbacks if a.status_code == 200]
        for page in connected_pages:
            assert oauth_support.page_data(page)["message"]["status"] == "connected"

        # The database is healthy again: the same broker recovers on its own. (Time passes
        # too: leases whose release failed run out, as they would.)
        advance(live.broker, 3000)
        rows = await stored_rows(live.broker)
        names = {r.group_id for r in rows}
        assert set(groups) <= names
        for row in rows:
            data = live.broker.keyring.open(row.group_id, row.integration, row.credential)
            assert working_refresh_token(live, data["refresh_token"]), row.group_id
        for group_id in sorted(names):
            r = await credentials(live, group_id)
            assert r.status_code == 200, r.text
            r = await credentials(live, group_id, force=True)
            assert r.status_code == 200, r.text
        listing = (await live.service.get("/groups/g1/integrations")).json()
        assert listing["integrations"][0]["status"] == "connected"
        assert live.server.invalid_grant_count == 0
        assert live.server.reuse_detections == 0

        # No plaintext anywhere: not in answers, logs, the store or files on disk.
        issued = secrets_issued(live)
        text = await stored_text(live)
        logs = caplog.text
        bodies = "\n".join(e.text for e in errors)
        for secret in issued:
            assert secret not in text and secret not in logs and secret not in bodies
        for path, content in await asyncio.to_thread(files_under, tmp_path):
            assert not any(s.encode() in content for s in issued), path
        # Every error was answered as such: no internal error, and no traceback but the
        # sweep's per-connection log of an injected fault.
        assert "unhandled error" not in logs and "internal_error" not in logs
        for record in caplog.records:
            if record.exc_info:
                assert record.name == "broker.refresh", record.getMessage()
                assert isinstance(record.exc_info[1], OperationalError), record.exc_info
        print(
            f"{faults.injected} faults in {faults.statements} statements; "
            f"{len(ok)} ok, {len(errors)} 503; {len(callbacks)} callbacks, "
            f"{len(connected_pages)} connected; "
            f"{sweep_failures} sweeps failed"
        )


async def test_a_callback_whose_store_fails_is_a_503_and_the_next_sign_in_works(
    live_factory: Callable[..., Any],
) -> None:
    """The code was exchanged, then the INSERT of the new connection fails: the callback
    answers 503 (nothing half-stored), and signing in again works."""
    async with live_factory() as live:
        with injected_faults(live.broker) as faults:
            faults.fail_next(r"^INSERT INTO connections", 1)
            answers = await popup(live, "g1")
            assert faults.injected == 1
        assert [a.status_code for a in answers] == [201, 200, 503]
        assert answers[-1].url.path == "/oauth/callback"
        check_error(answers[-1])
        assert await live.rows() == 0
        assert live.server.token_requests["authorization_code"] == 1
        await connect(live, "g1")
        r = await credentials(live, "g1")
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_server_killed_connections_neither_lose_a_refresh_token_nor_need_a_restart(
    live_factory: Callable[..., Any],
) -> None:
    """Real PostgreSQL disconnections (``pg_terminate_backend``): the connection about to
    store a refreshed token is killed twice, and every pooled connection is killed while
    idle. The refresh is stored anyway; the next requests get new connections (pre-ping)."""
    async with live_factory() as live:
        await connect(live, "g1")
        with injected_faults(live.broker) as faults:
            faults.kill_next(STORE_REFRESHED, 2)
            r = await credentials(live, "g1", force=True)
            assert len(faults.killed) == 2
        assert r.status_code == 200, r.text
        # Kill every idle connection the broker holds in its pool.
        assert live.broker.database.engine.pool.checkedin() >= 1
        database = live.broker.database.engine.url.database
        admin = await asyncpg.connect(
            live.broker.database.engine.url.set(drivername="postgresql", database="postgres")
            .render_as_string(hide_password=False)
        )
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        finally:
            await admin.close()
        assert killed >= 1
        for _ in range(3):
            r = await credentials(live, "g1", force=True)
            assert r.status_code == 200, r.text
        assert live.server.token_requests["refresh_token"] == 4
        assert live.server.invalid_grant_count == 0
        assert live.server.reuse_detections == 0


async def test_a_failing_connect_session_lookup_is_a_503_at_every_route_that_takes_one(
    live_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The session lookup runs in the auth middleware, outside the app's exception
    handlers: it too answers 503 ``service_unavailable`` (not a 500 with a traceback), for
    the ticket route, the connect page's own session and its list alike."""
    async with live_factory() as live:
        session = await live.session_token("g1")
        with injected_faults(live.broker) as faults:
            faults.fail_next(r"FROM connect_sessions", 3)
            async with live.browser() as browser:
                answers = [
                    await live.authorize(browser, session=session),
                    await browser.get(
                        f"{live.url}/connect-sessions/current",
                        headers={"Authorization": f"Bearer {session}"},
                    ),
                    await browser.get(
                        f"{live.url}/groups/g1/integrations",
                        headers={"Authorization": f"Bearer {session}"},
                    ),
                ]
            assert faults.injected == 3
        for answer in answers:
            check_error(answer)
        assert not [r for r in caplog.records if r.exc_info]
        # The store is back: the same session works.
        async with live.browser() as browser:
            assert (await live.authorize(browser, session=session)).status_code == 200
