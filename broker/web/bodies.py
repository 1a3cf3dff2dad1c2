"""Request bodies: a size limit enforced while reading, JSON objects, and replay.

The trigger route reads and checks the body once, then hands the integration's
``complete_integration`` a request that replays those bytes, so plugin code can call
``await request.json()`` as the seed does without ever seeing an oversized body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from ..errors import InvalidInput, PayloadTooLarge

__all__ = ["MAX_BODY_BYTES", "read_json_object", "replay"]

MAX_BODY_BYTES = 64 * 1024


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    too_large = PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        # The client left, or was cut off for sending its body too slowly
        # (server.body_timeout_seconds): nobody will read the answer, but it is not a 500.
        raise InvalidInput(
            "The request body did not arrive in full.", reason="incomplete_body"
        ) from None
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidInput("Request body is empty: expected a JSON object.", reason="empty")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: deeply nested arrays/objects (well under the size limit).
        raise InvalidInput("Request body is not valid JSON.", reason="invalid_json") from None
    if not isinstance(value, dict):
        raise InvalidInput("Request body must be a JSON object.", reason="not_an_object")
    try:
        # What is stored must go back out as JSON: no NaN/Infinity, no lone surrogates.
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError:
        raise InvalidInput(
            "Request body has a value JSON cannot carry (NaN, Infinity or a lone surrogate).",
            reason="invalid_json",
        ) from None
    return value


async def read_json_object(request: Request) -> tuple[bytes, dict[str, Any]]:
    body = await read_body(request)
    return body, parse_json_object(body)


def replay(request: Request, body: bytes) -> Request:
    """A new Request over the same scope whose body is ``body``."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)
