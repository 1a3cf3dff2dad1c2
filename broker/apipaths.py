"""Paths under a provider's base URL: what a caller may ask for. Pure functions.

A caller names a path under the provider's API (``/user``, ``repos/o/r/issues``) and the
broker sends the credential there. The path must never leave the base URL, whatever its
spelling, so a path is refused (InvalidInput, field ``path``) when it has:

- a ``.`` or ``..`` segment, raw or percent-encoded (``%2e%2E``), which a server or an
  intermediary could resolve upwards;
- an encoded slash or backslash (``%2f``, ``%5c``) or a raw backslash, which some
  servers decode into a separator after the broker's check;
- an empty segment (``//host`` would read as an authority to some parsers, and
  ``https://host`` has one too);
- a NUL, a control character, a space, or a
  ``#``/``?`` (the query travels separately);
- invalid percent-encoding.

Nothing is normalised: a path is sent exactly as checked, so what was checked is what the
provider sees.
"""

from __future__ import annotations

import re

import httpx

from .errors import InvalidInput

__all__ = ["check_path", "join", "within"]

_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODED_SEPARATOR = re.compile(r"%(2[fF]|5[cC]|00)")
# RFC 3986 pchar plus "/": unreserved, pct-encoded, sub-delims, ":" and "@".
_ALLOWED = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:@/]*")


def _refuse(why: str) -> InvalidInput:
    return InvalidInput(f"The path cannot be used: {why}.", field="path")


def check_path(path: str) -> str:
    """``path`` (raw, percent-encoded, with or without a leading ``/``) without its
    leading ``/``, or InvalidInput saying why it cannot be used (see the module doc)."""
    if not _ALLOWED.fullmatch(path):
        raise _refuse("it contains characters that must be percent-encoded, a '\\', "
                      "a '?' or a '#'")
    if _PCT.search(path):
        raise _refuse("it has a '%' that is not followed by two hex digits")
    if _ENCODED_SEPARATOR.search(path):
        raise _refuse("it contains an encoded '/', '\\' or NUL")
    relative = path[1:] if path.startswith("/") else path
    if not relative:
        return ""
    segments = relative.split("/")
    for i, segment in enumerate(segments):
        if segment == "" and i != len(segments) - 1:
            raise _refuse("it has an empty segment ('//')")
        if re.sub("%2[eE]", ".", segment) in (".", ".."):
            raise _refuse("it has a '.' or '..' segment")
    return relative


def join(base_url: str, path: str, query: str = "") -> str:
    """``base_url`` + ``/`` + the checked ``path`` (+ ``?query``, raw). The base's own
    query, if any, is kept in front of the caller's."""
    relative = check_path(path)
    base = httpx.URL(base_url)
    root = base.raw_path.split(b"?", 1)[0].decode("ascii").rstrip("/")
    base_query = base.query.decode("ascii")
    full_query = "&".join(q for q in (base_query, query) if q)
    origin = f"{base.scheme}://{base.netloc.decode('ascii')}"
    url = f"{origin}{root}/{relative}"
    return f"{url}?{full_query}" if full_query else url


def within(base_url: str, url: httpx.URL) -> bool:
    """Whether ``url`` is ``base_url`` or under its path, on its origin, with a path that
    ``check_path`` accepts."""
    base = httpx.URL(base_url)
    if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
        return False
    root = base.raw_path.split(b"?", 1)[0].decode("ascii").rstrip("/")
    raw = url.raw_path.split(b"?", 1)[0].decode("ascii")
    if raw != root and not raw.startswith(root + "/"):
        return False
    try:
        check_path(raw[len(root) :])
    except InvalidInput:
        return False
    return True
