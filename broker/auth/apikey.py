"""``apikey``: values the user pastes into the connect page (an API key, an account id).

Connected by posting the provider's fields to the trigger route: they are checked against
the spec's patterns, the API address is checked (``api``), and when the spec has a
``verify`` request the provider is asked whether the credential works, before anything is
stored. Stored and handed to nodes as given; never renewed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from ..catalog import ApiKeyProvider, FieldsProvider, ProviderBase
from ..connectvalues import learn, shown
from ..integrations import Integration, register_custom_integration
from ..oauth.client import Borrowed
from ..providers import base_integration, check_api_values, read_fields, verify_credential
from . import kind
from .base import AuthKind

__all__ = ["KIND", "ApiKeyKind", "form_integration"]


class ApiKeyKind(AuthKind):
    name = "apikey"
    title = "API key"

    @property
    def spec(self) -> type[ProviderBase]:
        return ApiKeyProvider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, ApiKeyProvider)
        return form_integration(spec)


def form_integration(spec: FieldsProvider) -> Integration:
    """Connected by posting the spec's fields to the trigger route (see the module doc)."""
    name = spec.name

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        data = await read_fields(spec, request)
        check_api_values(spec, data)
        await verify_credential(spec, data)
        stored = spec.stored(data)
        learnt = await learn(
            spec, kind(spec.auth_type).node_view(stored),
            transport=Borrowed(db.info["broker"].token_transport),
        )
        check_api_values(spec, {**data, **learnt})
        return await register_custom_integration(
            db, group, name, {**stored, **learnt},
            hint={**spec.credential_hint(data), **shown(spec, learnt)},
        )

    return base_integration(spec, complete)


KIND = ApiKeyKind()
