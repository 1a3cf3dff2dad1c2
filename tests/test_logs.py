"""broker/logs.py: redact_url, the escaping, the text format, and what configure_logging
sets. Pure functions and in-memory handlers; the attacks themselves are in
``tests/security/test_secret_logging.py`` and ``tests/security/test_log_forging.py``."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable

import pytest

from broker.config import Settings
from broker.logs import (
    QUIET,
    EscapeControl,
    JsonLineFormatter,
    TextFormatter,
    configure_logging,
    escape_control,
    fields,
    redact_url,
)
from tests import logging_support
from tests.logging_support import RECORD_START

served_logging = logging_support.served_logging


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("https://api.example.com/v1/items", "https://api.example.com/v1/items"),
        (
            "https://api.openweathermap.org/data/2.5/weather?lat=51.51&lon=-0.13&appid=KEY",
            "https://api.openweathermap.org/data/2.5/weather?lat=***&lon=***&appid=***",
        ),
        ("https://user:pass@hooks.example:8443/in?t=1", "https://***@hooks.example:8443/in?t=***"),
        ("https://TOKEN@hooks.example/in", "https://***@hooks.example/in"),
        ("https://a@b:c@hooks.example/", "https://***@hooks.example/"),  # the last @ ends it
        ("https://h.example/p?flag&x=&y=1", "https://h.example/p?***&x=***&y=***"),
        ("https://h.example/p?k=v#access_token=T", "https://h.example/p?k=***#***"),
        ("https://h.example/p?a=1;b=2", "https://h.example/p?a=***"),
        ("/relative/path?session=bcs_x", "/relative/path?session=***"),
        ("http://[::1/p?k=v", "[invalid URL]"),
    ],
)
def test_redact_url_keeps_where_and_drops_credentials(url: str, logged: str) -> None:
    assert redact_url(url) == logged


def test_escape_control_escapes_every_control_and_nothing_else() -> None:
    assert escape_control("GET /a\nb\r\t\x00\x1b[31m\x7f\x85\u2028\u2029\u202e\u2066") == (
        "GET /a\\nb\\r\\t\\x00\\x1b[31m\\x7f\\x85\\u2028\\u2029\\u202e\\u2066"
    )
    plain = "café ünïcode — 日本 \\n already escaped \U0001f600"
    assert escape_control(plain) == plain
    assert escape_control(escape_control("a\nb")) == "a\\nb"  # twice changes nothing


def render(record: logging.LogRecord) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapeControl())
    handler.setFormatter(TextFormatter())
    handler.handle(record)
    return stream.getvalue()


def test_a_message_with_control_characters_is_one_line() -> None:
    record = logging.LogRecord(
        "broker.web", logging.INFO, __file__, 1, "%s %s: %r", ("GET", "/x\n\rforged", 7), None
    )
    text = render(record)
    assert text.count("\n") == 1 and re.match(RECORD_START, text)
    assert text.rstrip("\n").endswith("INFO broker.web: GET /x\\n\\rforged: 7")
    assert render(record) == text  # a second handler sees the same message


def test_a_log_call_whose_arguments_do_not_fit_raises_nothing_in_the_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = logging.LogRecord("broker.web", logging.INFO, __file__, 1, "%s %s", ("one",), None)
    assert render(record) == ""  # reported by logging on stderr, as without the filter
    assert "--- Logging error ---" in capsys.readouterr().err


def test_a_traceback_is_indented_and_escaped_so_no_line_of_it_starts_a_record() -> None:
    forged = "\n2026-01-01 00:00:00,000 INFO broker.access: forged\r\x1b[2K"
    try:
        raise ValueError(f"bad value{forged}")
    except ValueError as exc:
        record = logging.LogRecord(
            "broker.web", logging.ERROR, __file__, 1, "unhandled error on %s", ("/p",),
            (type(exc), exc, exc.__traceback__),
        )
    lines = render(record).rstrip("\n").split("\n")
    assert re.match(RECORD_START, lines[0]) and lines[0].endswith("unhandled error on /p")
    assert lines[1] == "    Traceback (most recent call last):"
    assert all(line.startswith("    ") for line in lines[1:])
    assert lines[-2:] == [
        "    ValueError: bad value",
        "    2026-01-01 00:00:00,000 INFO broker.access: forged\\r\\x1b[2K",
    ]


@pytest.mark.parametrize(
    ("level", "root", "quiet"),
    [
        ("debug", logging.DEBUG, logging.WARNING),
        ("info", logging.INFO, logging.WARNING),
        ("error", logging.ERROR, logging.ERROR),
    ],
)
def test_configure_logging_levels(
    level: str, root: int, quiet: int, make_settings: Callable[..., Settings],
    served_logging: Callable[[Settings, str], logging.Handler],
) -> None:
    assert {"httpx", "httpcore", "sqlalchemy", "aiosqlite", "authlib"} <= set(QUIET)
    handler = served_logging(make_settings(), level)
    assert logging.getLogger().level == root
    for name in QUIET:
        assert logging.getLogger(name).getEffectiveLevel() == quiet
    # Below the library loggers: held too (they inherit).
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert not logging.getLogger("sqlalchemy.engine.Engine").isEnabledFor(logging.INFO)
    assert not logging.getLogger("aiosqlite").isEnabledFor(logging.DEBUG)
    logging.getLogger("broker.test").log(root, "shown\nforged")
    logging.getLogger("httpx").log(quiet, "a library warning\r\nstill shows")
    text = logging_support.output(handler)
    assert text.count("\n") == 2, text  # escaped, one line each
    assert "broker.test: shown\\nforged\n" in text
    assert "httpx: a library warning\\r\\nstill shows\n" in text


def test_configure_logging_twice_leaves_one_handler(
    make_settings: Callable[..., Settings],
    served_logging: Callable[[Settings, str], logging.Handler],
) -> None:
    first = served_logging(make_settings(), "info")
    second = served_logging(make_settings(), "info")
    root = logging.getLogger().handlers
    assert second in root and first not in root
    stream = io.StringIO()
    third = configure_logging(make_settings(), stream=stream)
    try:
        logging.getLogger("broker.test").warning("once")
        assert stream.getvalue().count("once") == 1
        assert "once" not in logging_support.output(second)
    finally:
        logging.getLogger().removeHandler(third)


def test_fields_keep_what_is_given_and_refuse_unknown_names() -> None:
    assert fields(event="refresh", group="g1", integration="acme", outcome=None,
                  duration=0.01234) == {
        "event": "refresh", "group": "g1", "integration": "acme", "duration_ms": 12.3,
    }
    assert fields(path="/a\nb") == {"path": "/a\\nb"}  # escaped like a message
    with pytest.raises(TypeError, match="access_token"):
        fields(access_token="t")  # a field is a name from FIELDS, never a value's own key
    assert "apscheduler" in QUIET  # its two INFO lines per sweep are held back


def test_a_json_line_is_one_object_with_the_records_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapeControl())
    handler.setFormatter(JsonLineFormatter())
    try:
        raise ValueError("bad\nvalue")
    except ValueError as exc:
        record = logging.LogRecord(
            "broker.refresh", logging.WARNING, __file__, 1, "refresh of %s failed", ("g1/a",),
            (type(exc), exc, exc.__traceback__),
        )
    for name, value in fields(event="refresh", group="g1", outcome="transient",
                              duration=0.5).items():
        setattr(record, name, value)  # what extra= does
    handler.handle(record)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    data = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])
    assert {k: data[k] for k in ("level", "logger", "message", "event", "group", "outcome",
                                 "duration_ms")} == {
        "level": "WARNING", "logger": "broker.refresh", "message": "refresh of g1/a failed",
        "event": "refresh", "group": "g1", "outcome": "transient", "duration_ms": 500.0,
    }
    assert data["exc_info"].endswith("ValueError: bad\nvalue")


def test_configure_logging_json(
    make_settings: Callable[..., Settings],
    served_logging: Callable[[Settings, str], logging.Handler],
) -> None:
    handler = served_logging(make_settings(log_format="json"), "info")
    assert isinstance(handler.formatter, JsonLineFormatter)
    logging.getLogger("broker.test").info("a\nb", extra=fields(event="sweep", count=3))
    (line,) = logging_support.output(handler).splitlines()
    data = json.loads(line)
    # (Other tests' capture filters may add attributes to records, which JSON lines carry
    # too: only these are asserted.)
    assert {k: data.get(k) for k in ("level", "logger", "message", "event", "count")} == {
        "level": "INFO", "logger": "broker.test", "message": "a\\nb", "event": "sweep",
        "count": 3,
    }
    assert "time" in data
