"""The seed's example, runnable: an OpenWeatherMap API-key integration and a node using it.

The code between the ``seed`` markers is the product's original example with only the
import prefix changed (``noxus`` -> ``broker``) and ``call`` made ``async``; what the seed
leaves out (its imports, the node's config, the node body and the plugin object) is added
around it. Enable it with ``plugins: ["examples.openweathermap:plugin"]`` in config.yaml
(instead of the catalog provider ``openweathermap``: one key cannot be registered twice).
"""

# The seed text is kept verbatim, so its unused import, unsorted imports, mid-file import
# placeholder-free f-strings and un-annotated class list stay as written.
# ruff: noqa: E402, F401, F541, I001, RUF012

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from broker.integrations import GroupLike as UserGroup


@dataclass
class OpenWeatherMapNodeConfig:
    city: str
    base_url: str = "https://api.openweathermap.org"


# --- seed ---------------------------------------------------------------------------

from broker.integrations import (
    register_integration,
    Integration,
    AuthType,
    OauthConfig,
    NestedOauthConfig,
    register_custom_integration,
    disconnect_custom_integration,
    has_custom_integration,
)

async def complete_integration(db: AsyncSession, group: UserGroup, request: Request):
    data = await request.json()
    return await register_custom_integration(
        db,
        group,
        "openweathermap",
        {
            "api_key": data["api_key"],
        },
    )


OpenWeatherMapIntegration = Integration(
    name="OpenWeatherMap",
    authorized=True,
    image="/api/backend/logo/example.com",
    integration=OauthConfig(
        type=AuthType.apikey,
        config=NestedOauthConfig(
            width=660,
            height=660,
            name="OpenWeatherMap",
            delete=f"/groups/group_id/integrations/custom/openweathermap/disconnect",
            trigger=f"/groups/group_id/integrations/custom/openweathermap",
        ),
    ),
    get_status=lambda db, group: has_custom_integration(db, group, "openweathermap"),
    complete_integration=complete_integration,
    delete_integration=lambda db, group, _: disconnect_custom_integration(
        db, group, "openweathermap"
    ),
)

from broker.nodes import ExecutionContext, BaseNode

class OpenWeatherMapNode(BaseNode[OpenWeatherMapNodeConfig]):
    # adding this tells the frontend that the integration must be configured to use the node
    integrations = ["openweathermap"]

    async def call(self, ctx: ExecutionContext, city: str | None = None) -> dict[str, Any]:
        api_key = (await ctx.custom_integration("openweathermap"))["api_key"]
        # --- end of seed: the node body the seed leaves out --------------------------
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(
                f"{self.config.base_url.rstrip('/')}/data/2.5/weather",
                params={"q": city or self.config.city, "appid": api_key},
            )
        if not response.is_success:
            # Not raise_for_status(): its message carries the URL, and so the key.
            raise RuntimeError(f"OpenWeatherMap answered HTTP {response.status_code}")
        weather: dict[str, Any] = response.json()
        return weather


class OpenWeatherMapPlugin:
    """What ``plugins:`` in config.yaml names: the integration and the node."""

    def integrations(self) -> list[Integration]:
        return [OpenWeatherMapIntegration]

    def nodes(self) -> list[type[BaseNode[Any]]]:
        return [OpenWeatherMapNode]


plugin = OpenWeatherMapPlugin()
