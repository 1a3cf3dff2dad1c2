"""What a route needs from its request: the broker, a checked group id and integration,
and where a popup's result may be posted.

Shared by the API routes (``app``), the connect page (``connect``) and the sign-in popup
(``popup``). Group ids and names are checked here, before anything is looked up, and a
connect session is held to its own group and allow-list (``auth.require_group``).
"""

from __future__ import annotations

import re

from starlette.requests import Request

from ..errors import InvalidInput, UnknownIntegration
from ..integrations import GROUP_ID_PATTERN, INTEGRATION_PATTERN, Integration
from ..runtime import Broker
from .auth import require_group

__all__ = ["GROUP_ID_MESSAGE", "NO_STORE", "broker_of", "group_id_of", "integration_of", "targets"]

NO_STORE = {"Cache-Control": "no-store"}
GROUP_ID_MESSAGE = (
    "Group id must be 1-128 characters: letters, digits and . _ : @ -, "
    "starting with a letter or digit."
)


GROUP_ID = re.compile(GROUP_ID_PATTERN)
INTEGRATION = re.compile(INTEGRATION_PATTERN)


def broker_of(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def group_id_of(request: Request) -> str:
    """The path's group id, checked, and one the caller may act on."""
    group_id: str = request.path_params["group_id"]
    if not GROUP_ID.fullmatch(group_id):
        raise InvalidInput(GROUP_ID_MESSAGE, field="group_id")
    require_group(request, group_id)
    return group_id


def integration_of(request: Request, group_id: str) -> Integration:
    """The path's integration, enabled, and one the caller may act on for ``group_id``."""
    name: str = request.path_params["name"]
    if not INTEGRATION.fullmatch(name):
        raise UnknownIntegration(name[:64])
    require_group(request, group_id, name)
    return broker_of(request).registry.get(name)


def targets(broker: Broker) -> list[str]:
    """Where the result of a popup may be posted: the broker's origin and allowed ones."""
    settings = broker.settings
    return list(dict.fromkeys([settings.public_origin, *settings.auth.allowed_origins]))
