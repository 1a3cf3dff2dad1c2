"""``broker admin-link``: the way into the operator page."""

from __future__ import annotations

from pathlib import Path

import click

from ..admin import LINK_TTL, create_link
from ..runtime import Broker
from .common import config_option, load_config, run, with_broker

__all__ = ["admin_link"]


@click.command("admin-link")
@config_option
def admin_link(config_path: Path | None) -> None:
    """Print a one-time URL to the read-only operator page (/admin). It works once, within
    5 minutes, and opens a session of one hour in that browser. Anyone holding the URL
    until then can use it: open it yourself."""
    settings = load_config(config_path)

    async def go(broker: Broker) -> str:
        async with broker.session() as db, db.begin():
            token = await create_link(db, now=broker.now())
        return f"{settings.public_url}/admin/enter#{token}"

    click.echo(run(with_broker(settings, go)))
    minutes = int(LINK_TTL.total_seconds() // 60)
    click.echo(f"(works once, for {minutes} minutes)", err=True)
