"""``broker db`` and ``broker keys``: the schema and the encryption keys."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..crypto import generate_key
from ..runtime import Broker
from .common import config_option, load_config, run, with_broker
from .progress import Progress

__all__ = ["db", "keys"]


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path: Path | None) -> None:
    """Apply pending migrations."""
    settings = load_config(config_path)

    async def noop(broker: Broker) -> None:
        return None

    run(with_broker(settings, noop))
    click.echo("database is up to date")


@click.group()
def keys() -> None:
    """Encryption keys."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new Fernet key (put it first in encryption_keys to make it primary)."""
    click.echo(generate_key())


@keys.command("rotate")
@config_option
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
def keys_rotate(config_path: Path | None, batch_size: int) -> None:
    """Re-encrypt every stored credential with the first key in encryption_keys."""
    settings = load_config(config_path)

    async def rotate(broker: Broker) -> Any:
        total = await broker.database.count_not_under(broker.keyring.primary_key_id)
        with Progress(total, "re-encrypting") as progress:
            return await broker.rotate_keys(batch_size=batch_size, after_batch=progress.to)

    result = run(with_broker(settings, rotate, migrate=False))
    click.echo(f"re-encrypted {result.changed} row(s) under key {result.key_id}")
    if result.remaining:
        click.echo(
            f"broker: {result.remaining} row(s) are still under an older key (they changed "
            "while this ran, written by a replica that does not have the new key first); "
            "run `broker keys rotate` again once every replica has the new key first",
            err=True,
        )
        sys.exit(1)
    if result.corrupt:
        click.echo(
            f"broker: {len(result.corrupt)} row(s) did not decrypt and were left as they are "
            f"(connection ids {result.corrupt[:20]})",
            err=True,
        )
        sys.exit(1)
