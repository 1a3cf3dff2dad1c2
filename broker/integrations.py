"""The integration API that plugins use (the seed's contract).

    from broker.integrations import (
        register_integration, Integration, AuthType, OauthConfig, NestedOauthConfig,
        register_custom_integration, disconnect_custom_integration, has_custom_integration,
    )

``db`` is an ``AsyncSession`` made by the broker (``broker.session()`` or a route); the
session carries the broker it belongs to, so these functions find the keyring and the
registry without globals. ``group`` is the host platform's group: anything with an ``.id``.

None of these functions commit: the caller owns the transaction. The broker's routes commit
after ``complete_integration`` / ``delete_integration`` return, and roll back if they raise,
so a plugin that fails halfway leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from .errors import ApiNotDescribed, InvalidInput, PluginError, UnknownIntegration

if TYPE_CHECKING:
    from .apispec import Placement
    from .catalog import ProviderBase
    from .runtime import Broker

__all__ = [
    "AuthType",
    "Group",
    "GroupLike",
    "Integration",
    "NestedOauthConfig",
    "OauthConfig",
    "Registry",
    "default_registry",
    "disconnect_custom_integration",
    "has_custom_integration",
    "register_custom_integration",
    "register_integration",
]

GROUP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
INTEGRATION_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MAX_CREDENTIAL_BYTES = 16 * 1024


class GroupLike(Protocol):
    """The host platform's group; only ``id`` is used."""

    @property
    def id(self) -> Any: ...


@dataclass(frozen=True)
class Group:
    """A group known only by its id (what the broker's routes pass to plugins)."""

    id: str


class AuthType(StrEnum):
    """An integration's auth type: the seed's two, and every type ``broker.auth``
    implements (``AuthType("token_exchange")``); any other name is a ValueError."""

    apikey = "apikey"
    oauth2 = "oauth2"
    oauth2_cc = "oauth2_cc"
    basic = "basic"

    @classmethod
    def _missing_(cls, value: object) -> AuthType | None:
        from .auth import kinds

        if not isinstance(value, str) or value not in kinds():
            return None
        member = str.__new__(cls, value)
        member._name_ = value
        member._value_ = value
        return cls._value2member_map_.setdefault(value, member)  # type: ignore[return-value]


@dataclass
class NestedOauthConfig:
    """How the frontend shows the integration: popup size, label, and its two routes.

    ``trigger`` and ``delete`` may name the group as ``group_id`` or ``{group_id}``
    (``/groups/group_id/integrations/custom/x``); the list route fills in the real id.
    """

    width: int
    height: int
    name: str
    delete: str
    trigger: str


@dataclass
class OauthConfig:
    type: AuthType
    config: NestedOauthConfig


GetStatus = Callable[[AsyncSession, Any], Awaitable[Any]]
Complete = Callable[[AsyncSession, Any, Request], Awaitable[Any]]
Delete = Callable[[AsyncSession, Any, Any], Awaitable[Any]]


@dataclass
class Integration:
    """An integration a user can connect. ``slug`` is its key (``"openweathermap"``).

    When ``slug`` is not given it is taken from the trigger route
    (``.../integrations/custom/<slug>``), or else from ``name`` lowercased.
    """

    name: str
    authorized: bool
    image: str
    integration: OauthConfig
    get_status: GetStatus
    complete_integration: Complete
    delete_integration: Delete
    slug: str | None = None
    provider: ProviderBase | None = field(default=None, repr=False)
    _placement: Placement | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.slug is None:
            match = re.search(r"/integrations/custom/([^/?#]+)/?$", self.integration.config.trigger)
            self.slug = match.group(1) if match else re.sub(r"[^a-z0-9_-]", "", self.name.lower())
        if not re.fullmatch(INTEGRATION_PATTERN, self.slug):
            raise PluginError(
                f"integration {self.name!r}: key {self.slug!r} must match {INTEGRATION_PATTERN}"
            )

    @property
    def key(self) -> str:
        assert self.slug is not None
        return self.slug

    @property
    def auth_type(self) -> AuthType:
        return AuthType(self.integration.type)

    def placement(self) -> Placement:
        """The provider's ``api`` section, resolved; ApiNotDescribed when it has none
        (a plugin's integration, or a provider file without ``api``)."""
        if self._placement is None:  # the provider is frozen: resolved once
            found = self.provider.placement() if self.provider is not None else None
            if found is None:
                raise ApiNotDescribed(self.key)
            self._placement = found
        return self._placement


def fill_group(route: str, group_id: str) -> str:
    """The seed writes routes as ``/groups/group_id/...``; put the real id in."""
    if "{group_id}" in route:
        return route.replace("{group_id}", group_id)
    return re.sub(r"^/groups/[^/]+/", f"/groups/{group_id}/", route, count=1)


class Registry:
    """Enabled integrations by key. Registering one key twice is an error naming both."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[Integration, str]] = {}

    def add(self, integration: Integration, *, source: str = "register_integration") -> None:
        key = integration.key
        if key in self._items:
            _, previous = self._items[key]
            raise PluginError(
                f"integration {key!r} is registered twice: by {previous} and by {source}"
            )
        self._items[key] = (integration, source)

    def get(self, key: str) -> Integration:
        try:
            return self._items[key][0]
        except KeyError:
            raise UnknownIntegration(key) from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Integration]:
        return iter(item for item, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def extend(self, integrations: Iterable[Integration], *, source: str) -> None:
        for integration in integrations:
            self.add(integration, source=source)


default_registry = Registry()


def register_integration(integration: Integration) -> Integration:
    """Register ``integration`` in the process-wide registry every broker starts from."""
    default_registry.add(integration)
    return integration


def _broker(db: AsyncSession) -> Broker:
    from .runtime import Broker

    found = db.info.get("broker")
    if isinstance(found, Broker):
        return found
    current = Broker.current()
    if current is None:
        raise PluginError(
            "this session does not belong to a broker: use `broker.session()` "
            "(or open a Broker first)"
        )
    return current


def _group_id(group: Any) -> str:
    group_id = str(getattr(group, "id", group))
    if not re.fullmatch(GROUP_ID_PATTERN, group_id):
        raise InvalidInput(
            f"group id must match {GROUP_ID_PATTERN}", field="group_id"
        )
    return group_id


def _check_data(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        raise InvalidInput("credential must be a non-empty JSON object")
    try:
        size = len(json.dumps(data))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("credential must be JSON-serialisable") from exc
    if size > MAX_CREDENTIAL_BYTES:
        raise InvalidInput(f"credential is larger than {MAX_CREDENTIAL_BYTES} bytes")
    return data


async def register_custom_integration(
    db: AsyncSession,
    group: Any,
    name: str,
    data: dict[str, Any],
    *,
    hint: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Store ``data`` (encrypted) as ``group``'s credential for integration ``name``.

    Replaces an existing credential in one statement. Does not commit.
    Returns ``{"integration": name, "status": "connected"}``.
    Raises UnknownIntegration when ``name`` is not enabled, InvalidInput for bad data.
    """
    broker = _broker(db)
    integration = broker.registry.get(name)
    await broker.repository.put(
        db,
        _group_id(group),
        integration.key,
        _check_data(data),
        auth_type=integration.auth_type.value,
        hint=hint,
    )
    return {"integration": integration.key, "status": "connected"}


async def disconnect_custom_integration(db: AsyncSession, group: Any, name: str) -> bool:
    """Remove ``group``'s credential for ``name``. Idempotent: True when one was removed."""
    broker = _broker(db)
    return await broker.repository.delete(db, _group_id(group), name)


async def has_custom_integration(db: AsyncSession, group: Any, name: str) -> bool:
    """Whether ``group`` has a stored credential for ``name``."""
    broker = _broker(db)
    return await broker.repository.exists(db, _group_id(group), name)
