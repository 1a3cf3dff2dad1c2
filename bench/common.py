"""Shared pieces of the benchmarks: options, machine description, settings, populating the
store, the loopback token endpoint, CPU pinning, tables and JSON results.

Every figure the benchmarks report is a ratio against a baseline measured in the same run
(the machine is shared and noisy); absolute times are printed only beside their ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PY = sys.executable
SERVICE_TOKEN = "bench-service-token-0123456789abcdef"
PG_ENV = "BROKER_TEST_DATABASE_URL"
APIKEY = "openweathermap"  # an API-key provider from the built-in catalog
OAUTH = "acme"  # an inline oauth2 provider pointing at bench.tokenserver
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-client-secret"


@dataclass
class Options:
    quick: bool
    out: Path = RESULTS
    pg_url: str | None = None
    seed: int = 7
    notes: list[str] = field(default_factory=list)

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


# --- machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import cryptography
    import sqlalchemy
    import starlette
    import uvicorn

    nproc = subprocess.run(
        ["nproc"], capture_output=True, text=True, check=False  # noqa: S607
    ).stdout.strip()
    info: dict[str, Any] = {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "uvicorn": uvicorn.__version__,
        "starlette": starlette.__version__,
        "cryptography": cryptography.__version__,
        "wrk": wrk_version(),
    }
    return info


def wrk_version() -> str | None:
    path = shutil.which("wrk")
    if path is None:
        return None
    out = subprocess.run(  # noqa: S603 (a fixed command)
        [path, "--version"], capture_output=True, text=True, check=False
    )
    return (out.stdout or out.stderr).splitlines()[0].split(" [")[0] if (
        out.stdout or out.stderr
    ) else "wrk"


# --- CPUs ------------------------------------------------------------------------------------


def cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def two_cores() -> tuple[int, int] | None:
    """(the system under test's core, the load generator's core), or None on one core."""
    mine = cpus()
    return (mine[0], mine[1]) if len(mine) >= 2 else None


def pin(pid: int, cpu: int | None) -> None:
    if cpu is None:
        return
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(pid, {cpu})


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run this process on one core for the duration."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- settings and stores ---------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def acme_provider(token_url: str, **extra: Any) -> dict[str, Any]:
    """An inline oauth2 provider (the shape of tests/oauth_support.py::acme)."""
    return {
        "display_name": "Acme",
        "auth_type": "oauth2",
        "authorization_url": "http://127.0.0.1:9/authorize",
        "token_url": token_url,
        "default_scopes": ["read"],
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        **extra,
    }


def write_config(
    directory: Path, *, database_url: str, token_url: str | None = None,
    key: str | None = None, **overrides: Any,
) -> Path:
    from broker.crypto import generate_key

    providers: dict[str, Any] = {APIKEY: {"verify": None}}
    if token_url is not None:
        providers[OAUTH] = acme_provider(token_url)
    data: dict[str, Any] = {
        "database_url": database_url,
        "encryption_keys": [key or generate_key()],
        "auth": {"service_tokens": [SERVICE_TOKEN]},
        "providers": providers,
        "log_level": "warning",
    }
    data.update(overrides)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load(path: Path) -> Any:
    from broker.config import load_settings

    return load_settings(path, env={})


def config_key(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    return str(data["encryption_keys"][0])


def _admin_dsn(base_url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(base_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(base_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_admin_dsn(base_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _scratch_name(base_url: str) -> tuple[str, str]:
    from sqlalchemy.engine import make_url

    name = f"broker_bench_{secrets.token_hex(4)}"
    return name, make_url(base_url).set(database=name).render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def scratch_postgres(base_url: str) -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this run, dropped at the end."""
    name, url = _scratch_name(base_url)
    await _admin(base_url, f'CREATE DATABASE "{name}"')
    try:
        yield url
    finally:
        await _admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def scratch_postgres_sync(base_url: str) -> Iterator[str]:
    """``scratch_postgres`` outside an event loop."""
    name, url = _scratch_name(base_url)
    asyncio.run(_admin(base_url, f'CREATE DATABASE "{name}"'))
    try:
        yield url
    finally:
        asyncio.run(_admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def api_key_of(i: int) -> str:
    return f"{i:032x}"


def group_of(i: int) -> str:
    return f"g{i}"


async def bulk_insert(broker: Any, rows: Sequence[dict[str, Any]], *, batch: int = 5000) -> None:
    """Insert connections fast: each credential sealed by the broker's keyring, the rows
    written with one executemany per batch (the rows ``Repository.put`` would write, without
    its per-row upsert and event)."""
    from sqlalchemy import insert

    from broker.store.models import Connection

    now = broker.now()
    keyring = broker.keyring
    for start in range(0, len(rows), batch):
        values = []
        for row in rows[start:start + batch]:
            sealed = keyring.seal(row["group_id"], row["integration"], row["data"])
            values.append({
                "group_id": row["group_id"],
                "integration": row["integration"],
                "auth_type": row["auth_type"],
                "status": "connected",
                "credential": sealed.token,
                "key_id": sealed.key_id,
                "version": 1,
                "hint": {},
                "created_at": now,
                "updated_at": now,
                "expires_at": row.get("expires_at"),
                "next_refresh_at": row.get("next_refresh_at"),
                "lease_owner": None,
                "lease_expires_at": None,
                "failure_count": 0,
                "last_error": None,
            })
        async with broker.session() as db, db.begin():
            await db.execute(insert(Connection), values)


async def add_api_keys(broker: Any, count: int) -> None:
    """``count`` API-key connections (groups g0..)."""
    await bulk_insert(broker, [
        {"group_id": group_of(i), "integration": APIKEY, "auth_type": "apikey",
         "data": {"api_key": api_key_of(i)}}
        for i in range(count)
    ])


def oauth_token(now: datetime, *, lifetime: int = 3600, expires_at: datetime | None = None,
                refresh_token: str | None = None) -> dict[str, Any]:
    """The stored shape of an OAuth2 token (``broker.oauth.tokens.stored_token``)."""
    from broker.oauth.tokens import stored_token

    token = stored_token(
        {
            "access_token": "at-" + secrets.token_hex(16),
            "refresh_token": refresh_token or "rt-" + secrets.token_hex(16),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": "read",
        },
        now=now,
        default_lifetime=lifetime,
    )
    if expires_at is not None:
        token["expires_at"] = int(expires_at.timestamp())
    return token


async def add_oauth(
    broker: Any, groups: Sequence[str], *, expires_at: datetime, next_refresh_at: datetime | None,
    through_put: bool = False,
) -> None:
    """OAuth2 connections for ``groups`` with the given expiry and due time.

    ``through_put``: one ``Repository.put`` per connection (what ``Broker.store_token``
    does: upsert and a ``connected`` event), else the fast bulk insert.
    """
    now = broker.now()
    if not through_put:
        await bulk_insert(broker, [
            {"group_id": g, "integration": OAUTH, "auth_type": "oauth2",
             "data": oauth_token(now, expires_at=expires_at), "expires_at": expires_at,
             "next_refresh_at": next_refresh_at}
            for g in groups
        ])
        return
    for start in range(0, len(groups), 500):
        async with broker.session() as db, db.begin():
            for group in groups[start:start + 500]:
                await broker.repository.put(
                    db, group, OAUTH, oauth_token(now, expires_at=expires_at),
                    auth_type="oauth2", hint={}, expires_at=expires_at,
                    next_refresh_at=next_refresh_at,
                )


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- processes -------------------------------------------------------------------------------


class Child:
    """A ``python -m bench.<module>`` subprocess that prints ``READY <json>`` when ready."""

    def __init__(self, module: str, *args: str, cpu: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 (our own command line)
            [PY, "-m", module, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        pin(self.proc.pid, cpu)
        self.info: dict[str, Any] = {}
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.info = json.loads(line[6:])
                break
        else:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"{module} exited before it was ready:\n{err[-3000:]}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return err

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class TokenServer(Child):
    """``bench.tokenserver`` on 127.0.0.1: any refresh_token in, a fresh token out, after
    ``/token/<delay ms>`` milliseconds. ``count()`` is how many token requests it answered."""

    def __init__(self, cpu: int | None = None) -> None:
        super().__init__("bench.tokenserver", cpu=cpu)
        self.base = f"http://127.0.0.1:{self.info['port']}"

    def url(self, delay_ms: int) -> str:
        return f"{self.base}/token/{delay_ms}"

    def count(self) -> int:
        import httpx

        return int(httpx.get(f"{self.base}/count", timeout=10).json()["count"])


def run_child_json(module: str, *args: str, cpu: int | None = None,
                   timeout: float = 600, via_shell: bool = False,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module args`` to completion; its last ``RESULT <json>`` line.

    ``via_shell``: started by ``/bin/sh``, which forks it, so that its ``ru_maxrss`` is its
    own (Linux carries a process's peak RSS across ``exec``: a child spawned straight from a
    large parent reports the parent's peak).
    """
    command = [PY, "-m", module, *args]
    if via_shell:
        command = ["/bin/sh", "-c", '"$@"; status=$?; exit $status', "sh", *command]
    proc = subprocess.Popen(  # noqa: S603 (our own command line)
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env or {**os.environ, "PYTHONPATH": str(ROOT)},
    )
    pin(proc.pid, cpu)
    out, err = proc.communicate(timeout=timeout)
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"{module} {' '.join(args)} failed (rc {proc.returncode}):\n{err[-3000:]}")


# --- numbers and output ----------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def verdict(value: float, target: float, *, at_least: bool = True) -> str:
    if value != value:  # NaN
        return "n/a"
    ok = value >= target if at_least else value <= target
    return "met" if ok else "MISSED"


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
          notes: Sequence[str] = ()) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    out = [f"### {title}", "", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    if notes:
        out.append("")
        out += [f"- {n}" for n in notes]
    return "\n".join(out)


def save(opts: Options, name: str, data: dict[str, Any]) -> Path:
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"{name}.json"
    payload = {
        "benchmark": name,
        "mode": "quick" if opts.quick else "full",
        "finished_at": utcnow().isoformat(timespec="seconds"),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
