"""URL templates: a provider's URLs with ``{name}`` placeholders over user-supplied values.

Every URL the broker sends a credential to (an API-key ``verify.url``; an OAuth2
provider's ``authorization_url``, ``token_url``, ``refresh_url``, ``revocation_url``; a
client-credentials ``token_url``) is a template. A value comes from a user, so it is
hostile: it must never choose where the request goes. Two pure steps keep it so.

At load, ``check_template(template, fields, allowed_hosts)`` refuses (ValueError):

- a template that is not ``http(s)://`` followed by a literal or templated host, or that
  has a format spec, a conversion or an attribute in a placeholder;
- a placeholder in the scheme, the userinfo or the port (never allowed);
- a placeholder naming no field, a field without a ``pattern``, or an optional field
  without a default;
- without ``allowed_hosts``: a template that lets a value form the host (``http://{d}/``,
  ``https://api.{company}.com``, ``https://{x}zendesk.com``: anything but labels in front
  of a fixed registrable domain, like ``https://{sub}.zendesk.com``), and a templated host
  label whose field's pattern admits a dot (decided by ``patterns.admits``);
- with ``allowed_hosts``: a literal host that none of them matches.

At use, ``render_url(template, values, allowed_hosts=...)`` percent-encodes every value
(nothing but ``A-Za-z0-9-._~`` survives, so a value adds no ``/``, ``?``, ``#``, ``@``,
``:`` or ``%``) and refuses (InvalidInput naming the field) a templated host that is not
a plain host name, a value that puts a dot in a host label or forms the host when no
``allowed_hosts`` are given, a host that matches none of ``allowed_hosts`` when they are,
and a value that makes a path segment ``.`` or ``..`` (path climbing). Render-time checks
hold even for a caller that forgets ``allowed_hosts``: it fails closed.

``allowed_hosts`` entries are host names (``api.example.com``, exact) or ``*.`` suffixes
(``*.zendesk.com``: any host under zendesk.com, not zendesk.com itself).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

from .errors import InvalidInput
from .patterns import admits

__all__ = [
    "check_allowed_hosts",
    "check_template",
    "host_allowed",
    "parse_template",
    "render_url",
    "template_names",
]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# Placeholders become these while the template's structure is worked out: characters no
# URL parser treats as a delimiter, and that no literal text may contain.
_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")


class Field(Protocol):
    """What the template check needs of a field (``catalog.FieldSpec`` is one)."""

    @property
    def pattern(self) -> str | None: ...
    @property
    def required(self) -> bool: ...
    @property
    def default(self) -> str | None: ...


@dataclass(frozen=True)
class Template:
    """A URL template taken apart. ``pieces`` alternate literal text and placeholder names;
    the sets say where each placeholder lands."""

    text: str
    pieces: tuple[tuple[str, str | None], ...]
    names: frozenset[str]
    host: str | None
    """The literal host, or None when a placeholder is in it."""
    host_labels: frozenset[str]
    """Placeholders inside host labels in front of a fixed registrable domain."""
    forms_host: frozenset[str]
    """Placeholders that let a value form the host (anything else in the host)."""
    path_segments: tuple[bool, ...]
    """For each ``/``-separated segment of the path: whether a placeholder is in it."""


def template_names(template: str) -> set[str]:
    """The placeholder names in ``template`` (``{name}``)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@lru_cache(maxsize=512)
def parse_template(template: str) -> Template:
    """``template`` taken apart; ValueError when it is not a URL template the broker
    accepts (see the module docstring)."""
    if any(c in template for c in (_OPEN, _CLOSE)) or any(
        ord(c) < 0x21 or ord(c) == 0x7F for c in template
    ):
        raise ValueError(f"URL {template!r} contains spaces or control characters")
    pieces: list[tuple[str, str | None]] = []
    skeleton = ""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"URL {template!r} has unbalanced braces ({exc})") from None
    for literal, name, spec, conversion in parsed:
        if name is not None and (spec or conversion or not _NAME.fullmatch(name)):
            raise ValueError(
                f"URL {template!r}: a placeholder is a plain field name, like {{subdomain}}"
            )
        pieces.append((literal, name))
        skeleton += literal
        if name is not None:
            skeleton += f"{_OPEN}{len(names)}{_CLOSE}"
            names.append(name)

    def named(text: str) -> set[str]:
        return {names[int(i)] for i in _SENTINEL.findall(text)}

    lowered = skeleton.lower()
    if not lowered.startswith(("https://", "http://")):
        raise ValueError(f"URL {template!r} must start with https:// (or http://)")
    parts = urlsplit(skeleton)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if named(userinfo):
        raise ValueError(f"URL {template!r}: a placeholder cannot be in the user name part")
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    if named(port):
        raise ValueError(f"URL {template!r}: a placeholder cannot be in the port")
    if not host:
        raise ValueError(f"URL {template!r} has no host")

    labels = host.split(".")
    templated = [i for i, label in enumerate(labels) if named(label)]
    host_labels: set[str] = set()
    forms_host: set[str] = set()
    if templated:
        fixed = labels[templated[-1] + 1 :]
        in_host = named(host)
        # Values may fill labels only in front of a fixed registrable domain (two labels
        # at least, not an IP address): anything less and a value picks the site.
        if len(fixed) < 2 or "" in fixed or fixed[-1].isdigit():
            forms_host = in_host
        else:
            host_labels = in_host
    path_segments = tuple(bool(named(segment)) for segment in parts.path.split("/"))
    return Template(
        text=template,
        pieces=tuple(pieces),
        names=frozenset(names),
        host=None if templated else host.lower(),
        host_labels=frozenset(host_labels),
        forms_host=frozenset(forms_host),
        path_segments=path_segments,
    )


def check_allowed_hosts(entries: Sequence[str]) -> list[str]:
    """``entries`` lowercased; ValueError for one that is not a host name or ``*.`` and a
    registrable domain (``*.com`` would allow anything)."""
    out = []
    for entry in entries:
        value = entry.lower()
        suffix = value.removeprefix("*.")
        if not _HOST.fullmatch(suffix) or (value != suffix and suffix.count(".") < 1):
            raise ValueError(
                f"allowed_hosts: {entry!r} is not a host name (api.example.com) or a suffix "
                "of one (*.example.com)"
            )
        out.append(value)
    return out


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``host`` is one of ``allowed_hosts`` or under one of their ``*.`` suffixes."""
    host = host.lower()
    for entry in allowed_hosts:
        entry = entry.lower()
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def check_template(
    template: str, fields: Mapping[str, Field], allowed_hosts: Sequence[str] = ()
) -> None:
    """Refuse (ValueError, naming what is wrong) a template the broker must not render
    over these fields; see the module docstring for the rules."""
    parsed = parse_template(template)
    unknown = parsed.names - set(fields)
    if unknown:
        raise ValueError(f"URL {template!r} names {sorted(unknown)} which are not fields")
    unchecked = sorted(n for n in parsed.names if fields[n].pattern is None)
    if unchecked:
        # A user-supplied value in a URL could point the request (and the credential it
        # carries) somewhere else: it must be held to a pattern.
        raise ValueError(
            f"URL {template!r} uses {unchecked}, which have no pattern; give each a "
            "pattern (e.g. ^[a-z0-9-]{1,63}$ for a subdomain)"
        )
    optional = sorted(
        n for n in parsed.names if not (fields[n].required or fields[n].default)
    )
    if optional:
        raise ValueError(f"URL {template!r} uses optional {optional} without a default")
    if allowed_hosts:
        if parsed.host is not None and not host_allowed(parsed.host, allowed_hosts):
            raise ValueError(f"URL {template!r}: its host is not in allowed_hosts")
        return
    if parsed.forms_host:
        raise ValueError(
            f"URL {template!r} lets {sorted(parsed.forms_host)} form the host; put values "
            "only in labels in front of a fixed domain (https://{sub}.example.com), or "
            "list the hosts it may reach under allowed_hosts (*.example.com)"
        )
    dotted = sorted(
        n for n in parsed.host_labels if admits(fields[n].pattern or ".", ".")
    )
    if dotted:
        raise ValueError(
            f"URL {template!r}: the pattern of {dotted} admits a dot, so a value could "
            "choose the host; make it one label (^[a-z0-9-]{1,63}$), or list the hosts "
            "it may reach under allowed_hosts"
        )


def _refuse(name: str | None) -> InvalidInput:
    label = f"The value of {name!r}" if name else "A value"
    return InvalidInput(f"{label} cannot be used in the provider's address.", field=name)


def render_url(
    template: str, values: Mapping[str, str], *, allowed_hosts: Sequence[str] = ()
) -> str:
    """``template`` with each ``{name}`` replaced by the percent-encoded value.

    Raises KeyError naming a missing value, InvalidInput naming the field whose value
    cannot be used here (see the module docstring), ValueError for a template that
    ``parse_template`` refuses.
    """
    parsed = parse_template(template)
    rendered = "".join(
        literal + ("" if name is None else quote(str(values[name]), safe=""))
        for literal, name in parsed.pieces
    )
    parts = urlsplit(rendered)
    host = (parts.hostname or "").lower()
    in_host = parsed.host_labels | parsed.forms_host
    first = min(in_host) if in_host else None
    if in_host:
        if not _HOST.fullmatch(host) or len(host) > 253:
            raise _refuse(first)
        if not allowed_hosts:
            if parsed.forms_host:
                raise _refuse(min(parsed.forms_host))
            dotted = sorted(n for n in parsed.host_labels if "." in values[n])
            if dotted:
                raise _refuse(dotted[0])
    if allowed_hosts and not host_allowed(host, allowed_hosts):
        raise _refuse(first)
    segments = parts.path.split("/")
    if len(segments) != len(parsed.path_segments):  # a value added a '/': cannot happen
        raise _refuse(None)
    for segment, templated in zip(segments, parsed.path_segments, strict=True):
        if templated and unquote(segment) in (".", ".."):
            names = [n for literal, n in parsed.pieces if n is not None]
            climbing = [n for n in names if values[n] in (".", "..")]
            raise _refuse(climbing[0] if climbing else None)
    return rendered
