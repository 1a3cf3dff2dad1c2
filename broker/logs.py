"""Logging: one handler on the root logger, and what it will not print.

``configure_logging(settings)`` is what every ``broker`` command does first. It puts one
handler on the root logger (stderr, ``log_level``), and everything logs through it —
uvicorn too (``broker serve`` gives uvicorn no logging config of its own).

No secret reaches it, at any level:

- Library loggers that print URLs, headers, request bodies, SQL parameters or rows are
  held at WARNING whatever ``log_level`` says (``QUIET``): httpx logs every request's URL
  at INFO — with an API key applied as a query parameter (``?appid=``) in it; httpcore
  logs each request and response at DEBUG; SQLAlchemy logs statements with their
  parameters and the rows read (ciphertext, hashes); aiosqlite logs every statement with
  its parameters at DEBUG; Authlib logs issued tokens (server side) at DEBUG. Their
  warnings and errors still show. APScheduler is held back too, for noise, not secrets:
  two INFO lines for every sweep.
- The engine is created with ``hide_parameters=True`` (``broker.store.database``): with
  SQLAlchemy's logger turned up, or in a database error's message, no parameters.
- Where the broker logs a URL itself, it logs ``redact_url(url)``: no userinfo, no query
  values.

No request can forge a line: every record's message has its control characters escaped
(``EscapeControl``: a newline becomes ``\\n``, an escape ``\\x1b``), and the text format
indents the lines that follow a record's first (a traceback), so every line that starts at
column 0 starts a record. Values from a request are also escaped where they are logged
(the access log), which keeps them safe under a host application's own logging config.

Two formats (``log_format``): ``text`` for people, and ``json`` — one JSON object per line
(python-json-logger), with ``time``, ``level``, ``logger``, ``message`` and the record's
fields. The broker's own lines name what they are about with ``fields(...)``: ``event``
(``refresh``, ``connect``, ``request``, ``sweep``...), ``group``, ``integration``,
``provider``, ``outcome``, ``duration_ms`` and a few more; ``FIELDS`` lists every name.
No field ever holds a secret: they are names, ids, outcomes and figures.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pythonjsonlogger.json import JsonFormatter

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "FIELDS",
    "FORMAT",
    "QUIET",
    "EscapeControl",
    "JsonLineFormatter",
    "TextFormatter",
    "configure_logging",
    "escape_control",
    "fields",
    "redact_url",
]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("httpx", "httpcore", "sqlalchemy", "aiosqlite", "authlib", "apscheduler")
"""Library loggers held at WARNING (or ``log_level``, if higher). APScheduler logs two
lines at INFO for every sweep ("Running job", "executed successfully"): the broker's own
sweep line says what a sweep did, and only when it did something."""

FIELDS = (
    "event", "group", "integration", "provider", "outcome", "duration_ms", "status",
    "method", "path", "client", "upstream_status", "refreshes", "count",
)
"""The names ``fields`` takes: what a JSON line may carry beside its message."""

REDACTED = "***"

# C0 and C1 controls and DEL, Unicode line and paragraph separators, and the bidirectional
# overrides and isolates (which reorder what a terminal shows).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``,
    ``\\u2028``); the rest unchanged. Backslashes are left as they are, so escaping twice
    changes nothing."""
    return _CONTROL.sub(_escape, text)


def redact_url(url: str) -> str:
    """``url`` fit to log: scheme, host, port and path kept; userinfo replaced by ``***``,
    each query value by ``***`` (names kept; a part with no ``=`` is replaced whole), a
    fragment by ``***``. A string that does not parse as a URL gives ``[invalid URL]``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "[invalid URL]"
    out = f"{parts.scheme}:" if parts.scheme else ""
    if parts.netloc:
        _, at, host = parts.netloc.rpartition("@")
        out += f"//{REDACTED}@{host}" if at else f"//{host}"
    out += parts.path
    if parts.query:
        out += "?" + "&".join(
            f"{name}={REDACTED}" if eq else (REDACTED if name else "")
            for name, eq, _ in (p.partition("=") for p in parts.query.split("&"))
        )
    if parts.fragment:
        out += f"#{REDACTED}"
    return out


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the named ``FIELDS`` that are not None (a duration in
    seconds is given as ``duration=`` and logged as ``duration_ms``, rounded to 0.1 ms).
    Strings have their control characters escaped."""
    duration = values.pop("duration", None)
    if duration is not None:
        values["duration_ms"] = round(duration * 1000, 1)
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise TypeError(f"not log fields: {sorted(unknown)}")
    return {
        name: escape_control(value) if isinstance(value, str) else value
        for name, value in values.items() if value is not None
    }


class EscapeControl(logging.Filter):
    """Renders each record's message and escapes its control characters (``msg`` becomes
    the escaped text, ``args`` None), whatever format prints it next."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A broken log call (arguments that do not fit its format): left for the
            # handler's emit, which reports it on stderr instead of raising in the caller.
            return True
        record.msg = escape_control(message)
        record.args = None
        return True


class TextFormatter(logging.Formatter):
    """``FORMAT``, one record per line: the lines that follow the first (a traceback,
    stack info) are indented and have their control characters escaped, so none of them
    can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = super().format(record).split("\n")
        return "\n".join([first, *(f"    {escape_control(line)}" for line in rest)])


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, then the record's ``fields`` and ``exc_info`` (a traceback, as one string).
    JSON escapes every control character, so a record is always one line."""

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(settings: Settings, *, stream: IO[str] | None = None) -> logging.Handler:
    """Log at ``settings.log_level`` to ``stream`` (stderr) through one root handler that
    escapes control characters, in ``settings.log_format``; hold the ``QUIET`` libraries at
    WARNING at least. A second call replaces the handler the first one installed. Returns
    the handler."""
    level = logging.getLevelName(settings.log_level.upper())
    assert isinstance(level, int), settings.log_level
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BrokerHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _BrokerHandler(stream or sys.stderr)
    handler.addFilter(EscapeControl())
    json_lines = settings.log_format == "json"
    handler.setFormatter(JsonLineFormatter() if json_lines else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return handler


class _BrokerHandler(logging.StreamHandler[IO[str]]):
    """The handler ``configure_logging`` installs (found again by its class)."""
