"""One token request made with plain httpx (no OAuth client library), for the auth types
whose token request is not a standard grant Authlib's client makes for us (a two-step
login, a JWT-bearer assertion): send, read at most ``MAX_ANSWER_BYTES``, parse a JSON
object, and turn every failure into a ``TokenEndpointError`` carrying the status, the
RFC 6749 ``error`` code when it is a safe one, ``Retry-After`` and the outcome — never the
request or the answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from ..errors import TokenEndpointError
from .client import Borrowed, retry_after
from .decisions import Outcome, safe_error_code

__all__ = ["MAX_ANSWER_BYTES", "post_for_token"]

MAX_ANSWER_BYTES = 256 * 1024
"""A token answer larger than this is not read (it is not a token answer)."""


async def post_for_token(
    request: httpx.Request,
    *,
    transport: httpx.AsyncBaseTransport,
    timeout_seconds: float,
    label: str,
    classify: Callable[[int | None, str | None], Outcome],
) -> dict[str, Any]:
    """The JSON object a token endpoint answers ``request`` with. ``transport`` is
    borrowed (left open); redirects are never followed. ``classify(status, error)``
    decides the outcome of a failure (status None: no answer). The whole request, the
    answer read, gets ``timeout_seconds`` (httpx's timeouts are per read: a server dripping
    its answer could hold it for as long as it liked)."""

    def failed(
        what: str, status: int | None, error: str | None = None, wait: float | None = None,
    ) -> TokenEndpointError:
        said = f" ({error})" if error else ""
        return TokenEndpointError(f"{label} {what}{said}", error=error, status=status,
                                  retry_after=wait, outcome=classify(status, error))

    async with httpx.AsyncClient(
        transport=Borrowed(transport), timeout=timeout_seconds, follow_redirects=False
    ) as http:
        try:
            async with asyncio.timeout(timeout_seconds):
                response, body = await _send(http, request, failed)
        except (httpx.TimeoutException, TimeoutError):
            raise failed("timed out", None) from None
        except httpx.HTTPError as exc:
            raise failed(f"could not be reached ({type(exc).__name__})", None) from None
    try:
        answer = json.loads(bytes(body))
    except ValueError:
        answer = None
    status = response.status_code
    if not response.is_success:
        error = safe_error_code(answer.get("error")) if isinstance(answer, dict) else None
        raise failed(f"answered HTTP {status}", status, error,
                     retry_after(response.headers.get("retry-after")))
    if not isinstance(answer, dict):
        raise failed("answered with something other than a JSON object", None)
    return answer


async def _send(
    http: httpx.AsyncClient, request: httpx.Request,
    failed: Callable[[str, int | None], TokenEndpointError],
) -> tuple[httpx.Response, bytearray]:
    response = await http.send(request, stream=True)
    try:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise failed("answered with too much", response.status_code)
    finally:
        await response.aclose()
    return response, body
