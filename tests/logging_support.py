"""Logging configured as ``broker serve`` configures it, written to a buffer the test reads.

Test modules bind the fixture at module level::

    from tests import logging_support
    served_logging = logging_support.served_logging

``served_logging(level)`` calls ``configure_logging`` (what every command calls, checked
against the CLI's source) and turns uvicorn's access log off the way
``uvicorn.Config(access_log=False)`` does (the servers in tests run with uvicorn's default,
on). It returns the handler; ``output(handler)`` is everything it printed. At teardown
the root handler, every logger's level and uvicorn's access logger are put back.
"""

from __future__ import annotations

import inspect
import io
import logging
from collections.abc import Callable, Iterator

import pytest
from starlette.applications import Starlette

from broker import cli
from broker.cli import common as cli_common
from broker.config import ServerSettings, Settings
from broker.logs import FORMAT, QUIET, configure_logging
from broker.web.server import build_server

__all__ = ["FORMAT", "RECORD_START", "output", "served_logging"]

# The first line of a record: "2026-01-01 12:00:00,123 INFO name: message".
RECORD_START = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "


@pytest.fixture
def served_logging(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[Settings, str], logging.Handler]]:
    assert "configure_logging(settings)" in inspect.getsource(cli_common.load_config)
    # What `broker serve` runs: uvicorn without its access log, logging through ours.
    assert "build_server(" in inspect.getsource(cli.serve.callback)  # type: ignore[arg-type]
    built = build_server(Starlette(), ServerSettings(), host="127.0.0.1", port=0,
                         log_level="debug")
    assert built.config.access_log is False and built.config.log_config is None
    root = logging.getLogger()
    names = ["", *QUIET, *logging.root.manager.loggerDict]
    saved = {name: logging.getLogger(name).level for name in names}
    installed: list[logging.Handler] = []

    def configure(settings: Settings, level: str) -> logging.Handler:
        access = logging.getLogger("uvicorn.access")
        monkeypatch.setattr(access, "handlers", [])
        monkeypatch.setattr(access, "propagate", False)
        handler = configure_logging(
            settings.model_copy(update={"log_level": level}), stream=io.StringIO()
        )
        installed.append(handler)
        return handler

    yield configure
    for handler in installed:
        root.removeHandler(handler)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def output(handler: logging.Handler) -> str:
    """What ``handler`` (one of ``served_logging``'s) has printed so far."""
    assert isinstance(handler, logging.StreamHandler)
    stream = handler.stream
    assert isinstance(stream, io.StringIO)
    return stream.getvalue()
