"""pytest fixtures for the test provider API.

``apiserver``: a fresh server per test whose ``/bearer`` routes validate tokens with this
test's ``authserver``. ``apiserver_factory(**config)``: more servers with their own
:class:`ApiServerConfig` fields; all stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.authserver import AuthServer

from .server import ApiServer


@pytest.fixture
def apiserver_factory() -> Iterator[Callable[..., ApiServer]]:
    started: list[ApiServer] = []

    def make(**config: Any) -> ApiServer:
        srv = ApiServer(**config).start()
        started.append(srv)
        return srv

    yield make
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def apiserver(apiserver_factory: Callable[..., ApiServer], authserver: AuthServer) -> ApiServer:
    return apiserver_factory(authserver_url=authserver.base_url)
