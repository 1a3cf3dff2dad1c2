"""The transport behind calls to providers' APIs: httpx's interface, aiohttp's connections.

The proxy route and ``ctx.client`` are httpx clients (their auth is an ``httpx.Auth``
flow), but httpx's own transport (httpcore 1.0) costs about 1.2 ms of CPU per request on
this kind of machine, and its pool degrades past a few concurrent requests (each freed
connection is offered to every waiting request: encode/httpcore#1035). Measured side by
side against one API (``bench``, proxy benchmark notes): 32 concurrent GETs of 1 KB,
httpx's transport ~300 req/s, aiohttp's connections under httpx ~2,000-3,000 req/s.

So requests go out through an aiohttp ``ClientSession`` — created lazily, on the event
loop that first sends — and come back as ``httpx.Response`` objects streaming the body.
What is sent is what httpx built, byte for byte: the URL is handed over as already
encoded (aiohttp would otherwise re-quote it), aiohttp adds no headers of its own, follows
no redirect and decompresses nothing (httpx decodes for ``ctx.client``; the proxy passes
the raw bytes on). aiohttp's errors become httpx's, so callers see one family.

aiohttp is imported when the first request goes out, not with this module: it is about
a tenth of a second of every process's start (bench 9), and a broker that never proxies
never needs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from ssl import SSLContext
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AiohttpTransport"]

READ_CHUNK = 64 * 1024


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._response.content.iter_chunked(READ_CHUNK):
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from None

    async def aclose(self) -> None:
        self._response.release()


def _translate(exc: BaseException) -> httpx.HTTPError:
    """aiohttp's error as the httpx error that means the same. The message is the error's
    class only: some of aiohttp's carry the URL, and a URL can carry an API key."""
    import aiohttp

    what = type(exc).__name__
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return httpx.ReadTimeout(what)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(what)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.ReadError(what)
    return httpx.RemoteProtocolError(what)


async def _stream(body: httpx.AsyncByteStream) -> AsyncIterator[bytes]:
    async for chunk in body:
        yield chunk


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport over one aiohttp session (see the module docstring)."""

    def __init__(
        self, *, max_connections: int, keepalive_seconds: float = 15.0,
        ssl: SSLContext | None = None, trust_env: bool = False,
    ) -> None:
        """``max_connections`` 0: no limit. ``ssl``: the TLS context (default: aiohttp's).
        ``trust_env``: proxies from the environment (``HTTP(S)_PROXY``, ``NO_PROXY``) and
        ``~/.netrc``, as httpx's ``trust_env`` does."""
        self._max_connections = max_connections
        self._keepalive = keepalive_seconds
        self._ssl = ssl
        self._trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, keepalive_timeout=self._keepalive,
                    ssl=self._ssl if self._ssl is not None else True,
                ),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                auto_decompress=False,
                trust_env=self._trust_env,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp
        from yarl import URL

        timeout = request.extensions.get("timeout", {})
        data: bytes | AsyncIterator[bytes] | None
        if isinstance(request.stream, httpx.ByteStream):
            data = request.read() or None
        else:
            assert isinstance(request.stream, httpx.AsyncByteStream)
            data = _stream(request.stream)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
            if k.lower() != b"transfer-encoding"  # aiohttp frames a streamed body itself
        ]
        try:
            response = await self._get_session()._request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                    connect=timeout.get("pool"),
                ),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from None
        return httpx.Response(
            status_code=response.status,
            headers=[(k, v) for k, v in response.raw_headers],
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
