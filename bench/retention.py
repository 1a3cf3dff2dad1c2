"""6. Retention: the sweep's due-query and the credential cache's change feed with a year of
events stored, against the same queries with few events; and the events table under a
simulated steady state with pruning on.

Two stores per database, each with the same connections as benchmark 4 (10,000, 100 due;
quick: 1,000): the *few* store holds 2,000 events from the last 10 days, the *year* store
a year of one-day tokens for 10,000 connections (3,650,000 events; quick: 200 connections,
73,000 events), 1 % of them of kinds other than ``refreshed``, ids rising with time as in
a real store; a tenth of them have a webhook delivery (done, or pending for 1 % of the
last day's). The rows go in with stdlib ``sqlite3`` ``executemany`` (PostgreSQL: ``COPY``).

1. Timing, in one fresh subprocess (``python -m bench.retention time``) with both stores
   open, alternating few and year store, first repetition discarded: ``claim_due`` (limit
   40, rolled back, as in benchmark 4); the change feed's poll (``CredentialCache._poll``
   reading the 50 newest events, as a watcher does every 0.25 s) and its start
   (``max(id)``). Figure: median time with a year / median time with few. And one pruning
   batch of 1,000 ``refreshed`` events (``retention.prune_batch``, rolled back so each
   repetition deletes the same rows) against its floor in the same store: the same rows
   deleted by primary key. Each statement is ``EXPLAIN``-ed on the year store: the feed must
   read the primary key, the batch ``ix_events_kind_created_at``.
2. Steady state, one fresh subprocess per database (``python -m bench.retention steady``):
   a store with no events, then one sweep per simulated hour for 33 days: each adds an
   hour of events for 500 connections with one-hour tokens (500 ``refreshed`` + 5 others,
   through ``events.record_many`` as refreshes write them) and runs ``retention.prune``
   with the default settings (30 days, ``refreshed`` 3 days, at most 20 batches of 1,000).
   Figure: rows at the end / the rows retention should leave (3 days of ``refreshed`` and
   30 days of the rest), beside the rows without pruning. Quick: 50 connections, one sweep
   per 12 simulated hours.

3. What a year leaves against an empty events table (issue 17), in one fresh subprocess
   per database (``python -m bench.retention empty``), both stores open, alternating. Two
   stores of 10,000 connections, 1,000 of them due (quick: 1,000 and 100; the rest due days
   later, as in benchmark 4; the endpoint hands out one-hour tokens). The *retained*
   store holds what retention at its defaults (``refreshed`` 3 days, the rest 30) leaves
   of a year of one-hour refreshes of every connection, 1 % of the events of other kinds:
   702,900 ``refreshed`` and 71,900 others, 774,800 events (quick: a tenth), with the ids
   the year gave them (up to 87.6 million) and a webhook delivery for a tenth (done; 1 %
   of the last day's pending, next attempt after the run). Each window starts an hour
   short of its cutoff, so that nothing falls out of it during the run but what the
   benchmark ages on purpose. The *empty* store has no events.

   - Queries, 200 times per store (quick: 20), first discarded, medians: ``claim_due`` (as
     in 1), the feed's start (``max(id)``) and its poll with nothing new (``_poll`` from
     the newest id: what a watcher does every 0.25 s when nothing changed); then the poll
     of the 50 newest events, written through ``events.record_many`` into each store after
     those queries (the empty store then holds only them), from just below them.
   - The sweep: 12 rounds (quick: 3) after a discarded warm-up, alternating which store
     goes first; in each, ``sweep(broker)`` for real against ``bench.tokenserver``
     answering at once (benchmark 3's endpoint, on the other core; the sweeping process on
     this one). Between rounds, untimed: the due connections are made due again, the empty
     store's events deleted (PostgreSQL: ``TRUNCATE``), and in the retained store the
     oldest ``refreshed`` events (as many as are due) and 1 % as many others aged past
     their cutoff, so that each of its sweeps also prunes about as many events as it
     writes: the steady state, in which the table keeps its size. Counted in every round:
     refreshes, token requests, rows at the new version, events pruned.

   Figure: median time in the retained store / median time in the empty store (for the
   sweep: time per refresh, i.e. the empty store's refreshes/s over the retained store's).

Targets: year / few <= 2 for the due-query and the feed; a prune batch <= 1.5 x its floor
in the year store; rows at the end within 5 % of the bound; retained / empty <= 1.2 for
the due-query, the feed and the sweep.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .common import (
    OAUTH,
    Options,
    TokenServer,
    group_of,
    load,
    median,
    run_child_json,
    save,
    scratch_postgres_sync,
    sqlite_url,
    table,
    two_cores,
    verdict,
    write_config,
)
from .scale import Probe, build, fill, fill_postgres, migrate_and_seal, stamp

NAME = "retention"
TARGET_RATIO = 2.0
TARGET_BOUND = 1.05
TARGET_FLOOR = 1.5
FLAT = ("claim_due", "feed_poll", "feed_start")  # must not depend on how many events exist
FEW = (200, 10)  # connections, days of one-day tokens: 2,000 events
OTHER_KINDS = ("connected", "refresh_failed", "recovered", "reauth_required", "disconnected")
FEED_NEW = 50  # events a feed poll finds new
TARGET_EMPTY = 1.2  # retained / empty
YEAR_HOURS = 365 * 24
MARGIN_HOURS = 1  # each retained window starts this much short of its cutoff


def event_rows(connections: int, days: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    """One ``refreshed`` event a day per connection for ``days`` days up to ``now``, in time
    order; every 100th of another kind."""
    start = now - timedelta(days=days)
    step = 86_400 / connections
    n = 0
    for day in range(days):
        for i in range(connections):
            at = start + timedelta(days=day, seconds=i * step)
            kind = "refreshed" if n % 100 else OTHER_KINDS[(n // 100) % len(OTHER_KINDS)]
            detail = json.dumps({"expires_at": (at + timedelta(days=1)).isoformat()})
            yield group_of(i), OAUTH, kind, detail, at
            n += 1


# A webhook was configured for a tenth of the events: their deliveries are done, but for
# one in a hundred of those of the last day, still pending.
DELIVERIES = (
    "INSERT INTO webhook_deliveries (event_id, url, attempts, next_attempt_at, status) "
    "SELECT id, 'https://hooks.example.com/broker', 1, "
    "CASE WHEN created_at > {day_ago} AND id % 1000 = 0 THEN {next_attempt} END, "
    "CASE WHEN created_at > {day_ago} AND id % 1000 = 0 THEN 'pending' ELSE 'delivered' END "
    "FROM events WHERE id % 10 = 0"
)


EVENT_COLUMNS = ["group_id", "integration", "kind", "detail", "created_at"]


def events_into_sqlite(path: Path, columns: list[str], rows: Iterator[tuple[Any, ...]],
                       now: datetime, later: datetime | None) -> tuple[int, float]:
    """``rows`` (``columns``, the last one ``created_at``) into ``path``'s events, then the
    webhook deliveries (``DELIVERIES``; pending ones due at ``later``, else at their event's
    time). Returns the events' count and the seconds it took."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    started = time.perf_counter()
    with con:
        con.executemany(
            f"INSERT INTO events ({', '.join(columns)}) "  # noqa: S608 (our column names)
            f"VALUES ({', '.join('?' for _ in columns)})",
            ((*row[:-1], stamp(row[-1])) for row in rows),
        )
        con.execute(
            DELIVERIES.format(day_ago=":day_ago",
                              next_attempt=":later" if later else "created_at"),
            {"day_ago": stamp(now - timedelta(days=1)),
             "later": stamp(later) if later else None},
        )
    con.execute("ANALYZE")
    count = int(con.execute("SELECT count(*) FROM events").fetchone()[0])
    con.close()
    return count, time.perf_counter() - started


async def events_into_postgres(url: str, columns: list[str], rows: Iterator[tuple[Any, ...]],
                              now: datetime, later: datetime | None) -> tuple[int, float]:
    """``events_into_sqlite`` on PostgreSQL (``COPY``). Rows that carry their ``id`` move the
    sequence on after them, as after a year of inserts."""
    import asyncpg
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    try:
        await conn.copy_records_to_table("events", records=rows, columns=columns)
        if "id" in columns:
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence('events', 'id'), "
                "(SELECT max(id) FROM events))"
            )
        if later is None:
            await conn.execute(DELIVERIES.format(day_ago="$1", next_attempt="created_at"),
                               now - timedelta(days=1))
        else:
            await conn.execute(
                DELIVERIES.format(day_ago="$1", next_attempt="$2::timestamptz"),
                now - timedelta(days=1), later,
            )
        await conn.execute("ANALYZE")
        count = int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()
    return count, time.perf_counter() - started


def build_store(opts: Options, server: TokenServer, directory: Path, url: str, size: int,
                db_file: Path | None, events: tuple[int, int]) -> dict[str, Any]:
    """Benchmark 4's store of ``size`` connections, plus ``events`` (connections, days)."""
    entry = build(opts, server, directory, url, size, db_file)
    now = datetime.now(UTC)
    rows = event_rows(*events, now)
    if db_file is not None:
        count, seconds = events_into_sqlite(db_file, EVENT_COLUMNS, rows, now, None)
        entry["store_mb"] = db_file.stat().st_size / 2**20
    else:
        count, seconds = asyncio.run(events_into_postgres(url, EVENT_COLUMNS, rows, now, None))
    entry.update(events=count, events_fill_seconds=seconds)
    return entry


# --- 3. what a year leaves against an empty events table ---------------------------------


def retained_ids(connections: int, *, keep_refreshed_hours: int,
                 keep_hours: int) -> Iterator[int]:
    """The ids retention leaves of a year of one-hour refreshes of ``connections``: the
    year's event ``n`` (``connections`` an hour, in time order, every 100th of another kind)
    has id ``n + 1``; kept are the ``refreshed`` of the last ``keep_refreshed_hours`` and
    the others of the last ``keep_hours``. In id order."""
    total = YEAR_HOURS * connections
    first_other = (YEAR_HOURS - keep_hours) * connections
    first_refreshed = (YEAR_HOURS - keep_refreshed_hours) * connections
    first_other += -first_other % 100  # the next multiple of 100
    yield from (n + 1 for n in range(first_other, first_refreshed, 100))
    yield from range(first_refreshed + 1, total + 1)


def retained_rows(connections: int, now: datetime, *, keep_refreshed_days: int,
                  keep_days: int) -> Iterator[tuple[Any, ...]]:
    """``(id, group, integration, kind, detail, created_at)`` of ``retained_ids`` for a
    year up to ``now``: each window an hour short of its cutoff (``MARGIN_HOURS``), so
    that nothing falls out of it during the run unless the benchmark ages it."""
    start = now - timedelta(hours=YEAR_HOURS)
    step = 3600 / connections
    for event_id in retained_ids(
        connections, keep_refreshed_hours=keep_refreshed_days * 24 - MARGIN_HOURS,
        keep_hours=keep_days * 24 - MARGIN_HOURS,
    ):
        n = event_id - 1
        hour, i = divmod(n, connections)
        at = start + timedelta(hours=hour, seconds=i * step)
        kind = "refreshed" if n % 100 else OTHER_KINDS[(n // 100) % len(OTHER_KINDS)]
        detail = json.dumps({"expires_at": (at + timedelta(hours=1)).isoformat()})
        yield event_id, group_of(i), OAUTH, kind, detail, at


def due_groups(size: int, due: int) -> list[str]:
    """The ``due`` connections of ``size``, spread evenly (as benchmark 4 spreads its 100)."""
    step = size // due
    return [group_of(i * step + step // 2) for i in range(due)]


def build_sweep_store(opts: Options, server: TokenServer, directory: Path, url: str,
                      db_file: Path | None, size: int, due: int,
                      events: int) -> dict[str, Any]:
    """``size`` connections with one-hour tokens, ``due`` of them due (a real sealed token
    each), and, ``events`` > 0, what retention leaves of a year of them for ``events``
    connections (with the default retention settings)."""
    from broker.config import EventsSettings

    directory.mkdir(parents=True)
    config = write_config(directory, database_url=url, token_url=server.url(0))
    groups = due_groups(size, due)
    key_id, tokens = asyncio.run(migrate_and_seal(config, groups))
    if db_file is not None:
        fill(db_file, size, set(groups), key_id, tokens, opts.seed)
    else:
        asyncio.run(fill_postgres(url, size, set(groups), key_id, tokens, opts.seed))
    entry: dict[str, Any] = {"size": size, "due": due, "config": str(config), "events": 0}
    if events:
        defaults = EventsSettings()
        keep = (defaults.refreshed_retention_days, defaults.retention_days)
        now = datetime.now(UTC)
        rows = retained_rows(events, now, keep_refreshed_days=keep[0], keep_days=keep[1])
        columns, later = ["id", *EVENT_COLUMNS], now + timedelta(days=1)
        if db_file is not None:
            count, seconds = events_into_sqlite(db_file, columns, rows, now, later)
        else:
            count, seconds = asyncio.run(events_into_postgres(url, columns, rows, now, later))
        entry.update(events=count, events_fill_seconds=seconds, retention_days=keep)
    if db_file is not None:
        entry["store_mb"] = db_file.stat().st_size / 2**20
    return entry


def run(opts: Options) -> dict[str, Any]:
    size = opts.pick(1_000, 10_000)
    year = (opts.pick(200, 10_000), 365)
    repeat = opts.pick(10, 60)
    due, rounds, queries = opts.pick(100, 1_000), opts.pick(3, 12), opts.pick(20, 200)
    # Part 3's sweeps: the sweeping process on one core, the token endpoint on the other
    # (benchmark 3's layout).
    cores = two_cores()
    broker_cpu, server_cpu = cores if cores else (None, None)
    stores: dict[str, Any] = {}
    with TokenServer(cpu=server_cpu) as server, tempfile.TemporaryDirectory(
        prefix="broker-bench-"
    ) as tmp, ExitStack() as stack:
        root = Path(tmp)
        names = ("few", "year", "steady", "retained", "empty")
        urls: dict[str, list[tuple[str, Path | None]]] = {"sqlite": []}
        for name in names:
            db = root / f"sqlite-{name}" / "broker.db"
            urls["sqlite"].append((sqlite_url(db), db))
        if opts.pg_url:
            urls["postgresql"] = [
                (stack.enter_context(scratch_postgres_sync(opts.pg_url)), None) for _ in names
            ]
        for store, ((few_url, few_db), (year_url, year_db), (steady_url, _),
                    (retained_url, retained_db), (empty_url, empty_db)) in urls.items():
            few = build_store(opts, server, root / f"{store}-few", few_url, size, few_db, FEW)
            big = build_store(opts, server, root / f"{store}-year", year_url, size, year_db, year)
            timing = run_child_json(
                "bench.retention", "time", few["config"], big["config"], str(repeat)
            )
            directory = root / f"{store}-steady"
            directory.mkdir()
            config = write_config(directory, database_url=steady_url)
            steady = run_child_json(
                "bench.retention", "steady", str(config), str(opts.pick(50, 500)),
                str(opts.pick(12, 1)), str(33),
            )
            retained = build_sweep_store(opts, server, root / f"{store}-retained", retained_url,
                                         retained_db, size, due, events=size)
            empty = build_sweep_store(opts, server, root / f"{store}-empty", empty_url,
                                      empty_db, size, due, events=0)
            against = run_child_json(
                "bench.retention", "empty", retained["config"], empty["config"], str(size),
                str(due), str(queries), str(rounds), server.base, cpu=broker_cpu, timeout=1800,
            )
            stores[store] = {"few": few, "year": big, "timing": timing, "steady": steady,
                             "retained": retained, "empty": empty, "against_empty": against}
    data = summarize(stores, size, repeat)
    data["layout"] = {"sweeping_cpu": broker_cpu, "token_server_cpu": server_cpu}
    save(opts, NAME, data)
    return data


QUERIES = (
    ("claim_due", "due-query (claim_due)"),
    ("feed_poll", "change feed poll (50 new)"),
    ("feed_start", "change feed start (max id)"),
    ("prune_batch", "one prune batch (1,000)"),
    ("delete_by_id", "floor: the same 1,000 deleted by id"),
)


def summarize(stores: dict[str, Any], size: int, repeat: int) -> dict[str, Any]:
    rows: list[list[Any]] = []
    steady_rows: list[list[Any]] = []
    empty_rows: list[list[Any]] = []
    notes: list[str] = []
    empty_notes: list[str] = []
    summary: dict[str, Any] = {}
    for store, v in stores.items():
        timing, steady = v["timing"], v["steady"]
        ratios = {key: timing["ratios"][key] for key, _ in QUERIES}
        floor = {k: timing[k]["prune_batch"] / timing[k]["delete_by_id"] for k in ("few", "year")}
        for key, label in QUERIES:
            flat = key in FLAT
            rows.append([
                store, label, f"{timing['few'][key] * 1000:.3f}",
                f"{timing['year'][key] * 1000:.3f}", f"{ratios[key]:.2f}x",
                verdict(ratios[key], TARGET_RATIO, at_least=False) if flat else "",
                f"{floor['few']:.2f}x / {floor['year']:.2f}x "
                f"({verdict(floor['year'], TARGET_FLOOR, at_least=False)})"
                if key == "prune_batch" else "",
            ])
        bound_ratio = steady["final_rows"] / steady["bound"]
        summary[store] = {
            "ratios": ratios, "prune_over_floor": floor,
            "prune_near_floor": floor["year"] <= TARGET_FLOOR,
            "events": [v["few"]["events"], v["year"]["events"]],
            "plans_ok": timing["plans_ok"], "claimed": timing["claimed"],
            "steady": {k: steady[k] for k in ("final_rows", "bound", "unpruned", "inserted",
                                               "pruned", "max_batches", "budget",
                                               "budget_hit")},
            "bounded": bound_ratio <= TARGET_BOUND,
        }
        against = v["against_empty"]
        summary[store]["against_empty"] = against_summary(v)
        empty_rows += against_rows(store, against)
        empty_notes.append(against_note(store, v))
        for day, count, inserted in steady["rows_by_day"]:
            steady_rows.append([store, day, f"{count:,}", f"{inserted:,}"])
        notes += [
            f"{store}: {v['year']['events']:,} events (year) vs {v['few']['events']:,} (few); "
            f"{size:,} connections, {timing['claimed']} claimed per claim_due in both. "
            "Plans on the year store: "
            + " / ".join(f"{k}: {p}" for k, p in timing["plans"].items()),
            f"{store}: steady state after {steady['days']} simulated days: **"
            f"{steady['final_rows']:,} rows** for a bound of {steady['bound']:,} "
            f"({bound_ratio:.3f}x, {verdict(bound_ratio, TARGET_BOUND, at_least=False)}, "
            f"target <= {TARGET_BOUND}); {steady['unpruned']:,} without pruning "
            f"({steady['final_rows'] / steady['unpruned']:.3f}x of it). Batches per sweep at "
            f"most {steady['max_batches']} of {steady['budget']}; sweeps that used the whole "
            f"budget: {steady['budget_hit']}.",
        ]
    notes.append(
        f"Timing: {repeat} repetitions per store alternating few/year in one fresh process, "
        "first discarded; median year / median few. claim_due, the prune batch and its floor "
        "run in a transaction rolled back each time. A prune batch is bounded work (1,000 "
        "rows found by an index range), not flat time: deleting a row from a larger table "
        "touches more B-tree pages, so its yardstick is the floor measured in the same "
        "store, the same rows deleted by primary key with no search: prune / floor near 1 "
        "means finding the rows costs next to nothing at either size."
    )
    data: dict[str, Any] = {
        "connections": size, "repeat": repeat, "stores": stores, "summary": summary,
        "targets": {"ratio": TARGET_RATIO, "bound": TARGET_BOUND, "floor": TARGET_FLOOR,
                    "against_empty": TARGET_EMPTY},
    }
    data["table"] = "\n\n".join([
        table(
            "6. Retention: the hot queries with a year of events vs few",
            ["store", "query", "few ms (scale only)", "year ms (scale only)", "year / few",
             f"target <= {TARGET_RATIO}", f"/ floor, few / year (target <= {TARGET_FLOOR})"],
            rows, notes=notes,
        ),
        table(
            "6b. Events table under a simulated steady state (rows at the end of each day)",
            ["store", "day", "rows with pruning", "rows inserted so far"], steady_rows,
        ),
        table(
            "6c. What retention leaves of a year against an empty events table",
            ["store", "figure", "empty (scale only)", "retained (scale only)",
             "retained / empty", f"target <= {TARGET_EMPTY}"],
            empty_rows, notes=[*empty_notes, AGAINST_METHOD],
        ),
    ])
    return data


AGAINST_METHOD = (
    "Queries: medians of alternating repetitions in one fresh process, first discarded; "
    "claim_due rolled back each time; the 50-new poll reads the 50 newest events, written "
    "through events.record_many into each store (the empty one then holds only those). "
    "Sweep: sweep(broker) for real against bench.tokenserver answering at once (other "
    "core), alternating rounds after a discarded warm-up; time per refresh = round time / "
    "refreshes, so the sweep's ratio is the empty store's refreshes/s over the retained "
    "store's. Between rounds (untimed) the due rows are made due again, the empty store's "
    "events deleted (PostgreSQL: TRUNCATE), and the retained store's oldest events aged "
    "past their cutoff (as many refreshed as are due, 1 % as many others): its sweeps also "
    "prune, and its table keeps its size."
)


def against_summary(v: dict[str, Any]) -> dict[str, Any]:
    """Part 3's figures and counts of one database."""
    against = v["against_empty"]
    return {
        "ratios": against["ratios"],
        "met": {key: against["ratios"][key] <= TARGET_EMPTY for key, _ in AGAINST_EMPTY},
        "sweep_paired": against["sweep_paired"],
        "events": [v["retained"]["events"], v["empty"]["events"]],
        "events_before": against["events_before"],
        "due": v["retained"]["due"],
        "claimed": against["claimed"],
        "rounds": {
            side: {key: [r[key] for r in runs] for key in (
                "claimed", "refreshed", "failed", "token_requests", "rows_refreshed", "aged",
                "pruned", "events_after", "per_s",
            )}
            for side, runs in against["rounds"].items()
        },
    }


def against_rows(store: str, against: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for key, label in AGAINST_EMPTY:
        ratio = against["ratios"][key]
        if key == "sweep":
            rates = {side: median([r["per_s"] for r in against["rounds"][side]])
                     for side in ("empty", "retained")}
            cells = [f"{rates['empty']:,.0f} refreshes/s", f"{rates['retained']:,.0f} refreshes/s"]
            paired = against["sweep_paired"]
            shown = f"{ratio:.2f}x (rounds {paired['min']:.2f}x to {paired['max']:.2f}x)"
        else:
            cells = [f"{against['empty'][key] * 1000:.3f} ms",
                     f"{against['retained'][key] * 1000:.3f} ms"]
            shown = f"{ratio:.2f}x"
        rows.append([store, label, *cells, shown,
                     verdict(ratio, TARGET_EMPTY, at_least=False)])
    return rows


def against_note(store: str, v: dict[str, Any]) -> str:
    against, retained = v["against_empty"], v["retained"]
    rounds = against["rounds"]

    def counts(side: str) -> str:
        seen = {(r["refreshed"], r["token_requests"], r["rows_refreshed"]) for r in rounds[side]}
        return ", ".join("/".join(str(n) for n in c) for c in sorted(seen))

    size = f" ({retained['store_mb']:.0f} MB file)" if "store_mb" in retained else ""
    kept = rounds["retained"]
    return (
        f"{store}: retained store {retained['events']:,} events{size}, empty store 0; "
        f"{retained['size']:,} connections and {retained['due']:,} due per round in each, "
        f"{len(kept)} rounds. Refreshed / token requests / rows at the new version, every "
        f"round: retained {counts('retained')}, empty {counts('empty')}. Pruned per retained "
        f"sweep: {', '.join(str(n) for n in sorted({r['pruned'] for r in kept}))} (aged "
        f"{', '.join(str(n) for n in sorted({r['aged'] for r in kept}))}); its events after "
        f"each sweep {min(r['events_after'] for r in kept):,} to "
        f"{max(r['events_after'] for r in kept):,}. claim_due plan (retained): "
        f"{against['claim_plan']}."
    )


# --- the child processes ----------------------------------------------------------------------


class Store:
    """One open broker: its hot queries, timed, and their plans."""

    def __init__(self, broker: Any) -> None:
        from sqlalchemy import event

        self.broker = broker
        self.probe = Probe(broker)
        self.times: dict[str, list[float]] = {key: [] for key, _ in QUERIES}
        self.statements: dict[str, tuple[str, Any]] = {}
        event.listen(broker.database.engine.sync_engine, "before_cursor_execute", self._capture)

    def _capture(self, conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.startswith("DELETE FROM events") and "events.kind" in statement:
            self.statements["prune_batch"] = (statement, params)
        elif "FROM events" in statement and "events.id >" in statement:
            self.statements["feed_poll"] = (statement, params)

    async def run_once(self) -> None:
        from sqlalchemy import delete, func, select

        from broker.retention import candidates, newest_event, prune_batch, rules
        from broker.store.models import Event, events_table, webhook_deliveries_table

        broker = self.broker
        await self.probe.claim()
        self.times["claim_due"].append(self.probe.claim_times[-1])

        cache = broker.tokens.cache
        started = time.perf_counter()
        async with broker.session() as db:
            top = int(await db.scalar(select(func.max(Event.id))) or 0)
        self.times["feed_start"].append(time.perf_counter() - started)
        # The watcher's own poll, from where a watcher that had read all but the newest
        # FEED_NEW events would start (private state: the benchmark drives the real code).
        from broker.events import Cursor

        cache._cursor = Cursor(top - FEED_NEW, rescan=not broker.database.is_sqlite)
        started = time.perf_counter()
        await cache._poll(time.monotonic())
        self.times["feed_poll"].append(time.perf_counter() - started)
        assert cache._cursor.since == top, "the poll did not read the newest events"

        rule = next(r for r in rules(broker.now(), broker.settings.events)
                    if r.kind == "refreshed")
        postgresql = not broker.database.is_sqlite
        async with broker.session() as db:
            tx = await db.begin()
            newest = await newest_event(db)
            ids = list(await db.scalars(candidates(rule, 1000, newest=newest, skip_locked=False)))
            started = time.perf_counter()
            deleted, _ = await prune_batch(db, rule, 1000, newest=newest, postgresql=postgresql)
            self.times["prune_batch"].append(time.perf_counter() - started)
            await tx.rollback()
        assert deleted == len(ids) == 1000, deleted
        # The floor: deleting those rows (and their deliveries) by primary key, no search.
        async with broker.session() as db:
            tx = await db.begin()
            started = time.perf_counter()
            await db.execute(delete(events_table).where(events_table.c.id.in_(ids)))
            await db.execute(delete(webhook_deliveries_table).where(
                webhook_deliveries_table.c.event_id.in_(ids)
            ))
            self.times["delete_by_id"].append(time.perf_counter() - started)
            await tx.rollback()

    async def plans(self) -> dict[str, str]:
        """EXPLAIN of the feed poll and the prune batch (and the claim's, from benchmark 4)."""
        out = {"claim_due": " / ".join(
            p for p in await self.probe.plan_and_select(2) if re.search(r"SCAN|SEARCH|Scan", p)
        )}
        for key in ("feed_poll", "prune_batch"):
            statement, params = self.statements[key]
            async with self.broker.database.engine.connect() as conn:
                if self.broker.database.is_sqlite:
                    found = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                    lines = [str(r[-1]) for r in found]
                else:
                    raw = (await conn.get_raw_connection()).driver_connection
                    assert raw is not None
                    async with raw.transaction():  # EXPLAIN only: nothing runs, nothing kept
                        lines = [r[0].strip() for r in await raw.fetch(
                            "EXPLAIN " + statement, *params
                        )]
            out[key] = " / ".join(p for p in lines if re.search(r"SCAN|SEARCH|Scan", p))
        return {k: re.sub(r"\s*\(cost=[^)]*\)|->\s*", "", v) for k, v in out.items()}


def plans_ok(plans: dict[str, str]) -> bool:
    feed = plans["feed_poll"]
    return (
        "ix_connections_next_refresh_at" in plans["claim_due"]
        and ("INTEGER PRIMARY KEY" in feed or "pk_events" in feed)
        and "ix_events_kind_created_at" in plans["prune_batch"]
        and "Seq Scan on events" not in plans["prune_batch"] + feed
    )


async def time_child(few_config: Path, year_config: Path, repeat: int) -> dict[str, Any]:
    from broker.runtime import Broker

    few = Store(await Broker.open(load(few_config)))
    year = Store(await Broker.open(load(year_config)))
    try:
        for i in range(repeat):
            for store in (few, year) if i % 2 == 0 else (year, few):
                await store.run_once()
        plans = await year.plans()
        claimed = {few.probe.claimed, year.probe.claimed}
    finally:
        await few.broker.close()
        await year.broker.close()
    medians = {
        name: {key: median(store.times[key][1:]) for key, _ in QUERIES}
        for name, store in (("few", few), ("year", year))
    }
    return {
        **medians,
        "ratios": {key: medians["year"][key] / medians["few"][key] for key, _ in QUERIES},
        "plans": plans,
        "plans_ok": plans_ok(plans),
        "claimed": claimed.pop() if len(claimed) == 1 else sorted(claimed),
    }


async def steady_child(config: Path, connections: int, hours_per_sweep: int,
                       days: int) -> dict[str, Any]:
    """A store with no events, then one sweep per ``hours_per_sweep`` simulated hours for
    ``days`` days: each adds that many hours of events of ``connections`` one-hour tokens
    and prunes with the default settings."""
    from sqlalchemy import func, select

    from broker.events import Recorded, record_many
    from broker.retention import prune
    from broker.runtime import Broker
    from broker.store.models import Event

    broker = await Broker.open(load(config))
    settings = broker.settings.events
    start = broker.now()
    clock = {"now": start}
    broker.clock = lambda: clock["now"]
    step = timedelta(hours=hours_per_sweep)
    per_sweep = connections * hours_per_sweep
    others_per_sweep = max(1, per_sweep // 100)
    inserted = pruned_total = max_batches = budget_hit = 0
    rows_by_day: list[tuple[int, int, int]] = []
    n = 0
    try:
        for sweep_no in range(days * 24 // hours_per_sweep):
            now = start + step * (sweep_no + 1)
            clock["now"] = now
            events = []
            for i in range(per_sweep + others_per_sweep):
                at = now - step + step * (i / (per_sweep + others_per_sweep))
                kind = "refreshed" if i < per_sweep else OTHER_KINDS[n % len(OTHER_KINDS)]
                n += kind != "refreshed"
                events.append(Recorded(group_of(i % connections), OAUTH, kind, at,
                                       {"expires_at": (at + timedelta(hours=1)).isoformat()}))
            async with broker.session() as db, db.begin():
                await record_many(db, events)
            inserted += len(events)
            pruned = await prune(broker)
            pruned_total += pruned.events
            max_batches = max(max_batches, pruned.batches)
            budget_hit += not pruned.complete
            if (now - start) % timedelta(days=1) == timedelta(0):
                day = (now - start) // timedelta(days=1)
                async with broker.session() as db:
                    count = int(await db.scalar(select(func.count()).select_from(Event)) or 0)
                rows_by_day.append((day, count, inserted))
        async with broker.session() as db:
            final = int(await db.scalar(select(func.count()).select_from(Event)) or 0)
    finally:
        await broker.close()
    per_day_refreshed = connections * 24
    per_day_others = others_per_sweep * 24 // hours_per_sweep
    bound = (
        per_day_refreshed * settings.refreshed_retention_days
        + per_day_others * min(days, settings.retention_days)
    )
    return {
        "days": days, "connections": connections, "hours_per_sweep": hours_per_sweep,
        "final_rows": final, "bound": bound, "unpruned": inserted, "inserted": inserted,
        "pruned": pruned_total, "max_batches": max_batches,
        "budget": settings.prune_batches_per_sweep, "budget_hit": budget_hit,
        "rows_by_day": [r for r in rows_by_day if r[0] in (1, 2, 3, 4, 7, 14, 21, 30, 31, days)],
    }


# The figures of part 3: (key, label); the sweep's is time per refresh.
AGAINST_EMPTY = (
    ("claim_due", "due-query (claim_due)"),
    ("feed_start", "change feed start (max id)"),
    ("feed_idle", "change feed poll (nothing new)"),
    ("feed_poll", "change feed poll (50 new)"),
    ("sweep", "sweep, time per refresh"),
)


class Side:
    """One store of part 3: its queries and sweeps, timed and counted."""

    def __init__(self, name: str, broker: Any, groups: list[str], token_count: str) -> None:
        self.name = name
        self.broker = broker
        self.groups = groups
        self.token_count = token_count
        self.probe = Probe(broker)
        self.times: dict[str, list[float]] = {key: [] for key, _ in AGAINST_EMPTY}
        self.rounds: list[dict[str, Any]] = []

    async def events(self) -> int:
        from sqlalchemy import func, select

        from broker.store.models import events_table

        async with self.broker.session() as db:
            return int(await db.scalar(select(func.count()).select_from(events_table)) or 0)

    async def queries(self) -> None:
        """``claim_due``, the feed's start and its poll with nothing new."""
        from sqlalchemy import func, select

        from broker.events import Cursor
        from broker.store.models import Event

        broker = self.broker
        await self.probe.claim()
        self.times["claim_due"].append(self.probe.claim_times[-1])
        started = time.perf_counter()
        async with broker.session() as db:
            top = int(await db.scalar(select(func.max(Event.id))) or 0)
        self.times["feed_start"].append(time.perf_counter() - started)
        cache = broker.tokens.cache
        cache._cursor = Cursor(top, rescan=not broker.database.is_sqlite)
        started = time.perf_counter()
        await cache._poll(time.monotonic())
        self.times["feed_idle"].append(time.perf_counter() - started)
        assert cache._cursor.since == top

    async def clear(self) -> None:
        """Delete every event (and delivery): the empty store, empty again."""
        from sqlalchemy import delete, text

        from broker.store.models import events_table, webhook_deliveries_table

        async with self.broker.session() as db, db.begin():
            if self.broker.database.is_sqlite:
                await db.execute(delete(webhook_deliveries_table))
                await db.execute(delete(events_table))
            else:
                await db.execute(text("TRUNCATE events, webhook_deliveries"))

    async def write_new(self) -> int:
        """``FEED_NEW`` events, as refreshes write them; the newest id before them."""
        from sqlalchemy import func, select

        from broker.events import Recorded, record_many
        from broker.store.models import Event

        now = self.broker.now()
        async with self.broker.session() as db, db.begin():
            top = int(await db.scalar(select(func.max(Event.id))) or 0)
            await record_many(db, [
                Recorded(group, OAUTH, "refreshed", now,
                         {"expires_at": (now + timedelta(hours=1)).isoformat()})
                for group in self.groups[:FEED_NEW]
            ])
        return top

    async def poll_new(self, below: int) -> None:
        """The watcher's poll from ``below``: the ``FEED_NEW`` events above it are new."""
        from broker.events import Cursor

        cache = self.broker.tokens.cache
        cache._cursor = Cursor(below, rescan=not self.broker.database.is_sqlite)
        started = time.perf_counter()
        await cache._poll(time.monotonic())
        self.times["feed_poll"].append(time.perf_counter() - started)
        assert cache._cursor.since >= below + FEED_NEW, "the poll missed the new events"

    async def reset(self, *, age: bool) -> int:
        """Untimed, before a round: the due rows due again; the empty store's events gone;
        ``age``: the oldest events past their cutoff (as many ``refreshed`` as are due,
        1 % as many others). Returns the events aged."""
        from sqlalchemy import select, update

        from broker.store.models import Connection, events_table

        broker = self.broker
        now = broker.now()
        settings = broker.settings.events
        aged = 0
        async with broker.session() as db, db.begin():
            await db.execute(
                update(Connection)
                .where(Connection.integration == OAUTH, Connection.group_id.in_(self.groups))
                .values(next_refresh_at=now - timedelta(seconds=5))
            )
            if age:
                e = events_table.c
                for refreshed, count, days in (
                    (True, len(self.groups), settings.refreshed_retention_days),
                    (False, max(1, len(self.groups) // 100), settings.retention_days),
                ):
                    kind = e.kind == "refreshed" if refreshed else e.kind != "refreshed"
                    ids = list(await db.scalars(
                        select(e.id).where(kind).order_by(e.created_at).limit(count)
                    ))
                    await db.execute(
                        update(events_table).where(e.id.in_(ids))
                        .values(created_at=now - timedelta(days=days, minutes=1))
                    )
                    aged += len(ids)
        if not age:
            await self.clear()
        return aged

    async def sweep(self, aged: int, *, keep: bool = True) -> None:
        import httpx
        from sqlalchemy import func, select

        from broker.scheduler import sweep
        from broker.store.models import Connection

        broker = self.broker
        due = (Connection.integration == OAUTH, Connection.group_id.in_(self.groups))
        async with broker.session() as db:
            version = int(await db.scalar(select(func.max(Connection.version)).where(*due)) or 0)
        async with httpx.AsyncClient(timeout=10) as client:
            before = int((await client.get(self.token_count)).json()["count"])
            started = time.perf_counter()
            result = await sweep(broker)
            seconds = time.perf_counter() - started
            requests = int((await client.get(self.token_count)).json()["count"]) - before
        async with broker.session() as db:
            at_version = int(await db.scalar(
                select(func.count()).select_from(Connection).where(
                    *due, Connection.version == version + 1,
                    Connection.next_refresh_at > broker.now(),
                    Connection.lease_owner.is_(None),
                )
            ) or 0)
        if keep:
            self.times["sweep"].append(seconds / max(1, result.refreshed))
            self.rounds.append({
                "claimed": result.claimed, "refreshed": result.refreshed,
                "failed": result.failed, "token_requests": requests,
                "rows_refreshed": at_version, "aged": aged,
                "pruned": result.pruned.events, "pruned_deliveries": result.pruned.deliveries,
                "prune_batches": result.pruned.batches, "seconds": seconds,
                "per_s": result.refreshed / seconds, "events_after": await self.events(),
            })

    def medians(self) -> dict[str, float]:
        return {key: median(self.times[key][1:] if key != "sweep" else self.times[key])
                for key, _ in AGAINST_EMPTY}


async def against_empty_child(retained_config: Path, empty_config: Path, size: int, due: int,
                              repeat: int, rounds: int, token_base: str) -> dict[str, Any]:
    from broker.runtime import Broker

    groups = due_groups(size, due)
    count = f"{token_base}/count"
    retained = Side("retained", await Broker.open(load(retained_config)), groups, count)
    empty = Side("empty", await Broker.open(load(empty_config)), groups, count)
    sides = (retained, empty)
    try:
        events_before = [await s.events() for s in sides]
        for i in range(repeat):
            for side in sides if i % 2 == 0 else sides[::-1]:
                await side.queries()
        below = {side.name: await side.write_new() for side in sides}
        for i in range(repeat):
            for side in sides if i % 2 == 0 else sides[::-1]:
                await side.poll_new(below[side.name])
        for i in range(rounds + 1):  # the first a warm-up, discarded
            for side in sides if i % 2 == 0 else sides[::-1]:
                aged = await side.reset(age=side is retained)
                await side.sweep(aged, keep=i > 0)
        plans = await retained.probe.plan_and_select(2)
    finally:
        for side in sides:
            await side.broker.close()
    medians = {side.name: side.medians() for side in sides}
    paired = [r["seconds"] / r["refreshed"] / (e["seconds"] / e["refreshed"])
              for r, e in zip(retained.rounds, empty.rounds, strict=True)]
    return {
        **medians,
        "ratios": {key: medians["retained"][key] / medians["empty"][key]
                   for key, _ in AGAINST_EMPTY},
        "sweep_paired": {"median": median(paired), "min": min(paired), "max": max(paired)},
        "rounds": {side.name: side.rounds for side in sides},
        "events_before": dict(zip(("retained", "empty"), events_before, strict=True)),
        "claimed": sorted({s.probe.claimed for s in sides}),
        "claim_plan": re.sub(r"\s*\(cost=[^)]*\)|->\s*", "", " / ".join(
            p.strip() for p in plans if re.search(r"SCAN|SEARCH|Scan", p)
        )),
    }


if __name__ == "__main__" and len(sys.argv) >= 3:
    import warnings

    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    if sys.argv[1] == "time":
        out = asyncio.run(time_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])))
    elif sys.argv[1] == "empty":
        size, due, repeat, rounds = (int(a) for a in sys.argv[4:8])
        out = asyncio.run(against_empty_child(
            Path(sys.argv[2]), Path(sys.argv[3]), size, due, repeat, rounds, sys.argv[8]
        ))
    else:
        out = asyncio.run(steady_child(
            Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        ))
    print("RESULT " + json.dumps(out), flush=True)
