"""``urltemplates``: the load-time template check and the render-time checks. Pure: no I/O.

The property tests render hostile values (any text hypothesis can think of) and assert
that the result either is refused naming the field, or keeps the template's scheme, host,
port and path shape — the value lands where its placeholder is and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker import catalog
from broker.errors import InvalidInput
from broker.urltemplates import (
    check_allowed_hosts,
    check_template,
    host_allowed,
    parse_template,
    render_url,
)


@dataclass(frozen=True)
class F:
    pattern: str | None = "^[a-z0-9-]{1,63}$"
    required: bool = True
    default: str | None = None


LABEL = F()
DOTTED = F("^[a-z0-9.-]+$")
FIELDS = {"sub": LABEL, "id": F(r"^[^/]+$"), "dotted": DOTTED}


@pytest.mark.parametrize(
    "template",
    [
        "https://api.example.com/v1/me",
        "https://{sub}.zendesk.com/oauth/tokens",
        "https://{sub}-eu.api.example.com/x",
        "https://{sub}.{sub}.example.co.uk/x",
        "https://api.example.com/accounts/{id}/me?id={id}#{id}",
        "https://api.example.com/accounts/{dotted}/me",  # dots in a path are fine
        "http://127.0.0.1:8080/{sub}",
        "https://user@api.example.com/{sub}",
        "https://api.example.com/a{{literal}}b",
    ],
)
def test_templates_that_load_without_allowed_hosts(template: str) -> None:
    check_template(template, FIELDS)


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("https://{sub}/x", "form the host"),
        ("https://{sub}:443/x", "form the host"),
        ("https://api.{sub}.com/x", "form the host"),
        ("https://{sub}example.com/x", "form the host"),
        ("https://example.com{sub}/x", "form the host"),
        ("https://{sub}.0.0.1/x", "form the host"),
        ("https://{sub}..example.com/x", "form the host"),
        ("https://{dotted}.zendesk.com/x", "admits a dot"),
        ("https://api.example.com:{sub}/x", "port"),
        ("https://{sub}@api.example.com/x", "user name"),
        ("https://{sub}:pw@api.example.com/x", "user name"),
        ("{sub}://api.example.com/x", "must start with"),
        ("https{sub}://api.example.com/x", "must start with"),
        ("ftp://api.example.com/{sub}", "must start with"),
        ("api.example.com/{sub}", "must start with"),
        ("https:///{sub}", "no host"),
        ("https://api.example.com/{nope}", "not fields"),
        ("https://api.example.com/{sub!r}", "plain field name"),
        ("https://api.example.com/{sub:>9}", "plain field name"),
        ("https://api.example.com/{sub.real}", "plain field name"),
        ("https://api.example.com/{0}", "plain field name"),
        ("https://api.example.com/{sub", "braces"),
        ("https://api.example.com/ {sub}", "spaces or control"),
        ("https://api.example.com/\r\n{sub}", "spaces or control"),
    ],
)
def test_templates_refused_at_load(template: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_template(template, FIELDS)


def test_fields_in_a_url_need_a_pattern_and_a_value() -> None:
    with pytest.raises(ValueError, match="no pattern"):
        check_template("https://a.example.com/{x}", {"x": F(pattern=None)})
    with pytest.raises(ValueError, match="optional"):
        check_template("https://a.example.com/{x}", {"x": F(required=False)})
    check_template("https://a.example.com/{x}", {"x": F(required=False, default="v1")})


def test_allowed_hosts_admit_host_forming_templates_and_dotted_labels() -> None:
    hosts = ["*.zendesk.com", "api.example.com"]
    check_template("https://{dotted}/x", FIELDS, hosts)
    check_template("https://{dotted}.zendesk.com/x", FIELDS, hosts)
    check_template("https://api.example.com/x", FIELDS, hosts)
    with pytest.raises(ValueError, match="not in allowed_hosts"):
        check_template("https://other.example.com/x", FIELDS, hosts)
    # Never in the port, the user name or the scheme, allowed_hosts or not.
    for template in ("https://api.example.com:{sub}/", "https://{sub}@api.example.com/"):
        with pytest.raises(ValueError):
            check_template(template, FIELDS, hosts)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("acme.zendesk.com", True),
        ("a.b.zendesk.com", True),
        ("ACME.Zendesk.COM", True),
        ("zendesk.com", False),
        ("evilzendesk.com", False),
        ("zendesk.com.evil.com", False),
        ("api.example.com", True),
        ("x.api.example.com", False),
        ("example.com", False),
    ],
)
def test_host_allowed(host: str, allowed: bool) -> None:
    assert host_allowed(host, check_allowed_hosts(["*.zendesk.com", "API.example.com"])) is allowed


@pytest.mark.parametrize("entry", ["*", "*.com", "*.", "exa mple.com", "https://a.com", "a/b", ""])
def test_allowed_hosts_entries_that_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="allowed_hosts"):
        check_allowed_hosts([entry])


# --- rendering -------------------------------------------------------------------------------


def test_values_are_percent_encoded() -> None:
    url = render_url("https://api.example.com/a/{id}?q={id}", {"id": "x/../y?z=1#f@h:1 %é"})
    assert url == (
        "https://api.example.com/a/x%2F..%2Fy%3Fz%3D1%23f%40h%3A1%20%25%C3%A9"
        "?q=x%2F..%2Fy%3Fz%3D1%23f%40h%3A1%20%25%C3%A9"
    )


@pytest.mark.parametrize("value", [".", ".."])
def test_a_value_that_climbs_the_path_is_refused(value: str) -> None:
    for template in ("https://a.example.com/v1/{id}/me", "https://a.example.com/{id}"):
        with pytest.raises(InvalidInput) as caught:
            render_url(template, {"id": value})
        assert caught.value.field == "id"
    # Elsewhere a dot is just a dot.
    assert render_url("https://a.example.com/v1/{id}x?q={id}", {"id": value})
    # A literal percent-encoded dot next to the value climbs all the same.
    with pytest.raises(InvalidInput):
        render_url("https://a.example.com/v1/{id}%2e/me", {"id": "."})


def test_host_labels_take_one_label_without_allowed_hosts() -> None:
    template = "https://{sub}.zendesk.com/x"
    assert render_url(template, {"sub": "acme"}) == "https://acme.zendesk.com/x"
    for value in ("evil.com", "acme.", "", "a_b", "a~b", "é", "-acme"):
        with pytest.raises(InvalidInput) as caught:
            render_url(template, {"sub": value})
        assert caught.value.field == "sub"


def test_a_caller_without_allowed_hosts_fails_closed() -> None:
    """A template that needs allowed_hosts is refused by a render that does not pass them
    (``catalog.render_url`` is the same function, for callers that import it there)."""
    assert catalog.render_url is render_url
    with pytest.raises(InvalidInput):
        render_url("https://{dotted}/x", {"dotted": "api.example.com"})
    assert render_url(
        "https://{dotted}/x", {"dotted": "api.example.com"}, allowed_hosts=["api.example.com"]
    ) == "https://api.example.com/x"


def test_allowed_hosts_are_checked_at_render() -> None:
    hosts = ["*.zendesk.com"]
    template = "https://{dotted}.zendesk.com/x"
    assert render_url(template, {"dotted": "a.b"}, allowed_hosts=hosts)
    with pytest.raises(InvalidInput):
        render_url("https://{dotted}/x", {"dotted": "zendesk.com"}, allowed_hosts=hosts)
    with pytest.raises(InvalidInput):
        render_url("https://{dotted}/x", {"dotted": "127.0.0.1"}, allowed_hosts=hosts)
    # A literal host is checked too (a config that changed since it loaded).
    with pytest.raises(InvalidInput):
        render_url("https://api.example.com/x", {}, allowed_hosts=hosts)


def test_a_missing_value_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="id"):
        render_url("https://a.example.com/{id}", {})


# --- properties: a hostile value never moves the request ---------------------------------------

HOSTILE = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
) | st.sampled_from(
    [
        "..", ".", "evil.com", "evil.com#", "a@evil.com", "evil.com:8080", "%2e%2e", "\\evil",
        "a/../..", "[::1]", "127.0.0.1", "\r\nHost: evil",
        "\uff25\uff36\uff29\uff2c\u3002com",  # full-width EVIL, an ideographic full stop
    ]
)


@settings(max_examples=300, deadline=None)
@given(HOSTILE)
@example("..")
@example("evil.com:443/")
def test_a_value_in_the_path_or_query_stays_there(value: str) -> None:
    template = "https://api.example.com/v1/{id}/me?q={id}"
    try:
        url = render_url(template, {"id": value})
    except InvalidInput as exc:
        assert exc.field == "id"
        assert value in (".", "..")
        return
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "api.example.com")
    segments = parts.path.split("/")
    assert segments[:2] == ["", "v1"] and segments[3:] == ["me"] and len(segments) == 4
    assert unquote(segments[2]) == value
    assert parts.query == "q=" + segments[2] and not parts.fragment


@settings(max_examples=300, deadline=None)
@given(HOSTILE)
@example("evil.com")
def test_a_value_in_a_host_label_stays_one_label_under_the_fixed_domain(value: str) -> None:
    try:
        url = render_url("https://{sub}.zendesk.com:8443/x", {"sub": value})
    except InvalidInput as exc:
        assert exc.field == "sub"
        return
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.port == 8443 and parts.path == "/x"
    assert parts.hostname == f"{value.lower()}.zendesk.com"
    assert "." not in value and not parts.username


@settings(max_examples=300, deadline=None)
@given(HOSTILE)
def test_a_host_forming_value_reaches_only_allowed_hosts(value: str) -> None:
    hosts = ["*.zendesk.com", "api.example.com"]
    try:
        url = render_url("https://{h}/x", {"h": value}, allowed_hosts=hosts)
    except InvalidInput as exc:
        assert exc.field == "h"
        return
    parts = urlsplit(url)
    assert parts.hostname is not None and host_allowed(parts.hostname, hosts)
    assert parts.netloc == value and parts.path == "/x" and parts.port is None


def test_parse_template_says_where_each_placeholder_lands() -> None:
    parsed = parse_template("https://{a}.{b}.example.com/x/{c}/{c}y?{d}")
    assert parsed.host_labels == {"a", "b"} and not parsed.forms_host
    assert parsed.path_segments == (False, False, True, True)
    assert parse_template("https://{a}/x").forms_host == {"a"}
    assert parse_template("https://api.example.com/x").host == "api.example.com"
