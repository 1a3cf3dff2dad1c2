"""Token requests through Authlib's httpx client: code exchange, refresh, client credentials.

Provider quirks come from the spec: client authentication method, JSON request bodies,
extra token and refresh parameters, URL templates over per-connection settings. Every
failure becomes a ``TokenEndpointError`` carrying the HTTP status, the RFC error code and
``Retry-After`` — never the request or response body.
"""

from __future__ import annotations

import functools
import json
import ssl
import warnings
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import httpx

from ..apitransport import AiohttpTransport
from ..catalog import OAuth2ClientCredentialsProvider, OAuth2Provider
from ..errors import InvalidInput, TokenEndpointError
from .decisions import Outcome, classify, safe_error_code
from .tokens import lifetime_seconds

if TYPE_CHECKING:
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

__all__ = [
    "Borrowed", "client_credentials", "exchange_code", "refresh", "retry_after", "revoke",
    "token_transport",
]

Spec = OAuth2Provider | OAuth2ClientCredentialsProvider


class _JSONBody(httpx.AsyncBaseTransport):
    """Re-encodes form token requests as JSON, for providers that want JSON bodies."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and content_type.startswith(
            "application/x-www-form-urlencoded"
        ):
            body = json.dumps(dict(parse_qsl(request.content.decode()))).encode()
            headers = {
                k: v
                for k, v in request.headers.items()
                if k.lower() not in ("content-type", "content-length")
            }
            headers["Content-Type"] = "application/json"
            request = httpx.Request(
                request.method, request.url, headers=headers, content=body,
                extensions=request.extensions,
            )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Borrowed(httpx.AsyncBaseTransport):
    """A transport a client uses but does not own: closing the client leaves it open (the
    broker's pools for token requests and provider APIs, each closed once by the broker;
    a caller's transport handed to the remote ``ctx.client``)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        pass


class TokenPool(httpx.AsyncBaseTransport):
    """The keep-alive connection pool a broker's token requests share (the broker closes
    it). A new TCP (and TLS) connection per refresh was most of a refresh's cost; pooled
    connections carry no state between requests beyond the connection itself: each token
    request still gets its own client, headers and cookies.

    Requests go out over aiohttp's connections (``apitransport``, as the proxy's do):
    httpx's own pool costs several times more CPU per request, and checks every idle
    connection on each one (bench 3). Same TLS context as before (httpx's, certifi's CA
    bundle), and proxies from the environment and ``~/.netrc`` honoured, as httpx's
    ``trust_env`` did. The pool (and the TLS context, whose CA bundle takes ~50 ms to
    load) is made at the first token request, not when the broker opens (bench 9)."""

    def __init__(self) -> None:
        self._pool: AiohttpTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._pool is None:
            # Idle connections kept 4 s: less than the 5 s many servers (uvicorn, Node)
            # keep theirs, so a request is not sent on one the server is closing.
            self._pool = AiohttpTransport(
                max_connections=0, keepalive_seconds=4.0, ssl=_tls_context(), trust_env=True
            )
        return await self._pool.handle_async_request(request)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


def token_transport() -> TokenPool:
    """The broker's pool for token requests (see ``TokenPool``)."""
    return TokenPool()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every token request: building one loads the CA bundle, tens
    of milliseconds of CPU on the event loop (a sweep of 50 refreshes spent seconds on it)."""
    return httpx.create_ssl_context()


@functools.cache
def _authlib() -> tuple[type[AsyncOAuth2Client], type[OAuthError]]:
    """Authlib's httpx client and its error class, imported at the first token request:
    with the OpenID and JOSE modules they bring, about 70 ms of every start (bench 9)."""
    with warnings.catch_warnings():
        # Authlib 1.9 announces a preference for the httpx2 fork; broker is built on httpx.
        warnings.filterwarnings("ignore", message="The httpx module is deprecated")
        from authlib.integrations.httpx_client import AsyncOAuth2Client
    from authlib.integrations.base_client.errors import OAuthError

    return AsyncOAuth2Client, OAuthError


def _url(spec: Spec, template: str, settings: Mapping[str, str]) -> str:
    """A token URL rendered over the connection's settings and checked against the
    provider's ``allowed_hosts`` (see ``urltemplates``). A URL the configuration now
    refuses (the operator changed ``allowed_hosts`` since the connection was made) is a
    TokenEndpointError for the operator to fix, and nothing is sent."""
    try:
        return spec.render_url(template, settings)
    except InvalidInput:
        raise TokenEndpointError(
            f"{spec.display_name}: a setting of this connection gives a token URL the "
            "provider's configuration refuses (see its allowed_hosts)",
            error=None, status=None, retry_after=None, outcome=Outcome.operator,
        ) from None


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _lifetime_hook(default: int) -> Callable[[httpx.Response], httpx.Response]:
    """Authlib turns ``expires_in`` into ``expires_at`` with ``int()``: a word, ``"1e3"``,
    a list or an object there would fail the whole token request (a list or an object with
    a TypeError nobody expects). Hand it the lifetime the broker's own rule gives
    (``tokens.lifetime_seconds``: the same number ``stored_token`` then computes), and drop
    a provider's ``expires_at`` (the broker computes its own)."""

    def hook(response: httpx.Response) -> httpx.Response:
        try:
            body = response.json()
        except ValueError:
            return response
        if not isinstance(body, dict) or not {"expires_in", "expires_at"} & set(body):
            return response
        given = body.get("expires_in")
        if "expires_at" not in body and type(given) is int and (
            lifetime_seconds(given, default) == given
        ):
            return response  # the common case: nothing to change
        if "expires_in" in body:
            body["expires_in"] = lifetime_seconds(body["expires_in"], default)
        body.pop("expires_at", None)
        headers = [
            (k, v) for k, v in response.headers.multi_items()
            if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=json.dumps(body).encode(),
            request=response.request,
        )

    return hook


async def _request(
    spec: Spec,
    client_id: str,
    client_secret: str | None,
    call: Callable[[AsyncOAuth2Client], Awaitable[Mapping[str, Any]]],
    *,
    redirect_uri: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """One token request through a fresh Authlib client. ``transport``: a connection pool
    to borrow (``token_transport``; left open); without one, a connection of its own."""
    last: dict[str, Any] = {}

    async def remember(response: httpx.Response) -> None:
        last["status"] = response.status_code
        last["retry_after"] = retry_after(response.headers.get("retry-after"))

    inner: httpx.AsyncBaseTransport = (
        Borrowed(transport) if transport is not None
        else httpx.AsyncHTTPTransport(verify=_tls_context())
    )
    oauth_client, oauth_error = _authlib()
    client = oauth_client(
        client_id=client_id,
        client_secret=client_secret,
        token_endpoint_auth_method=spec.token_endpoint_auth_method,
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        timeout=spec.timeout_seconds,
        transport=_JSONBody(inner) if spec.token_request_format == "json" else inner,
        event_hooks={"response": [remember]},
        follow_redirects=False,
    )
    for kind in ("access_token_response", "refresh_token_response"):
        client.register_compliance_hook(kind, _lifetime_hook(spec.default_lifetime_seconds))
    name = spec.display_name
    try:
        async with client:
            return dict(await call(client))
    except oauth_error as exc:
        code = safe_error_code(exc.error)
        status = last.get("status")
        raise TokenEndpointError(
            f"{name} token endpoint refused the request"
            + (f" ({code})" if code else "")
            + (f", HTTP {status}" if status else ""),
            error=code,
            status=status,
            retry_after=last.get("retry_after"),
            outcome=classify(status, code),
        ) from None
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        raise TokenEndpointError(
            f"{name} token endpoint answered HTTP {status}",
            error=None,
            status=status,
            retry_after=retry_after(exc.response.headers.get("retry-after")),
            outcome=classify(status, None),
        ) from None
    except httpx.TimeoutException:
        raise TokenEndpointError(
            f"{name} token endpoint timed out", error=None, status=None,
            retry_after=None, outcome=classify(None, None),
        ) from None
    except (httpx.HTTPError, ValueError) as exc:
        # ValueError: Authlib found no JSON object in the response.
        status = last.get("status")
        raise TokenEndpointError(
            f"{name} token endpoint could not be used ({type(exc).__name__})",
            error=None, status=status, retry_after=None, outcome=classify(status, None),
        ) from None


async def exchange_code(
    spec: OAuth2Provider,
    *,
    code: str,
    code_verifier: str | None,
    redirect_uri: str,
    settings: Mapping[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """The token response for an authorization code (PKCE verifier when the flow used one)."""
    assert spec.client_id is not None
    params: dict[str, Any] = {**spec.token_params, **spec.exchange_params}
    if code_verifier is not None:
        params["code_verifier"] = code_verifier
    url = _url(spec, spec.token_url, settings)

    async def call(client: AsyncOAuth2Client) -> Mapping[str, Any]:
        token: Mapping[str, Any] = await client.fetch_token(
            url,
            grant_type="authorization_code",
            code=code,
            redirect_uri=redirect_uri,
            **params,
        )
        return token

    return await _request(
        spec,
        spec.client_id.get_secret_value(),
        spec.client_secret.get_secret_value() if spec.client_secret else None,
        call,
        redirect_uri=redirect_uri,
        transport=transport,
    )


async def refresh(
    spec: OAuth2Provider,
    *,
    refresh_token: str,
    settings: Mapping[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """The token response for a refresh token."""
    assert spec.client_id is not None
    url = _url(spec, spec.refresh_url or spec.token_url, settings)

    async def call(client: AsyncOAuth2Client) -> Mapping[str, Any]:
        token: Mapping[str, Any] = await client.refresh_token(
            url, refresh_token=refresh_token, **{**spec.token_params, **spec.refresh_params}
        )
        return token

    return await _request(
        spec,
        spec.client_id.get_secret_value(),
        spec.client_secret.get_secret_value() if spec.client_secret else None,
        call,
        transport=transport,
    )


async def revoke(
    spec: OAuth2Provider,
    *,
    token: str,
    token_type_hint: str,
    settings: Mapping[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Revoke ``token`` at the provider's ``revocation_url`` (RFC 7009, with the broker's
    client authentication); the status of the answer. Raises httpx.HTTPError when the
    endpoint cannot be reached; InvalidInput when a setting cannot be used in its URL."""
    assert spec.client_id is not None and spec.revocation_url is not None
    url = _url(spec, spec.revocation_url, settings)
    inner: httpx.AsyncBaseTransport = (
        Borrowed(transport) if transport is not None
        else httpx.AsyncHTTPTransport(verify=_tls_context())
    )
    client = _authlib()[0](
        client_id=spec.client_id.get_secret_value(),
        client_secret=spec.client_secret.get_secret_value() if spec.client_secret else None,
        token_endpoint_auth_method=spec.token_endpoint_auth_method,
        timeout=spec.timeout_seconds,
        transport=inner,
        follow_redirects=False,
    )
    async with client:
        response = await client.revoke_token(url, token=token, token_type_hint=token_type_hint)
    return int(response.status_code)


async def client_credentials(
    spec: OAuth2ClientCredentialsProvider,
    *,
    client_id: str,
    client_secret: str,
    scopes: list[str] | None = None,
    audience: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """A token for the client credentials grant."""
    params: dict[str, Any] = {**spec.token_params, **spec.exchange_params}
    scope = spec.scope_string(scopes)
    if scope:
        params["scope"] = scope
    if audience:
        params["audience"] = audience
    url = _url(spec, spec.token_url, {})

    async def call(client: AsyncOAuth2Client) -> Mapping[str, Any]:
        token: Mapping[str, Any] = await client.fetch_token(
            url, grant_type="client_credentials", **params
        )
        return token

    return await _request(spec, client_id, client_secret, call, transport=transport)
