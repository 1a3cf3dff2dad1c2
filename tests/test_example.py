"""The seed's example runs end to end: plugin from config, key over HTTP, node in and out
of process, against a real fake OpenWeatherMap on 127.0.0.1.

``examples`` lives at the repository root, outside the ``broker`` package. Each test that
loads it puts the root first on ``sys.path`` with ``monkeypatch.syspath_prepend``; the undo
also drops the config directory that ``load_plugins`` inserts. So the example imports the
same way whether pytest runs from the root or elsewhere, editable install or not.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import httpx
import pytest
from conftest import SERVICE_TOKEN
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.config import Settings
from broker.errors import IntegrationNotConnected, PluginError
from broker.nodes import ExecutionContext
from broker.plugins import ENTRY_POINT_GROUP
from broker.runtime import Broker
from broker.web import create_app
from tests.support import serve

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_REF = "examples.openweathermap:plugin"
KEY = "0123456789abcdef0123456789abcdef"
AUTH = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
# A second integration (inline YAML provider) so a node can need two.
OTHER_PROVIDER = {
    "otherapi": {
        "display_name": "Other API",
        "auth_type": "apikey",
        "fields": {"token": {"title": "Token"}},
    }
}


# --- real servers on 127.0.0.1 -----------------------------------------------------------




class FakeOpenWeatherMap:
    """``GET /data/2.5/weather``: 200 + JSON only when ``appid`` is the key it was given."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.url = ""
        self.requests: list[dict[str, str]] = []
        self.app = Starlette(routes=[Route("/data/2.5/weather", self.weather)])

    async def weather(self, request: Request) -> Response:
        query = dict(request.query_params)
        self.requests.append(query)
        if query.get("appid") != self.key:
            return JSONResponse({"cod": 401, "message": "Invalid API key."}, status_code=401)
        return JSONResponse(
            {"cod": 200, "name": query.get("q"), "main": {"temp": 281.4}, "weather": [{}]}
        )


@dataclass(frozen=True)
class PlatformGroup:
    """The host platform's group: the broker only reads ``id``."""

    id: str
    name: str = "Team"


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``examples.openweathermap``, imported from this checkout."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    module = importlib.import_module("examples.openweathermap")
    assert Path(module.__file__ or "").resolve().parent == REPO_ROOT / "examples"
    return module


@pytest.fixture
async def seed_broker(
    store_url: str, make_settings: Callable[..., Settings], example: ModuleType
) -> AsyncIterator[Broker]:
    """A broker with the seed example as a configured plugin, not the YAML provider."""
    settings = make_settings(
        database_url=store_url, providers=OTHER_PROVIDER, plugins=[PLUGIN_REF]
    )
    b = await Broker.open(settings)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def broker_url(seed_broker: Broker) -> AsyncIterator[str]:
    """The broker's HTTP service under a real uvicorn on 127.0.0.1."""
    async with serve(create_app(seed_broker)) as url:
        yield url


@pytest.fixture
async def http(broker_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=broker_url, headers=AUTH) as c:
        yield c


@pytest.fixture
async def fake_owm() -> AsyncIterator[FakeOpenWeatherMap]:
    fake = FakeOpenWeatherMap(KEY)
    async with serve(fake.app) as url:
        fake.url = url
        yield fake


@asynccontextmanager
async def context(
    mode: str, broker: Broker, broker_url: str, group: Any
) -> AsyncIterator[ExecutionContext]:
    """An ExecutionContext in the broker's process, or over HTTP with the service token."""
    if mode == "local":
        yield ExecutionContext.local(broker, group)
        return
    async with httpx.AsyncClient() as c:
        yield ExecutionContext.remote(broker_url, SERVICE_TOKEN, group, client=c)


async def connect(http: httpx.AsyncClient, group_id: str, name: str, body: Any) -> None:
    r = await http.post(f"/groups/{group_id}/integrations/custom/{name}", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"integration": name, "status": "connected"}


# --- the example as a configured plugin ---------------------------------------------------


async def test_seed_example_is_loaded_from_plugins_config_with_its_node(
    seed_broker: Broker, example: ModuleType
) -> None:
    assert seed_broker.registry.get("openweathermap") is example.OpenWeatherMapIntegration
    assert sorted(seed_broker.registry.keys()) == ["openweathermap", "otherapi"]
    assert seed_broker.nodes == [example.OpenWeatherMapNode]
    # The integration is the plugin's, not the catalog provider's.
    assert example.OpenWeatherMapIntegration.provider is None


async def test_fake_openweathermap_answers_only_the_right_key(
    fake_owm: FakeOpenWeatherMap,
) -> None:
    async with httpx.AsyncClient(base_url=fake_owm.url) as c:
        wrong = await c.get("/data/2.5/weather", params={"q": "London", "appid": "nope"})
        right = await c.get("/data/2.5/weather", params={"q": "London", "appid": KEY})
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert right.json()["name"] == "London"


async def test_key_posted_to_seed_trigger_route_lets_node_fetch_weather_in_process(
    http: httpx.AsyncClient,
    seed_broker: Broker,
    fake_owm: FakeOpenWeatherMap,
    example: ModuleType,
) -> None:
    await connect(http, "team-1", "openweathermap", {"api_key": KEY})

    r = await http.get("/groups/team-1/integrations/openweathermap/credentials")
    assert r.status_code == 200
    assert r.json() == {"credentials": {"api_key": KEY}}

    r = await http.get("/groups/team-1/integrations")
    listed = {i["name"]: i for i in r.json()["integrations"]}
    assert listed["openweathermap"]["status"] == "connected"
    assert listed["openweathermap"]["config"]["trigger"] == (
        "/groups/team-1/integrations/custom/openweathermap"
    )

    node = example.OpenWeatherMapNode(
        example.OpenWeatherMapNodeConfig(city="London", base_url=fake_owm.url)
    )
    ctx = ExecutionContext.local(seed_broker, PlatformGroup("team-1"))
    weather = await node.run(ctx)
    assert weather["cod"] == 200
    assert weather["name"] == "London"
    assert await node.run(ctx, city="Lisbon") == {**weather, "name": "Lisbon"}
    assert fake_owm.requests == [
        {"q": "London", "appid": KEY},
        {"q": "Lisbon", "appid": KEY},
    ]


async def test_same_node_fetches_weather_through_remote_broker_over_http(
    http: httpx.AsyncClient,
    broker_url: str,
    fake_owm: FakeOpenWeatherMap,
    example: ModuleType,
) -> None:
    await connect(http, "team-2", "openweathermap", {"api_key": KEY})
    node = example.OpenWeatherMapNode(
        example.OpenWeatherMapNodeConfig(city="Oslo", base_url=fake_owm.url)
    )
    async with httpx.AsyncClient() as c:
        ctx = ExecutionContext.remote(broker_url, SERVICE_TOKEN, PlatformGroup("team-2"), client=c)
        assert await ctx.custom_integration("openweathermap") == {"api_key": KEY}
        weather = await node.run(ctx)
    assert weather["name"] == "Oslo"
    assert fake_owm.requests == [{"q": "Oslo", "appid": KEY}]


async def test_node_with_a_key_the_provider_rejects_fails_without_leaking_the_key(
    http: httpx.AsyncClient,
    seed_broker: Broker,
    fake_owm: FakeOpenWeatherMap,
    example: ModuleType,
) -> None:
    wrong = "ffffffffffffffffffffffffffffffff"
    await connect(http, "team-3", "openweathermap", {"api_key": wrong})
    node = example.OpenWeatherMapNode(
        example.OpenWeatherMapNodeConfig(city="Paris", base_url=fake_owm.url)
    )
    with pytest.raises(RuntimeError, match="HTTP 401") as info:
        await node.run(ExecutionContext.local(seed_broker, PlatformGroup("team-3")))
    assert wrong not in str(info.value)
    assert fake_owm.requests == [{"q": "Paris", "appid": wrong}]


# --- integrations not connected ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["local", "remote"])
async def test_node_raises_integration_not_connected_naming_missing_ones_before_call(
    mode: str,
    http: httpx.AsyncClient,
    seed_broker: Broker,
    broker_url: str,
    fake_owm: FakeOpenWeatherMap,
    example: ModuleType,
) -> None:
    calls: list[str] = []

    class NeedsTwo(example.OpenWeatherMapNode):  # type: ignore[name-defined,misc]
        integrations: ClassVar[list[str]] = ["openweathermap", "otherapi"]

        async def call(self, ctx: ExecutionContext, city: str | None = None) -> Any:
            calls.append(ctx.group_id)
            return await super().call(ctx, city)

    config = example.OpenWeatherMapNodeConfig(city="Rome", base_url=fake_owm.url)
    group = PlatformGroup("team-4")
    async with context(mode, seed_broker, broker_url, group) as ctx:
        with pytest.raises(IntegrationNotConnected) as info:
            await NeedsTwo(config).run(ctx)
        assert info.value.missing == ["openweathermap", "otherapi"]
        assert "openweathermap" in str(info.value)
        assert "otherapi" in str(info.value)
        assert "team-4" in str(info.value)

        # The seed's own node, too: it never reaches the provider.
        with pytest.raises(IntegrationNotConnected) as info:
            await example.OpenWeatherMapNode(config).run(ctx)
        assert info.value.missing == ["openweathermap"]
        with pytest.raises(IntegrationNotConnected) as info:
            await ctx.custom_integration("openweathermap")
        assert info.value.missing == ["openweathermap"]

        await connect(http, "team-4", "openweathermap", {"api_key": KEY})
        with pytest.raises(IntegrationNotConnected) as info:
            await NeedsTwo(config).run(ctx)
        assert info.value.missing == ["otherapi"]
        assert "openweathermap" not in str(info.value)
        assert calls == []
        assert fake_owm.requests == []

        await connect(http, "team-4", "otherapi", {"token": "other-token"})
        weather = await NeedsTwo(config).run(ctx)
    assert weather["name"] == "Rome"
    assert calls == ["team-4"]


async def test_a_group_connected_elsewhere_does_not_satisfy_another_groups_node(
    http: httpx.AsyncClient,
    seed_broker: Broker,
    broker_url: str,
    fake_owm: FakeOpenWeatherMap,
    example: ModuleType,
) -> None:
    await connect(http, "team-5", "openweathermap", {"api_key": KEY})
    node = example.OpenWeatherMapNode(example.OpenWeatherMapNodeConfig(city="Bern"))
    for mode in ("local", "remote"):
        async with context(mode, seed_broker, broker_url, PlatformGroup("team-6")) as ctx:
            with pytest.raises(IntegrationNotConnected) as info:
                await node.run(ctx)
        assert info.value.missing == ["openweathermap"]
    assert fake_owm.requests == []


# --- plugins from the broker.plugins entry-point group --------------------------------------

PLUGIN_MODULE = '''
from broker.integrations import (
    AuthType,
    Integration,
    NestedOauthConfig,
    OauthConfig,
    disconnect_custom_integration,
    has_custom_integration,
    register_custom_integration,
)

KEY = {key!r}


async def complete(db, group, request):
    data = await request.json()
    return await register_custom_integration(db, group, KEY, {{"token": data["token"]}})


FakeIntegration = Integration(
    name="Fake Service",
    authorized=True,
    image="/logo/fake.svg",
    integration=OauthConfig(
        type=AuthType.apikey,
        config=NestedOauthConfig(
            width=500,
            height=400,
            name="Fake Service",
            delete="/groups/group_id/integrations/custom/" + KEY + "/disconnect",
            trigger="/groups/group_id/integrations/custom/" + KEY,
        ),
    ),
    get_status=lambda db, group: has_custom_integration(db, group, KEY),
    complete_integration=complete,
    delete_integration=lambda db, group, _: disconnect_custom_integration(db, group, KEY),
)


class Plugin:
    def integrations(self):
        return [FakeIntegration]


plugin = Plugin()
'''


@pytest.fixture
def install_entry_point_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Install a throwaway distribution whose ``broker.plugins`` entry point registers one
    integration with the given key; return the entry point's name."""
    modules: list[str] = []

    def install(integration_key: str) -> str:
        site = tmp_path / "site"
        module = f"fake_broker_plugin_{uuid.uuid4().hex[:12]}"
        ep_name = f"fake-{integration_key}"
        dist_info = site / "fake_plugin-0.1.dist-info"
        dist_info.mkdir(parents=True)
        (site / f"{module}.py").write_text(PLUGIN_MODULE.format(key=integration_key))
        (dist_info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n"
        )
        (dist_info / "entry_points.txt").write_text(
            textwrap.dedent(
                f"""\
                [{ENTRY_POINT_GROUP}]
                {ep_name} = {module}:plugin
                """
            )
        )
        monkeypatch.syspath_prepend(str(site))
        modules.append(module)
        found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
        assert found == {ep_name: f"{module}:plugin"}
        return ep_name

    yield install
    for module in modules:
        sys.modules.pop(module, None)


async def test_plugin_from_entry_point_group_is_listed_and_connectable(
    store_url: str,
    make_settings: Callable[..., Settings],
    example: ModuleType,
    install_entry_point_plugin: Callable[[str], str],
) -> None:
    install_entry_point_plugin("fakeservice")
    b = await Broker.open(
        make_settings(database_url=store_url, providers={}, plugins=[PLUGIN_REF])
    )
    try:
        async with serve(create_app(b)) as url, httpx.AsyncClient(
            base_url=url, headers=AUTH
        ) as http:
            r = await http.get("/groups/team-7/integrations")
            assert r.status_code == 200
            listed = {i["name"]: i for i in r.json()["integrations"]}
            assert set(listed) == {"openweathermap", "fakeservice"}
            fake = listed["fakeservice"]
            assert fake["display_name"] == "Fake Service"
            assert fake["status"] == "not_connected"
            assert fake["config"] == {
                "width": 500,
                "height": 400,
                "name": "Fake Service",
                "trigger": "/groups/team-7/integrations/custom/fakeservice",
                "delete": "/groups/team-7/integrations/custom/fakeservice/disconnect",
            }

            await connect(http, "team-7", "fakeservice", {"token": "t0k3n"})
            r = await http.get("/groups/team-7/integrations/fakeservice/credentials")
            assert r.json() == {"credentials": {"token": "t0k3n"}}
    finally:
        await b.close()


async def test_same_key_from_entry_point_and_configured_plugin_is_plugin_error_naming_both(
    make_settings: Callable[..., Settings],
    example: ModuleType,
    install_entry_point_plugin: Callable[[str], str],
) -> None:
    ep_name = install_entry_point_plugin("openweathermap")
    with pytest.raises(PluginError) as info:
        await Broker.open(make_settings(providers={}, plugins=[PLUGIN_REF]))
    message = str(info.value)
    assert "'openweathermap'" in message
    assert f"plugin {PLUGIN_REF}" in message
    assert f"entry point {ep_name}" in message


async def test_seed_plugin_next_to_yaml_provider_of_same_key_is_plugin_error_naming_both(
    make_settings: Callable[..., Settings], example: ModuleType
) -> None:
    # make_settings enables the catalog provider `openweathermap` by default.
    with pytest.raises(PluginError) as info:
        await Broker.open(make_settings(plugins=[PLUGIN_REF]))
    message = str(info.value)
    assert "'openweathermap'" in message
    assert "providers.openweathermap in config" in message
    assert f"plugin {PLUGIN_REF}" in message
