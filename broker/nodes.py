"""Nodes and the context they run in.

    class WeatherNode(BaseNode[WeatherConfig]):
        integrations = ["openweathermap"]

        async def call(self, ctx: ExecutionContext, city: str) -> dict:
            api_key = (await ctx.custom_integration("openweathermap"))["api_key"]

``ExecutionContext`` works the same in the broker's process (it reads the store directly)
and on another machine (it calls the credentials route with a service token):

    ctx = ExecutionContext.local(broker, group)
    ctx = ExecutionContext.remote("https://broker.internal", token, group)

``ctx.client(name)`` calls the provider's API with the credential applied by the broker
(in process directly, remotely through the proxy route: the node never holds the token).

``node.run(ctx, ...)`` checks that every integration in ``integrations`` is connected for
the group and raises ``IntegrationNotConnected`` naming the missing ones before ``call``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar
from urllib.parse import quote

import httpx

from .client import ConnectionHandle, ProviderClient
from .errors import (
    HTTPError,
    IntegrationNotConnected,
    ServiceUnavailable,
    UnknownIntegration,
    error_class,
)
from .oauth.client import Borrowed

PROXY_ERROR_HEADER = "Broker-Error"
"""Set on the proxy route's own error answers (not the provider's), to the error code."""

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = ["BaseNode", "CredentialSource", "ExecutionContext", "RemoteSource"]

ConfigT = TypeVar("ConfigT")


class CredentialSource(Protocol):
    async def credentials(
        self, group_id: str, name: str, *, force_refresh: bool = False
    ) -> dict[str, Any]: ...

    async def missing(self, group_id: str, names: list[str]) -> list[str]: ...

    def client(
        self, group_id: str, name: str, *, retry_non_idempotent: bool = False,
        timeout: float | None = None,
    ) -> httpx.AsyncClient: ...


class LocalSource:
    """Reads the store of a broker in this process."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def credentials(
        self, group_id: str, name: str, *, force_refresh: bool = False
    ) -> dict[str, Any]:
        return await self.broker.credentials(group_id, name, force_refresh=force_refresh)

    async def missing(self, group_id: str, names: list[str]) -> list[str]:
        return await self.broker.missing(group_id, names)

    def client(
        self, group_id: str, name: str, *, retry_non_idempotent: bool = False,
        timeout: float | None = None,
    ) -> httpx.AsyncClient:
        integration = self.broker.registry.get(name)
        placement = integration.placement()
        return ProviderClient(
            ConnectionHandle(self.broker, group_id, integration), placement,
            retry_non_idempotent=retry_non_idempotent,
            timeout=httpx.Timeout(
                placement.api.timeout_seconds if timeout is None else timeout,
                connect=self.broker.settings.proxy.connect_timeout_seconds,
            ),
            transport=self.broker.api_transport,
        )


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        raise ServiceUnavailable(f"broker answered HTTP {response.status_code}") from None
    if code == IntegrationNotConnected.code:
        raise IntegrationNotConnected(error.get("missing") or [], None)
    cls = error_class(code)
    exc = cls.__new__(cls)
    HTTPError.__init__(exc, message, field=error.get("field"))
    raise exc


class RemoteSource:
    """Calls a broker over HTTP with a service token."""

    def __init__(
        self, base_url: str, token: str, *, client: httpx.AsyncClient | None = None
    ) -> None:
        self._client = client or httpx.AsyncClient(timeout=30.0)
        # Clients made by ``client()`` use the given client's transport (tests pass one that
        # reaches an app in process), never closing it: it stays the caller's.
        self._transport = (
            Borrowed(client._transport) if client is not None else None
        )
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            response = await self._client.get(
                self._base + path, headers=self._headers, params=params
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"cannot reach the broker at {self._base} ({type(exc).__name__})"
            ) from exc
        _raise_for(response)
        return response.json()

    async def credentials(
        self, group_id: str, name: str, *, force_refresh: bool = False
    ) -> dict[str, Any]:
        params = {"force_refresh": "true"} if force_refresh else None
        body = await self._get(
            f"/groups/{quote(group_id, safe='')}/integrations/{quote(name, safe='')}/credentials",
            params,
        )
        credentials: dict[str, Any] = body["credentials"]
        return credentials

    def client(
        self, group_id: str, name: str, *, retry_non_idempotent: bool = False,
        timeout: float | None = None,
    ) -> httpx.AsyncClient:
        """A client whose calls go through the broker's proxy route: the broker applies
        the credential (and refreshes and retries as the provider's ``api`` says), so
        this process never holds it. The broker's own errors (not connected, needs
        reauth, unreachable, timeout) are raised as the matching BrokerError; the
        provider's answers, errors included, come back as they are."""
        if retry_non_idempotent:
            raise ValueError(
                "retry_non_idempotent is decided by the broker's proxy, which never "
                "retries a non-idempotent request"
            )
        base = (
            f"{self._base}/groups/{quote(group_id, safe='')}/integrations/"
            f"{quote(name, safe='')}/proxy/"
        )

        async def raise_broker_error(response: httpx.Response) -> None:
            if PROXY_ERROR_HEADER in response.headers:
                await response.aread()
                _raise_for(response)

        return httpx.AsyncClient(
            base_url=base, headers=self._headers, follow_redirects=False,
            timeout=120.0 if timeout is None else timeout,
            transport=self._transport,
            event_hooks={"response": [raise_broker_error]},
        )

    async def missing(self, group_id: str, names: list[str]) -> list[str]:
        body = await self._get(f"/groups/{quote(group_id, safe='')}/integrations")
        statuses = {i["name"]: i["status"] for i in body["integrations"]}
        for name in names:
            if name not in statuses:
                raise UnknownIntegration(name)
        return [n for n in names if statuses[n] != "connected"]


class ExecutionContext:
    """What a node gets when it runs: its group, and credentials for it."""

    def __init__(self, group: Any, source: CredentialSource) -> None:
        self.group = group
        self.group_id = str(getattr(group, "id", group))
        self.source = source

    @classmethod
    def local(cls, broker: Broker, group: Any) -> ExecutionContext:
        return cls(group, LocalSource(broker))

    @classmethod
    def remote(
        cls, base_url: str, token: str, group: Any, *, client: httpx.AsyncClient | None = None
    ) -> ExecutionContext:
        return cls(group, RemoteSource(base_url, token, client=client))

    def client(
        self, name: str, *, retry_non_idempotent: bool = False, timeout: float | None = None
    ) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for the provider's API of integration ``name``, used as
        ``async with ctx.client("github") as gh: r = await gh.get("/user")``.

        Its base URL is the provider's (from its ``api`` section and the connection's
        values); the credential is applied by the broker, refreshed when the provider
        says it is no longer good, and calls are retried as the ``api`` section says
        (idempotent methods only, unless ``retry_non_idempotent``). In process the
        client applies it itself; a remote context sends every call through the
        broker's proxy route, so the node never holds the token. Raises
        UnknownIntegration, or ApiNotDescribed for a provider without an ``api`` section.
        """
        return self.source.client(
            self.group_id, name, retry_non_idempotent=retry_non_idempotent, timeout=timeout
        )

    async def custom_integration(self, name: str, *, force_refresh: bool = False) -> dict[str, Any]:
        """The credential dict for integration ``name`` of this context's group.

        Raises IntegrationNotConnected when the group has not connected it.
        """
        return await self.source.credentials(self.group_id, name, force_refresh=force_refresh)


class BaseNode(Generic[ConfigT]):
    """A unit of work. ``integrations`` names what it needs connected before it runs."""

    integrations: ClassVar[list[str]] = []

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    async def run(self, ctx: ExecutionContext, *args: Any, **kwargs: Any) -> Any:
        """Check the node's integrations, then ``call`` it."""
        if self.integrations:
            missing = await ctx.source.missing(ctx.group_id, list(self.integrations))
            if missing:
                raise IntegrationNotConnected(missing, ctx.group_id)
        return await self.call(ctx, *args, **kwargs)

    async def call(self, ctx: ExecutionContext, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.call")
