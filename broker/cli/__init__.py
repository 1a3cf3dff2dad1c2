"""The ``broker`` command.

    broker serve [--config PATH] [--host HOST] [--port PORT] [--no-refresh]
    broker refresher
    broker db upgrade
    broker keys generate | rotate [--batch-size N]
    broker connections list | show | refresh | disconnect
    broker events [--group G] [--follow] [--json]
    broker connect-link GROUP [--integration NAME]
    broker admin-link
    broker providers list | check NAME | import FILE
    broker doctor

Every command reads config.yaml (``--config``, ``$BROKER_CONFIG``, or ./config.yaml) and
exits non-zero with the problems listed before it touches the database. One module per
group of commands; what they share is in ``common``.
"""

from __future__ import annotations

import click

from .admin import admin_link
from .connections import connect_link, connections, events
from .doctor import doctor
from .maintenance import db, keys
from .providers import providers
from .serve import quiet_gc, refresher, serve

__all__ = ["main", "quiet_gc"]


@click.group()
@click.version_option(package_name="broker")
def main() -> None:
    """Keeps API keys and OAuth2 tokens for workflow nodes, encrypted and fresh."""


for command in (serve, refresher, db, keys, connections, events, connect_link, admin_link,
                providers, doctor):
    main.add_command(command)
