"""Issue 11, item 6: an anonymous request cannot forge a log line.

The broker is served by uvicorn on 127.0.0.1 with logging configured as ``broker serve``
configures it, and sent raw requests whose path percent-encodes control characters (the
access log writes the decoded path), or whose method or header holds one. Every line
printed must then start a record, and hold no control character.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable
from urllib.parse import urlsplit

from broker.config import Settings
from broker.runtime import Broker
from broker.web import create_app
from tests import logging_support
from tests.logging_support import RECORD_START
from tests.support import serve

served_logging = logging_support.served_logging

FORGED = "2026-01-01 00:00:00,000 INFO broker.access: 10.0.0.1 \"GET /admin\" 200 0.1ms"
# (percent-encoded in the path, as the access log must print it)
CONTROLS = {
    "%0a": "\\n",
    "%0d": "\\r",
    "%00": "\\x00",
    "%09": "\\t",
    "%1b[2K": "\\x1b[2K",  # a terminal's "erase line"
    "%7f": "\\x7f",
    "%c2%85": "\\x85",  # NEL
    "%e2%80%a8": "\\u2028",  # LINE SEPARATOR
    "%e2%80%ae": "\\u202e",  # RIGHT-TO-LEFT OVERRIDE
}


async def send_raw(url: str, head: bytes) -> bytes:
    """Send ``head`` (a request line and headers, as bytes) to ``url``; the status line."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head)
        await writer.drain()
        return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


def get(path: str, *, method: bytes = b"GET", header: bytes = b"X-Test: 1") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: broker.test\r\n%s\r\nConnection: close\r\n\r\n" % (
        method, path.encode(), header,
    )


async def test_control_characters_from_a_request_are_escaped_one_line_per_record(
    broker: Broker, served_logging: Callable[[Settings, str], logging.Handler]
) -> None:
    handler = served_logging(broker.settings, "info")
    forged_path = "/x%0a" + FORGED.replace(" ", "%20").replace('"', "%22")
    async with serve(create_app(broker)) as url:
        status = await send_raw(url, get(forged_path))
        assert status.startswith(b"HTTP/1.1 401"), status  # anonymous: refused, logged
        for encoded in CONTROLS:
            status = await send_raw(url, get(f"/groups/g{encoded}1/integrations"))
            assert status.startswith(b"HTTP/1.1 401"), status
        # A header with control characters: h11 passes it to the app (no log line prints a
        # header); httptools (the C parser, uvicorn's default when installed) refuses it
        # with a 400 before the app. A method the server refuses.
        status = await send_raw(url, get("/h", header=b"X-Test: a\x1b[2Kb\x7f"))
        header_reached_app = status.startswith(b"HTTP/1.1 401")
        assert header_reached_app or status.startswith(b"HTTP/1.1 400"), status
        status = await send_raw(url, get("/m", method=b"G\x01T"))
        assert status.startswith(b"HTTP/1.1 400"), status

    lines = logging_support.output(handler).splitlines()
    for line in lines:
        assert re.match(RECORD_START, line), f"a line that starts no record: {line!r}"
        assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]", line), line
    access = [line for line in lines if " broker.access: " in line]
    assert len(access) == 1 + len(CONTROLS) + header_reached_app, lines
    assert access[0].split(": ", 1)[1].startswith('127.0.0.1 "GET /x\\n2026-01-01 00:00:00,000')
    for line, escaped in zip(access[1:1 + len(CONTROLS)], CONTROLS.values(), strict=True):
        assert f'"GET /groups/g{escaped}1/integrations" 401 ' in line, line
    if header_reached_app:
        assert '"GET /h" 401 ' in access[-1]


async def test_json_lines_stay_one_record_each_with_the_path_as_a_field(
    broker: Broker, served_logging: Callable[[Settings, str], logging.Handler]
) -> None:
    handler = served_logging(broker.settings.model_copy(update={"log_format": "json"}), "info")
    async with serve(create_app(broker)) as url:
        for encoded in CONTROLS:
            status = await send_raw(url, get(f"/groups/g{encoded}1/integrations"))
            assert status.startswith(b"HTTP/1.1 401"), status
        status = await send_raw(url, get("/x%0a" + FORGED.replace(" ", "%20")))
        assert status.startswith(b"HTTP/1.1 401"), status

    lines = logging_support.output(handler).splitlines()
    records = [json.loads(line) for line in lines]  # each line is one whole object
    access = [r for r in records if r["logger"] == "broker.access"]
    assert len(access) == len(CONTROLS) + 1, lines
    for record, escaped in zip(access[:-1], CONTROLS.values(), strict=True):
        assert record["event"] == "request" and record["status"] == 401
        assert record["method"] == "GET" and record["path"] == f"/groups/g{escaped}1/integrations"
        assert record["duration_ms"] >= 0
    assert access[-1]["path"].startswith("/x\\n2026-01-01")
    for line in lines:
        assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]", line), line


async def test_the_access_log_is_escaped_under_a_host_applications_own_logging(
    broker: Broker,
) -> None:
    """The broker embedded in another application (``create_app``), whose logging has
    none of the broker's handler: the access log escapes what it writes itself."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(logging_support.FORMAT))
    access = logging.getLogger("broker.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        async with serve(create_app(broker)) as url:
            status = await send_raw(url, get("/x%0d%0a" + FORGED.replace(" ", "%20")))
            assert status.startswith(b"HTTP/1.1 401"), status
    finally:
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and re.match(RECORD_START, lines[0]), lines
    assert '"GET /x\\r\\n2026-01-01 00:00:00,000 INFO broker.access: 10.0.0.1' in lines[0]
