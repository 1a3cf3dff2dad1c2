"""``broker doctor``: a checklist of what a deployment needs, each with what to fix.

Every check is read-only: it opens the database without migrating it, creates no key file
and sends nothing to a provider. The decisions (what a finding means) are pure functions
over what was read; ``doctor`` only gathers and prints.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import click

from ..auth import kind
from ..config import Settings, load_settings
from ..crypto import Keyring, parse_key
from ..errors import BrokerError, ConfigError
from ..logs import configure_logging
from .common import config_option, run

__all__ = ["Check", "check_clock", "check_keys", "check_public_url", "check_redirects", "doctor"]

CLOCK_TOLERANCE_SECONDS = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    warning: bool = False
    """Not wrong, but worth a look (shown as ``!``; does not fail the run)."""

    def lines(self) -> list[str]:
        mark = "ok" if self.ok else ("!" if self.warning else "FAIL")
        out = [f"[{mark:>4}] {self.name}: {self.detail}"]
        if self.fix and not self.ok:
            out.append(f"       fix: {self.fix}")
        return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_public_url(public_url: str) -> Check:
    """https, or http on a loopback host (a machine's own test setup)."""
    parts = urlsplit(public_url)
    if parts.scheme == "https":
        return Check("public_url", True, public_url)
    if _loopback(parts.hostname or ""):
        return Check("public_url", False, f"{public_url} (loopback: fine on this machine only)",
                     "set public_url to the https URL users and providers reach the broker at",
                     warning=True)
    return Check("public_url", False, f"{public_url} is not https",
                 "serve the broker behind TLS and set public_url to its https URL")


def check_keys(key_ids: list[str], stored: dict[str, int]) -> list[Check]:
    """The configured keys (primary first) against the rows' key ids."""
    keyring_ids = set(key_ids)
    unknown = {k: n for k, n in stored.items() if k not in keyring_ids}
    total = sum(stored.values())
    if unknown:
        rows = sum(unknown.values())
        return [Check(
            "encryption keys", False,
            f"{rows} of {total} stored credential(s) are under key id(s) "
            f"{', '.join(sorted(unknown))}, which no configured key has",
            "add the key they were written with to encryption_keys (after the primary)",
        )]
    older = sum(n for k, n in stored.items() if k != key_ids[0])
    checks = [Check("encryption keys", True,
                    f"{len(key_ids)} key(s); every one of {total} stored credential(s) opens")]
    if older:
        checks.append(Check(
            "key rotation", False, f"{older} credential(s) are under an older key",
            "run `broker keys rotate` once every replica has the new key first", warning=True,
        ))
    return checks


def check_clock(local: datetime, database: datetime) -> Check:
    offset = (database - local).total_seconds()
    if abs(offset) <= CLOCK_TOLERANCE_SECONDS:
        return Check("clock", True, f"{offset:+.2f} s from the database's")
    return Check(
        "clock", False, f"{offset:+.1f} s from the database's (the broker uses the database's "
        "time for expiries, so it works, but this machine's logs and tokens' iat are off)",
        "run an NTP client (chrony, systemd-timesyncd) on this machine", warning=True,
    )


def check_redirects(settings: Settings) -> list[Check]:
    """Each popup provider: its client id and secret, and the redirect URI to register."""
    checks: list[Check] = []
    uri = settings.redirect_uri
    for name, spec in settings.resolved_providers.items():
        if kind(spec.auth_type).connect != "popup":
            continue
        missing = [
            f for f in ("client_id", "client_secret")
            if hasattr(spec, f) and getattr(spec, f) is None
        ]
        if missing:
            checks.append(Check(
                f"provider {name}", False, f"{', '.join(missing)} not set",
                f"set providers.{name}.{missing[0]} in config.yaml (as ${{ENV}})",
            ))
        else:
            checks.append(Check(f"provider {name}", True,
                                f"register this redirect URI with {spec.display_name}: {uri}"))
    return checks


def _key_checks(settings: Settings, stored: dict[str, int]) -> list[Check]:
    """The configured keys (or the key file) against the key ids of the stored rows."""
    from ..crypto import load_or_create_key_file

    key_file = settings.default_key_file()
    try:
        keys = [parse_key(k.get_secret_value(), where=f"encryption_keys[{i}]")
                for i, k in enumerate(settings.encryption_keys)]
        if not keys and key_file is not None and key_file.exists():
            keys = [load_or_create_key_file(key_file, may_create=False)[0]]
    except BrokerError as exc:  # names the key's place, never the key
        return [Check("encryption keys", False, str(exc),
                      "put a key from `broker keys generate` there")]
    if keys:
        return check_keys(Keyring(keys).key_ids, stored)
    if key_file is None:
        return [Check("encryption keys", False, "encryption_keys is empty",
                      "set encryption_keys (`broker keys generate`)")]
    if not stored:
        return [Check("encryption keys", True,
                      f"no key yet: {key_file} is created at the first start")]
    return [Check("encryption keys", False, f"{key_file} is missing and credentials are stored",
                  "restore the key file from its backup (or set encryption_keys)")]


async def _database_checks(settings: Settings) -> list[Check]:
    from ..store.database import Database
    from ..store.repository import utcnow

    sqlite = settings.sqlite_path()
    if sqlite is not None and not sqlite.exists():
        # Connecting would create the file: doctor creates nothing.
        return [Check("database", True, f"{sqlite} is created at the first start"),
                *_key_checks(settings, {})]
    database = Database(settings.database_url)
    try:
        try:
            pending = await database.pending_migrations()  # connects, on every backend
        except Exception as exc:  # every failure to connect is the finding
            return [Check("database", False, f"cannot connect ({type(exc).__name__})",
                          "check database_url, that the server runs and accepts this user")]
        checks = [Check("database", True, f"connected ({database.engine.url.drivername})")]
        if pending:
            checks.append(Check("migrations", False, f"pending: {', '.join(pending)}",
                                "run `broker db upgrade` (or start `broker serve`)"))
        else:
            checks.append(Check("migrations", True, "the schema is current"))
        checks += _key_checks(settings, await database.stored_key_ids())
        if not database.is_sqlite:
            before = utcnow()
            server = await database.server_time()
            checks.append(check_clock(before + (utcnow() - before) / 2, server))
    finally:
        await database.dispose()
    return checks


@click.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Check the configuration, the database and its migrations, the encryption keys
    against the stored rows, this machine's clock against the database's, public_url and
    each OAuth provider's client and redirect URI. Prints a checklist with what to fix;
    exits 1 when something must be fixed."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        click.echo("[FAIL] configuration: invalid")
        for problem in exc.problems:
            click.echo(f"       {problem}")
        raise SystemExit(1) from None
    configure_logging(settings)
    checks = [Check("configuration", True,
                    f"{settings.source or '(defaults)'}, "
                    f"{len(settings.resolved_providers)} provider(s) enabled")]
    checks += run(_database_checks(settings))
    checks.append(check_public_url(settings.public_url))
    checks += check_redirects(settings)
    for check in checks:
        for line in check.lines():
            click.echo(line)
    failed = [c for c in checks if not c.ok and not c.warning]
    click.echo(f"{len(failed)} to fix" if failed else "nothing to fix")
    if failed:
        raise SystemExit(1)
