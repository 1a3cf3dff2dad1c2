"""Calling a provider's API with a connection's credential: an ``httpx.Auth`` and a client.

``ProviderAuth`` is an ``httpx.Auth`` whose flow (a generator, as httpx's own auth
classes are written) decides what to send while httpx does the sending:

1. the request must stay under the connection's base URL (``apipaths.within``), or
   nothing is sent: the credential goes to the provider's API and nowhere else;
2. the current credential is applied (``Placement.apply``);
3. on a ``refresh_on`` answer the credential is renewed — the one single-flight refresh
   every caller of the connection shares — and the request sent once more; on a
   ``retry_on`` answer it is sent again after the wait (see ``retries``).

It needs I/O (the credential comes from the store, or from a refresh), so it is an async
flow only: httpx's documented way for an auth that does I/O.

``ProviderClient`` is the ``httpx.AsyncClient`` a node gets from ``ctx.client(name)``:
the provider's base URL (rendered from the connection's values on entry), its static
headers, this auth, its timeout; redirects are never followed, so the credential cannot
be carried to another host.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from .apipaths import within
from .apispec import Placement
from .auth import kind
from .errors import InvalidInput
from .integrations import Integration
from .retries import next_step

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = [
    "ConnectionHandle",
    "CredentialHandle",
    "ProviderAuth",
    "ProviderClient",
]


class CredentialHandle(Protocol):
    """One connection's credential, as a node would get it."""

    @property
    def refreshable(self) -> bool:
        """Whether the credential is a token the broker can renew."""
        ...

    async def current(self) -> Mapping[str, Any]:
        """The credential to use now (valid for a while: refreshed ahead of expiry)."""
        ...

    async def renew(self, rejected: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """A credential to use after the provider refused ``rejected``; None when it
        cannot be renewed (an API key)."""
        ...

    async def signer(self) -> Callable[[httpx.Request], None] | None:
        """What signs each request with secrets the broker keeps (OAuth 1.0a), or None."""
        ...


class ConnectionHandle:
    """A connection of a broker in this process (``CredentialHandle``)."""

    def __init__(self, broker: Broker, group_id: str, integration: Integration) -> None:
        self.broker = broker
        self.group_id = group_id
        self.integration = integration
        auth_type = getattr(integration.provider, "auth_type", "")
        self.refreshable = kind(auth_type).refreshable
        self.signs = kind(auth_type).signs

    async def current(self) -> Mapping[str, Any]:
        return await self.broker.tokens.get(self.group_id, self.integration)

    async def signer(self) -> Callable[[httpx.Request], None] | None:
        spec = self.integration.provider
        if not self.signs or spec is None:
            return None
        async with self.broker.session() as db:
            found = await self.broker.repository.get(db, self.group_id, self.integration.key)
        return None if found is None else kind(spec.auth_type).signer(spec, found.data)

    async def renew(self, rejected: Mapping[str, Any]) -> Mapping[str, Any] | None:
        token = rejected.get("access_token")
        return await self.broker.tokens.renew_rejected(
            self.group_id, self.integration, token if isinstance(token, str) else None
        )


class ProviderAuth(httpx.Auth):
    """See the module docstring. ``base_url`` may be set after construction (the client
    learns it on entry)."""

    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        handle: CredentialHandle,
        placement: Placement,
        *,
        base_url: str | None = None,
        retry_non_idempotent: bool = False,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.handle = handle
        self.placement = placement
        self.base_url = base_url
        self.retry_non_idempotent = retry_non_idempotent
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self.refreshes = 0
        """Refreshes this auth asked for (for the proxy's access log)."""
        self.credential: Mapping[str, Any] | None = None
        """The credential last applied."""
        self._sign: Callable[[httpx.Request], None] | None = None

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("a provider's API is called with httpx.AsyncClient (async only)")
        yield request  # pragma: no cover - makes this a generator

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if self.base_url is None:
            raise RuntimeError("use the client as `async with ctx.client(name) as api:`")
        if not within(self.base_url, request.url):
            raise InvalidInput(
                "The request must go to the provider's API: a path under its base URL, "
                "with no '.', '..', '//' or encoded separators.",
                field="path",
            )
        credential = await self.handle.current()
        self._sign = await self.handle.signer()
        self._apply(request, credential)
        response = yield request
        retried = 0
        refreshed = False
        replayable = isinstance(request.stream, httpx.ByteStream)
        while True:
            step = next_step(
                method=request.method,
                status=response.status_code,
                headers=response.headers,
                placement=self.placement,
                retried=retried,
                refreshed=refreshed,
                replayable=replayable,
                can_refresh=self.handle.refreshable,
                retry_non_idempotent=self.retry_non_idempotent,
                now=self._clock(),
                rand=self._rand,
            )
            if step is None:
                return
            # The answer is not the caller's now: read it (an error's short body) so its
            # connection goes back to the pool before any wait.
            await response.aread()
            if step.action == "refresh":
                refreshed = True
                self.refreshes += 1
                renewed = await self.handle.renew(credential)
                credential = await self.handle.current() if renewed is None else renewed
            else:
                retried += 1
                await self._sleep(step.wait)
            self._apply(request, credential)
            response = yield request

    def _apply(self, request: httpx.Request, credential: Mapping[str, Any]) -> None:
        self.credential = credential
        headers, query = self.placement.apply(credential)
        for name, value in headers.items():
            request.headers[name] = value
        if query:
            request.url = request.url.copy_merge_params(query)
        if self._sign is not None:  # last: the signature covers the URL as sent
            self._sign(request)


class ProviderClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` for one connection's provider API (see the module doc).

    Use it as ``async with``: entering renders the base URL from the connection.
    """

    def __init__(
        self,
        handle: CredentialHandle,
        placement: Placement,
        *,
        retry_non_idempotent: bool = False,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        self.provider_auth = ProviderAuth(
            handle, placement, retry_non_idempotent=retry_non_idempotent
        )
        self._handle = handle
        self._placement = placement
        super().__init__(
            auth=self.provider_auth,
            headers=dict(placement.api.headers),
            timeout=placement.api.timeout_seconds if timeout is None else timeout,
            follow_redirects=False,
            transport=transport,
            **kwargs,
        )

    async def __aenter__(self) -> ProviderClient:
        await super().__aenter__()
        try:
            credential = await self._handle.current()
            base = self._placement.base(credential)
        except BaseException:
            await super().__aexit__(None, None, None)
            raise
        self.base_url = httpx.URL(base)
        self.provider_auth.base_url = str(self.base_url)
        return self

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        """As httpx's, but always with the provider's auth and never following a
        redirect (a 3xx comes back as it came)."""
        kwargs["auth"] = self.provider_auth
        kwargs["follow_redirects"] = False
        return await super().send(request, **kwargs)
