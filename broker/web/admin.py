"""``/admin``: the operator's read-only page, entered only through ``broker admin-link``.

    GET  /admin/enter   a page that reads the link's token from its fragment and posts it
    POST /admin/enter   {"token"} from that page (Origin: public_url's): sets the cookie
    GET  /admin         the page (with the cookie), or how to get in (without)

The cookie (``broker_admin``: HttpOnly, SameSite=Strict, Path=/admin, Secure under https,
one hour) holds a session token whose hash is stored (``broker.admin``). The pages have
the connect page's headers: a CSP with no inline script or style, no framing, no referrer,
no caching. No credential is ever read for them (see ``overview``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..admin import SESSION_TTL, redeem_link, session_ends
from ..errors import Forbidden, InvalidInput
from ..overview import overview
from .adminpage import enter_body, render_admin
from .bodies import parse_json_object, read_body
from .context import NO_STORE, broker_of
from .csrf import from_own_origin
from .pages import PAGE_HEADERS, START_HEADERS, page

__all__ = ["COOKIE", "admin_page", "enter_page", "enter_redeem"]

COOKIE = "broker_admin"
REFUSED = ("This link was already used or has expired. Run `broker admin-link` for a new "
           "one.")
NO_SESSION = "Open a link from `broker admin-link` (it works once, for 5 minutes)."


async def enter_page(request: Request) -> Response:
    text = page(title="Broker · operator", stylesheet="broker.css", data_id="broker-enter",
                data={"refused": REFUSED}, scripts=["admin-enter.js"],
                body=enter_body("Signing you in…"))
    return HTMLResponse(text, headers=START_HEADERS)


async def enter_redeem(request: Request) -> Response:
    broker = broker_of(request)
    if not from_own_origin(request.headers, broker.settings.public_origin):
        raise Forbidden("The operator page is entered only from its own link.")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise InvalidInput("Expected a JSON body.", field="token")
    token = parse_json_object(await read_body(request, limit=4096)).get("token")
    if not isinstance(token, str) or len(token) > 200:
        raise InvalidInput("token is missing or malformed.", field="token")
    async with broker.session() as db, db.begin():
        session = await redeem_link(db, token, now=broker.now())
    if session is None:
        return JSONResponse({"error": {"code": "link_refused", "message": REFUSED}},
                            status_code=403, headers=NO_STORE)
    response = JSONResponse({"location": "/admin"}, headers=NO_STORE)
    response.set_cookie(
        COOKIE, session, max_age=int(SESSION_TTL.total_seconds()), path="/admin",
        httponly=True, secure=broker.settings.public_url.startswith("https://"),
        samesite="strict",
    )
    return response


async def admin_page(request: Request) -> Response:
    broker = broker_of(request)
    token = request.cookies.get(COOKIE, "")
    now = broker.now()
    async with broker.session() as db:
        ends = await session_ends(db, token, now=now) if token else None
        if ends is None:
            text = page(title="Broker · operator", stylesheet="broker.css",
                        data_id="broker-admin", data={}, scripts=[],
                        body=enter_body(NO_SESSION))
            return HTMLResponse(text, status_code=401, headers=PAGE_HEADERS)
        found = await overview(db, now=now)
    return HTMLResponse(render_admin(found, session_ends=ends), headers=PAGE_HEADERS)
