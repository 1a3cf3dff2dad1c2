"""Issue #11, item 9: slow clients cannot hold the broker's sockets forever.

Real sockets against a real ``broker serve`` (``server:`` set to 1-second deadlines and 3
connections): a client that sends nothing, or its headers a byte at a time, or its body a
byte at a time, is disconnected once its deadline passes; a request on a connection past
the cap gets the JSON 503. The controls: a kept-alive connection idle longer than the
header deadline still serves its next request, and a body that arrives in time is read.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.serve_support import Served, served_broker

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 10
MAX_CONNECTIONS = 3
GIVE_UP = 20.0  # a trickle still connected after this long was never going to be cut

CONFIG = f"""\
log_level: info
server:
  http: {{http}}
  header_timeout_seconds: {HEADER_TIMEOUT}
  body_timeout_seconds: {BODY_TIMEOUT}
  keep_alive_seconds: {KEEP_ALIVE}
  max_connections: {MAX_CONNECTIONS}
"""


@pytest.fixture(scope="module", params=["httptools", "h11"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """``broker serve`` with each HTTP parser: both carry the same deadlines."""
    config = CONFIG.replace("{http}", request.param)
    with served_broker(tmp_path_factory.mktemp("serve"), config) as served:
        yield served


def closed_by_server(sock: socket.socket, wait: float = 0.1) -> bool:
    """Whether the server has closed ``sock`` (reading any answer it sent first)."""
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def trickle(sock: socket.socket, data: bytes, *, forever: bytes) -> float:
    """Send ``data`` then ``forever`` one byte every 0.1 s, over and over, until the server
    closes the socket; return how long that took (or fail after ``GIVE_UP`` s)."""
    start = time.monotonic()
    sock.sendall(data)
    index = 0
    while time.monotonic() - start < GIVE_UP:
        try:
            sock.sendall(forever[index % len(forever):][:1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        index += 1
        if closed_by_server(sock):
            return time.monotonic() - start
    pytest.fail(f"still connected after {GIVE_UP} s of trickling")


def request(sock: socket.socket, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one request on ``sock`` and read its response (Content-Length framed)."""
    sock.settimeout(5)
    sock.sendall(head.encode() + body)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {buffer!r}"
        buffer += chunk
    raw_head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return status, headers, rest


def healthz() -> str:
    return "GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n"


def wait_until_alone(served: Served) -> None:
    """Let the server notice connections earlier tests closed (they count towards the cap)."""
    deadline = time.monotonic() + 5
    while True:
        with served.connect() as sock:
            status, _, _ = request(sock, healthz())
        if status == 200 or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def test_a_connection_that_sends_nothing_is_closed_after_the_header_deadline(
    served: Served,
) -> None:
    with served.connect() as sock:
        start = time.monotonic()
        while not closed_by_server(sock, wait=0.2):
            assert time.monotonic() - start < GIVE_UP, "an idle new connection was never closed"
        assert time.monotonic() - start >= HEADER_TIMEOUT * 0.9


def test_headers_sent_one_byte_at_a_time_forever_are_cut_off_after_the_header_deadline(
    served: Served,
) -> None:
    with served.connect() as sock:
        took = trickle(
            sock, b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Slow: ", forever=b"loris"
        )
    assert HEADER_TIMEOUT * 0.9 <= took < HEADER_TIMEOUT + 5, took
    assert "a request head took over 1 s" in served.log()


def test_a_body_sent_one_byte_at_a_time_is_cut_off_after_the_body_deadline(
    served: Served,
) -> None:
    head = (
        "POST /connect-sessions HTTP/1.1\r\nHost: broker\r\n"
        f"Authorization: Bearer {served.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    )
    with served.connect() as sock:
        took = trickle(sock, head.encode() + b'{"group_id": "', forever=b"g")
    assert BODY_TIMEOUT * 0.9 <= took < BODY_TIMEOUT + 5, took
    time.sleep(0.2)  # let the app log whatever it logs for the cut-off request
    log = served.log()
    assert "a request body took over 1 s" in log
    assert "Traceback" not in log and "unhandled error" not in log, log


def test_a_kept_alive_connection_idle_past_the_header_deadline_serves_its_next_request(
    served: Served,
) -> None:
    # The control for the header deadline: idle time between requests is keep-alive's.
    wait_until_alone(served)
    with served.connect() as sock:
        assert request(sock, healthz())[0] == 200
        time.sleep(HEADER_TIMEOUT * 2)
        assert request(sock, healthz())[0] == 200


def test_a_body_that_arrives_within_the_deadline_is_read(served: Served) -> None:
    # The control for the body deadline: a slow but timely body is not cut off.
    wait_until_alone(served)
    body = json.dumps({"group_id": "g1"}).encode()
    head = (
        "POST /connect-sessions HTTP/1.1\r\nHost: broker\r\n"
        f"Authorization: Bearer {served.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with served.connect() as sock:
        sock.sendall(head.encode() + body[:5])
        time.sleep(BODY_TIMEOUT / 2)
        status, _, answer = request(sock, "", body[5:])
    assert status == 201, answer
    assert json.loads(answer)["token"].startswith("bcs_")


def test_a_request_past_the_connection_cap_gets_the_json_503_and_is_closed(
    served: Served,
) -> None:
    wait_until_alone(served)
    held = [served.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # each has made a request and is kept alive
            assert request(sock, healthz())[0] == 200
        with served.connect() as extra:
            status, headers, body = request(extra, healthz())
            assert status == 503, body
            assert json.loads(body)["error"]["code"] == "service_unavailable"
            assert headers["connection"] == "close"
            assert closed_by_server(extra, wait=2)
        # The held connections are still served.
        assert request(held[0], healthz())[0] == 200
    finally:
        held.pop().close()
    try:
        # One slot free again: a new connection is served.
        time.sleep(0.2)
        with served.connect() as another:
            assert request(another, healthz())[0] == 200
    finally:
        for sock in held:
            sock.close()
    assert "refused 1 request(s): 4 connections open (server.max_connections is 3)" in (
        served.log()
    )
