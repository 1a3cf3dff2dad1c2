"""Access log without query strings.

uvicorn's access log prints the full request target, which here can hold a live connect
session (``?session=bcs_...``) or an authorization code and state (the OAuth2 callback).
This logs the method, the path, the status and the time taken — never the query; for
the proxy route, also the integration, the provider's status and the refreshes forced.

The path is percent-decoded (``%0a`` is a newline by then) and none of it is trusted:
control characters are escaped here (``escape_control``), so each request is one line
even under a logging config other than the broker's own.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import escape_control, fields

LOG_KEY = "broker.proxy"
"""Where the proxy route leaves what its access log line adds (in the scope's state)."""

__all__ = ["AccessLog"]

log = logging.getLogger("broker.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if log.isEnabledFor(logging.INFO):
                self._log(scope, status, started)

    @staticmethod
    def _log(scope: Scope, status: int, started: float) -> None:
        client = scope.get("client")
        proxied = (scope.get("state") or {}).get(LOG_KEY) or {}
        took = time.perf_counter() - started
        address = escape_control(str(client[0])) if client else "-"
        method = escape_control(scope.get("method", "-"))
        path = escape_control(scope.get("path", "-"))
        log.info(
            '%s "%s %s" %d %.1fms%s', address, method, path, status, took * 1000,
            _proxied(proxied) if proxied else "",
            extra=fields(
                event="request", client=address, method=method, path=path,
                status=status, duration=took,
                integration=proxied.get("integration"),
                upstream_status=proxied.get("upstream_status"),
                refreshes=proxied.get("refreshes"),
            ),
        )


def _proxied(info: dict[str, object]) -> str:
    """What a proxied call adds to its line: the integration, the provider's status (``-``
    when it gave none) and the refreshes the call forced."""
    return " integration={} upstream={} refreshes={}".format(
        info.get("integration", "-"), info.get("upstream_status", "-"),
        info.get("refreshes", 0),
    )
