"""Starlette routes of the test authorization server."""

from __future__ import annotations

import base64
import hmac
import html
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import OAuth2Error
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .apps import app_routes
from .faults import Fault
from .models import RequestRecord, User
from .oauth import HTTPSnapshot, OAuth2Response

if TYPE_CHECKING:
    from .server import AuthServer

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def snapshot(
    request: Request, *, include_query: bool = False, allow_json: bool = False
) -> HTTPSnapshot:
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body: list[tuple[str, str]] = []
    if raw and ctype in ("", "application/x-www-form-urlencoded"):
        body = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    elif raw and ctype == "application/json" and allow_json:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            body = [
                (str(k), v if isinstance(v, str) else json.dumps(v))
                for k, v in obj.items()
                if v is not None
            ]
    return HTTPSnapshot(
        method=request.method,
        url=str(request.url),
        headers=request.headers,
        query=list(request.query_params.multi_items()),
        body=body,
        include_query=include_query,
    )


def _consent_page(
    snap: HTTPSnapshot, client_id: str, scope: str, message: str = "", status: int = 200
) -> HTMLResponse:
    query = snap.url.split("?", 1)[1] if "?" in snap.url else ""
    hint = dict(snap.query).get("login_hint", "")
    e = html.escape
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Authorize {e(client_id)}</title></head>
<body>
<h1>Authorize <span id="client">{e(client_id)}</span></h1>
<p>Requested scope: <span id="scope">{e(scope) or "(none)"}</span></p>
{f'<p id="error" style="color:red">{e(message)}</p>' if message else ""}
<form id="consent" method="post" action="/authorize?{e(query)}">
  <label for="username">Username</label>
  <input id="username" name="username" type="text" value="{e(hint)}" autocomplete="username">
  <button id="allow" type="submit" name="decision" value="allow">Allow</button>
  <button id="deny" type="submit" name="decision" value="deny">Deny</button>
</form>
</body></html>"""
    return HTMLResponse(page, status_code=status)


def _error_page(error: OAuth2Error) -> HTMLResponse:
    e = html.escape
    text = f"{error.error}: {error.get_error_description() or ''}"
    return HTMLResponse(
        f'<!doctype html><html><body><h1>Authorization error</h1><p id="error">{e(text)}</p>'
        "</body></html>",
        status_code=400,
    )


def build_app(srv: AuthServer) -> Starlette:
    oauth = srv.oauth
    store = srv.store
    cfg = srv.config

    def with_iss(resp: Response) -> Response:
        loc = resp.headers.get("location")
        if loc and cfg.include_iss and "iss" not in dict(parse_qsl(urlsplit(loc).query)):
            resp.headers["location"] = add_params_to_uri(loc, [("iss", srv.issuer)])
        return resp

    def authorization_error(err: OAuth2Error) -> Response:
        if err.redirect_uri:  # the client and redirect_uri were validated: tell the client
            return with_iss(oauth.handle_error_response(None, err))
        return _error_page(err)  # never redirect to an unvalidated URI

    def approve(snap: HTTPSnapshot, user: User | None) -> Response:
        with store.lock:
            try:
                grant = oauth.get_consent_grant(snap, end_user=user)
            except OAuth2Error as err:
                return authorization_error(err)
            resp: Response = oauth.create_authorization_response(
                request=grant.request, grant_user=user, grant=grant
            )
        loc = resp.headers.get("location")
        if loc and user is not None and cfg.callback_params:
            # Values some providers add to a successful callback (QuickBooks' realmId).
            resp.headers["location"] = add_params_to_uri(loc, list(cfg.callback_params.items()))
        return resp

    async def authorize(request: Request) -> Response:
        snap = await snapshot(request, include_query=True)
        if request.method == "GET":
            if cfg.auto_approve:
                hint = dict(snap.query).get("login_hint") or cfg.auto_approve_user
                return approve(snap, User(hint))
            with store.lock:
                try:
                    grant = oauth.get_consent_grant(snap)
                except OAuth2Error as err:
                    return authorization_error(err)
            return _consent_page(snap, grant.client.client_id, grant.request.scope or "")
        form = dict(reversed(snap.body))
        if form.get("decision") == "allow":
            username = form.get("username", "").strip()
            if not username:
                client_id = dict(snap.query).get("client_id", "")
                return _consent_page(
                    snap,
                    client_id,
                    dict(snap.query).get("scope", ""),
                    "Enter a username.",
                    status=400,
                )
            return approve(snap, User(username))
        return approve(snap, None)  # Deny -> error=access_denied

    def record(
        endpoint: str,
        snap: HTTPSnapshot,
        grant_type: str | None = None,
        family_id: str | None = None,
    ) -> RequestRecord:
        rec = RequestRecord(
            endpoint=endpoint,
            method=snap.method,
            path=urlsplit(snap.url).path,
            headers={k.lower(): v for k, v in snap.headers.items()},
            params=dict(reversed(snap.body)),
            grant_type=grant_type,
            family_id=family_id,
        )
        store.requests.append(rec)
        return rec

    Handled = tuple[Response, str | None]  # the response, and its OAuth error code if any

    async def run(
        rec: RequestRecord, fault: Fault | None, handle: Callable[[], Handled]
    ) -> Response:
        error = None
        if fault is None:
            resp, error = handle()
        else:
            rec.fault = fault.kind
            if fault.kind == "error":
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(int(fault.retry_after))
                default = "Too Many Requests" if fault.status == 429 else "Internal Server Error"
                resp = PlainTextResponse(fault.body or default, fault.status, headers=headers)
            elif fault.kind == "delay":
                await srv.sleep(fault.seconds)
                resp, error = handle()
            else:  # timeout
                if fault.process:
                    resp, error = handle()
                    await srv.sleep(fault.seconds)
                else:
                    await srv.sleep(fault.seconds)
                    resp = PlainTextResponse("Gateway Timeout", 504)
        with store.lock:
            rec.status = resp.status_code
            rec.error = error
        return resp

    def shape_token_response(resp: OAuth2Response) -> Handled:
        payload: Any = resp.payload
        error = payload.get("error") if isinstance(payload, dict) else None
        out: Response
        if resp.status_code == 200 and isinstance(payload, dict):
            body: dict[str, Any] = dict(payload)
            if cfg.response_shape == "slack":
                tok = store.by_access.get(payload["access_token"])
                user_id = f"U_{tok.username}" if tok and tok.username else None
                body = {
                    "ok": True,
                    "app_id": "A0TEST",
                    "authed_user": {"id": user_id, **payload},
                    "team": {"id": cfg.team_id, "name": "Test Team"},
                    "enterprise": None,
                    "is_enterprise_install": False,
                }
            body.update(cfg.extra_token_fields)
            out = JSONResponse(body, headers=NO_STORE)
        elif error and cfg.response_shape == "slack" and cfg.slack_errors_as_200:
            out = JSONResponse({"ok": False, "error": error}, headers=NO_STORE)
        else:
            out = resp
        return out, error

    async def token(request: Request) -> Response:
        snap = await snapshot(request, allow_json=cfg.accept_json_token_requests)
        params = dict(reversed(snap.body))
        grant_type = params.get("grant_type")
        with store.lock:
            store.token_requests[grant_type or ""] += 1
            family_id = None
            if grant_type == "refresh_token":
                tok = store.by_refresh.get(params.get("refresh_token", ""))
                if tok is not None:
                    family_id = tok.family.id
                    store.refresh_requests[family_id] += 1
                    tok.presented += 1
            rec = record("token", snap, grant_type, family_id)

        def handle() -> Handled:
            with store.lock:
                resp: OAuth2Response = oauth.create_token_response(snap)
                if isinstance(resp.payload, dict) and resp.payload.get("error") == "invalid_grant":
                    store.invalid_grant += 1
                return shape_token_response(resp)

        return await run(rec, srv.faults.take("token", grant_type), handle)

    async def revoke(request: Request) -> Response:
        snap = await snapshot(request)
        with store.lock:
            rec = record("revoke", snap)

        def handle() -> Handled:
            with store.lock:
                resp: OAuth2Response = oauth.create_endpoint_response("revocation", snap)
            return resp, resp.payload.get("error") if isinstance(resp.payload, dict) else None

        return await run(rec, srv.faults.take("revoke", None), handle)

    async def revoke_app_token(request: Request) -> Response:
        # GitHub's non-RFC revocation: DELETE /applications/{client_id}/token, the app's
        # id and secret in Basic auth, {"access_token"} as JSON; 204 when revoked.
        snap = await snapshot(request, allow_json=True)
        with store.lock:
            rec = record("revoke_app_token", snap)

        def handle() -> Handled:
            client_id = request.path_params["client_id"]
            given = request.headers.get("authorization", "")
            with store.lock:
                client = store.clients.get(client_id)
                expected = base64.b64encode(
                    f"{client_id}:{client.client_secret}".encode()
                ).decode() if client is not None else None
                if expected is None or not hmac.compare_digest(given, f"Basic {expected}"):
                    return JSONResponse({"message": "Requires authentication"}, 401), None
                tok = store.by_access.get(dict(snap.body).get("access_token", ""))
                if tok is None or tok.client_id != client_id:
                    return JSONResponse({"message": "Not Found"}, 404), None
                store.revoke_family(tok.family, "revoked_by_app")
            return Response(status_code=204), None

        return await run(rec, srv.faults.take("revoke_app_token", None), handle)

    async def me(request: Request) -> Response:
        snap = await snapshot(request)
        with store.lock:
            rec = record("api", snap)

        def handle() -> Handled:
            with store.lock:
                try:
                    tok = oauth.resource_protector.validate_request(
                        None, oauth.create_oauth2_request(snap)
                    )
                except OAuth2Error as err:
                    return oauth.handle_response(*err()), err.error
                return JSONResponse(
                    {
                        "sub": tok.username or tok.client_id,
                        "username": tok.username,
                        "client_id": tok.client_id,
                        "scope": tok.scope,
                    }
                ), None

        return await run(rec, srv.faults.take("api", None), handle)

    async def metadata(request: Request) -> Response:
        return JSONResponse(srv.metadata())

    return Starlette(
        routes=[
            Route("/authorize", authorize, methods=["GET", "POST"]),
            Route("/token", token, methods=["POST"]),
            Route("/revoke", revoke, methods=["POST"]),
            Route("/applications/{client_id}/token", revoke_app_token, methods=["DELETE"]),
            Route("/api/me", me, methods=["GET"]),
            Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
            *app_routes(srv),
        ]
    )
