"""Starlette routes of the test provider API, behind a gate that authenticates and records.

Every prefix in :data:`~.auth.SCHEMES` mounts the same routes; the prefix picks the
credential check. The gate runs before routing, so a request under an auth prefix with bad
credentials is refused (and recorded) before any route logic, even for an unknown route.
"""

from __future__ import annotations

import gzip
import hashlib
import secrets
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import SCHEMES, Rejection, authenticate
from .journal import RequestRecord
from .payload import iter_pattern, noise

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .server import ApiServer

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
NO_BODY_STATUSES = {204, 304}


def header_dict(headers: Headers) -> dict[str, str]:
    """Lowercased names; a repeated header's values joined with ", "."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


async def drain(request: Request) -> tuple[int, str]:
    """Read the body as a stream; return its length and hex SHA-256."""
    digest, size = hashlib.sha256(), 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


class Gate:
    """ASGI wrapper: record the request, check its credentials, then route it."""

    def __init__(self, srv: ApiServer, app: ASGIApp) -> None:
        self.srv, self.app = srv, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        query = scope.get("query_string", b"").decode("latin-1")
        journal = self.srv.journal
        record = journal.open(
            RequestRecord(scope["method"], scope["path"], query, header_dict(headers))
        )

        async def send_recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                journal.set_status(record, message["status"])
            await send(message)

        scheme = scope["path"].split("/", 2)[1]
        if scheme not in SCHEMES:
            await self.app(scope, receive, send_recorded)  # a 404 from the router
            return
        config = self.srv.config
        outcome = await authenticate(scheme, headers, QueryParams(query), config, self.srv.http)
        if isinstance(outcome, Rejection):
            status = outcome.status or config.reject_status
            extra = {"WWW-Authenticate": outcome.challenge} if outcome.challenge else {}
            resp = JSONResponse({"error": outcome.error}, status, headers=extra)
            await resp(scope, receive, send_recorded)
            return
        journal.set_principal(record, outcome)
        scope["state"] = {**scope.get("state", {}), "principal": outcome}
        await self.app(scope, receive, send_recorded)


def build_app(srv: ApiServer) -> ASGIApp:
    async def echo(request: Request) -> Response:
        scope = request.scope
        body_len, body_sha256 = await drain(request)
        return JSONResponse(
            {
                "method": request.method,
                "path": scope["path"],
                "raw_path": scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
                "query": parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True),
                "headers": header_dict(request.headers),
                "body_len": body_len,
                "body_sha256": body_sha256,
                "principal": request.state.principal,
            }
        )

    async def status(request: Request) -> Response:
        code: int = request.path_params["code"]
        if not 200 <= code <= 599:
            return JSONResponse({"error": "status must be 200-599"}, 400)
        await drain(request)
        if code in NO_BODY_STATUSES:
            return Response(status_code=code)
        return JSONResponse({"status": code}, code)

    async def flaky(request: Request) -> Response:
        key: str = request.path_params["key"]
        q = request.query_params
        attempt = srv.journal.attempt(key)
        await drain(request)
        if attempt <= int(q.get("fail", "1")):
            code = int(q.get("status", "429"))
            headers = {}
            if "retry_after" in q:
                headers[q.get("header", "Retry-After")] = q["retry_after"]
            return JSONResponse({"attempt": attempt, "status": code}, code, headers=headers)
        return JSONResponse({"attempt": attempt})

    async def redirect(request: Request) -> Response:
        to = request.query_params.get("to")
        if not to:
            return JSONResponse({"error": "query parameter 'to' is required"}, 400)
        code = int(request.query_params.get("status", "302"))
        return Response(status_code=code, headers={"Location": to})

    async def stream_bytes(request: Request) -> Response:
        n: int = request.path_params["n"]

        async def chunks() -> AsyncIterator[bytes]:
            for chunk in iter_pattern(n):
                yield chunk

        return StreamingResponse(
            chunks(),
            media_type="application/octet-stream",
            headers={"Content-Length": str(n)},
        )

    async def upload(request: Request) -> Response:
        size, sha256 = await drain(request)
        return JSONResponse({"size": size, "sha256": sha256})

    async def slow(request: Request) -> Response:
        seconds = float(request.query_params.get("seconds", "1"))
        await drain(request)
        await srv.sleep(seconds)
        return JSONResponse({"slept": seconds})

    async def set_cookie(request: Request) -> Response:
        name = request.query_params.get("name", "session")
        value = request.query_params.get("value", "apiserver-cookie")
        resp = JSONResponse({"cookie": name})
        resp.headers["Set-Cookie"] = f"{name}={value}; Path=/; HttpOnly"
        return resp

    async def gzipped(request: Request) -> Response:
        # n bytes of a fixed pseudo-random sequence (it hardly compresses), gzip-encoded.
        body = gzip.compress(noise(request.path_params["n"]), mtime=0)
        return Response(body, headers={"Content-Encoding": "gzip"},
                        media_type="application/octet-stream")

    async def login(request: Request) -> Response:
        # A two-step provider's login: credentials in, a session token out.
        config = srv.config
        if config.login_status is not None:
            return JSONResponse({"error": "login_unavailable"}, config.login_status)
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await request.json()
        else:
            body = dict(parse_qsl((await request.body()).decode()))
        user, secret = body.get("user"), body.get("secret")
        expected = config.login_users.get(user) if isinstance(user, str) else None
        if expected is None or not isinstance(secret, str) or not secrets.compare_digest(
            secret, expected
        ):
            return JSONResponse({"error": "invalid_login"}, 401)
        token = "sess-" + secrets.token_urlsafe(16)
        config.sessions[token] = user
        return JSONResponse({"data": {"token": token}, "expiresIn": config.session_lifetime})

    async def sites(request: Request) -> Response:
        return JSONResponse(srv.config.sites)

    routes = [
        Route("/echo", echo, methods=ALL_METHODS),
        Route("/echo/{rest:path}", echo, methods=ALL_METHODS),
        Route("/status/{code:int}", status, methods=ALL_METHODS),
        Route("/flaky/{key}", flaky, methods=ALL_METHODS),
        Route("/redirect", redirect, methods=ALL_METHODS),
        Route("/bytes/{n:int}", stream_bytes, methods=["GET", "HEAD"]),
        Route("/upload", upload, methods=["POST", "PUT", "PATCH"]),
        Route("/slow", slow, methods=ALL_METHODS),
        Route("/set-cookie", set_cookie, methods=ALL_METHODS),
        Route("/gzip/{n:int}", gzipped, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/sites", sites, methods=["GET"]),
    ]
    router = Starlette(routes=[Mount(f"/{scheme}", routes=routes) for scheme in SCHEMES])
    return Gate(srv, router)
