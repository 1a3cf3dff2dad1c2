"""pytest fixtures for the test authorization server.

``authserver``: a fresh server per test with default config (tests may change
``authserver.config`` at runtime). ``authserver_factory(**config)``: more servers with
their own config; all stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .server import AuthServer


@pytest.fixture
def authserver_factory() -> Iterator[Callable[..., AuthServer]]:
    started: list[AuthServer] = []

    def make(**config: Any) -> AuthServer:
        srv = AuthServer(**config).start()
        started.append(srv)
        return srv

    yield make
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def authserver(authserver_factory: Callable[..., AuthServer]) -> AuthServer:
    return authserver_factory()
