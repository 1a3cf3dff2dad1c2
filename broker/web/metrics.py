"""``GET /metrics``: the Prometheus text exposition (``broker.metrics``).

Off unless ``metrics.enabled`` (then a 404, as for any unknown path). With ``metrics.token``
a scrape must send ``Authorization: Bearer <token>``; without one, only clients whose
address is in ``metrics.allow`` (loopback by default) may scrape. Refusals are 403 with no
detail. The service token is never asked for: a scraper should not hold it.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request
from starlette.responses import Response

from ..errors import NotFound
from .context import broker_of

__all__ = ["metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _allowed(request: Request) -> bool:
    settings = broker_of(request).settings.metrics
    if settings.token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), settings.token.get_secret_value().encode()
        )
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in settings.allow)


async def metrics(request: Request) -> Response:
    broker = broker_of(request)
    if not broker.settings.metrics.enabled:
        raise NotFound("Not found.")
    if not _allowed(request):
        return Response("forbidden\n", 403, media_type="text/plain")
    body = await broker.metrics.scrape(
        broker.database, now=broker.now(),
        interval=broker.settings.refresh.interval_seconds,
    )
    return Response(body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})
