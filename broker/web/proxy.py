"""The proxy route: a provider's API through the broker, with the credential applied here.

    S  *  /groups/{group_id}/integrations/{name}/proxy/{path}

Service token only (a connect session gets 403). The request goes to
``<base_url>/<path>?<query>`` with the caller's method, body and headers — minus
hop-by-hop headers, ``Host``, the caller's ``Authorization``, ``Cookie`` and
``Proxy-Authorization``, and ``Broker-*`` — plus the provider's static headers (unless the
caller sent them), a ``User-Agent`` when the caller sent none, and the credential. The
refresh and retry rules are the client's (``client.ProviderAuth``, ``retries``). The
answer streams back as it came: status, headers minus hop-by-hop ones (and any header
that would carry the credential back), the body as raw bytes (still compressed, if the
provider compressed it).

Both ways stream: a request body up to ``proxy.buffer_bytes`` is held (so it can be sent
again after a refresh or a 429); a larger one is streamed to the provider as it arrives,
sent once, and cut off with 413 past ``proxy.max_request_bytes``. Redirects are never
followed. The path cannot leave the base URL (``apipaths``).

The broker's own errors are JSON with the usual codes and a ``Broker-Error: <code>``
header, so a caller can tell them from the provider's: 404 ``integration_not_connected``,
404 ``api_not_described``, 409 ``integration_needs_reauth``, 422 ``invalid_input`` (a
path that leaves the API), 413 ``payload_too_large``, 502 ``provider_unreachable``, 504
``provider_timeout``. Nothing of a body or a header value is logged; the access log line
gets the integration, the provider's status and the refreshes the call forced.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..apipaths import join
from ..apispec import Placement
from ..client import ConnectionHandle, ProviderAuth
from ..errors import (
    HTTPError,
    InvalidInput,
    PayloadTooLarge,
    ProviderTimeout,
    ProviderUnreachable,
)
from ..nodes import PROXY_ERROR_HEADER
from .accesslog import LOG_KEY
from .auth import require_service
from .context import NO_STORE, broker_of, group_id_of, integration_of

__all__ = ["proxy", "request_headers", "response_headers"]


HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
_NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization", "cookie", "content-length", "expect"}
USER_AGENT = "broker-proxy"
SMALL_ANSWER = 64 * 1024
"""Answers up to this size (by their Content-Length) are read whole and sent in one go."""
_PREFIX_SEGMENTS = 6  # "", "groups", {group_id}, "integrations", {name}, "proxy"


def _named_in_connection(headers: list[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name == "connection":
            named |= {v.strip().lower() for v in value.split(",") if v.strip()}
    return named


def request_headers(
    caller: list[tuple[str, str]], static: dict[str, str]
) -> list[tuple[str, str]]:
    """What goes to the provider of the caller's headers (names lowercased), and the
    provider's static headers the caller did not send. Pure."""
    drop = _NOT_FORWARDED | _named_in_connection(caller)
    kept = [
        (name, value) for name, value in caller
        if name not in drop and not name.startswith("broker-")
    ]
    sent = {name for name, _ in kept}
    kept += [(k.lower(), v) for k, v in static.items() if k.lower() not in sent]
    if "user-agent" not in sent and "user-agent" not in {k.lower() for k in static}:
        kept.append(("user-agent", USER_AGENT))  # some APIs refuse a request without one
    return kept


def response_headers(
    upstream: list[tuple[str, str]], secrets: list[str]
) -> list[tuple[str, str]]:
    """What goes back to the caller of the provider's headers (names lowercased): no
    hop-by-hop header, no ``Broker-*`` header, and none whose value holds a credential
    value (a provider echoing it). Pure."""
    # ``date`` and ``server``: the broker's server sends its own.
    drop = HOP_BY_HOP | _named_in_connection(upstream) | {"date", "server"}
    long_secrets = [s for s in secrets if len(s) >= 8]
    return [
        (name, value) for name, value in upstream
        if name not in drop and not name.startswith("broker-")
        and not any(s in value for s in long_secrets)
    ]


def _query(raw: str, placement: Placement) -> str:
    """The caller's query, raw, without parameters the credential is sent in."""
    if not placement.auth.query or not raw:
        return raw
    reserved = set(placement.auth.query)
    pairs = parse_qsl(raw, keep_blank_values=True)
    if not any(name in reserved for name, _ in pairs):
        return raw
    return urlencode([(n, v) for n, v in pairs if n not in reserved])


class _Rest:
    """The rest of a request body too large to hold: streamed, and cut off past
    ``limit`` bytes (``exceeded`` then says so, whatever the transport made of the error)."""

    def __init__(
        self, held: list[bytes], stream: AsyncIterator[bytes], limit: int
    ) -> None:
        self._held = held
        self._stream = stream
        self._limit = limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        for chunk in self._held:
            sent += len(chunk)
            yield chunk
        async for chunk in self._stream:
            sent += len(chunk)
            if sent > self._limit:
                self.exceeded = True
                raise PayloadTooLarge(f"Request body is larger than {self._limit} bytes.")
            yield chunk


async def _body(request: Request, buffer: int, limit: int) -> bytes | _Rest:
    """The request body: bytes when it fits ``buffer`` (it can then be sent again), else
    a stream of it, cut off with PayloadTooLarge past ``limit`` bytes."""
    too_large = PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    if declared in (None, "0") and "transfer-encoding" not in request.headers:
        return b""
    chunks: list[bytes] = []
    size = 0
    stream = request.stream()
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if size > buffer:
                break
        else:
            return b"".join(chunks)
    except ClientDisconnect:
        raise InvalidInput(
            "The request body did not arrive in full.", reason="incomplete_body"
        ) from None
    return _Rest(chunks, stream, limit)


def _upstream_path(request: Request) -> str:
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    segments = raw.split(b"?", 1)[0].decode("latin-1").split("/")
    # With its leading "/": ``/proxy//host`` keeps its empty segment, and is refused.
    return "/" + "/".join(segments[_PREFIX_SEGMENTS:])


async def proxy(request: Request) -> Response:
    """The route (see the module docstring)."""
    started = time.perf_counter()
    try:
        response = await _proxy(request)
        status = str(response.status_code)
    except HTTPError as exc:
        status = exc.code
        response = JSONResponse(
            exc.to_dict(), status_code=exc.status_code,
            headers={**NO_STORE, PROXY_ERROR_HEADER: exc.code},
        )
    # Labelled only with an integration the route resolved (a name from the URL that is
    # not one is never a label).
    info = request.scope.get("state", {}).get(LOG_KEY) or {}
    name = str(info.get("integration", "-"))
    metrics = broker_of(request).metrics
    metrics.proxy_requests.labels(name, status).inc()
    metrics.proxy_seconds.labels(name).observe(time.perf_counter() - started)
    return response


async def _proxy(request: Request) -> Response:
    require_service(request)
    group_id = group_id_of(request)
    integration = integration_of(request, group_id)
    placement = integration.placement()
    broker = broker_of(request)
    settings = broker.settings.proxy
    log_info: dict[str, Any] = {"integration": integration.key}
    request.scope.setdefault("state", {})[LOG_KEY] = log_info

    handle = ConnectionHandle(broker, group_id, integration)
    credential = await handle.current()
    base = placement.base(credential)
    url = join(
        base, _upstream_path(request),
        _query(request.scope.get("query_string", b"").decode("latin-1"), placement),
    )
    headers = request_headers(
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
        dict(placement.api.headers),
    )
    body = await _body(request, settings.buffer_bytes, settings.max_request_bytes)
    if not isinstance(body, bytes) and request.headers.get("content-length", "").isdigit():
        headers.append(("content-length", request.headers["content-length"]))
    upstream_request = httpx.Request(
        request.method, url, headers=headers, content=body,
        extensions={
            "timeout": httpx.Timeout(
                placement.api.timeout_seconds, connect=settings.connect_timeout_seconds
            ).as_dict()
        },
    )
    auth = ProviderAuth(handle, placement, base_url=base)
    try:
        upstream = await broker.api_client.send(
            upstream_request, auth=auth, stream=True, follow_redirects=False
        )
    except httpx.HTTPError as exc:
        if isinstance(body, _Rest) and body.exceeded:
            raise PayloadTooLarge(
                f"Request body is larger than {settings.max_request_bytes} bytes."
            ) from None
        if isinstance(exc, httpx.TimeoutException):
            raise ProviderTimeout(
                f"{integration.name} did not answer in time ({placement.api.timeout_seconds:g} s)."
            ) from None
        raise ProviderUnreachable(
            f"Could not reach {integration.name} ({type(exc).__name__})."
        ) from None
    finally:
        log_info["refreshes"] = auth.refreshes
    log_info["upstream_status"] = upstream.status_code
    answer_headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in response_headers(
            [(k.decode("latin-1").lower(), v.decode("latin-1"))
             for k, v in upstream.headers.raw],
            placement.secret_values(auth.credential or credential),
        )
    ]
    length = upstream.headers.get("content-length", "")
    response: Response
    if length.isdigit() and int(length) <= SMALL_ANSWER:
        # A small answer whole: no streaming machinery (a task group per answer) for it.
        # Raw bytes, as the streamed path sends: still compressed if the provider did.
        try:
            content = b"".join([chunk async for chunk in upstream.aiter_raw()])
        except httpx.HTTPError:
            raise ProviderUnreachable(
                f"{integration.name} broke off its answer."
            ) from None
        finally:
            await upstream.aclose()
        response = Response(content, status_code=upstream.status_code)
    else:
        response = StreamingResponse(
            upstream.aiter_raw(), status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
    response.raw_headers = answer_headers
    return response
