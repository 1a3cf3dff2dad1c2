"""Issue #6, item 4: no open redirect through ``return_to``.

``safe_return_to`` accepts only the broker's own paths and absolute URLs on an allowed
origin. Property-tested against an independent model of where a browser would go (WHATWG
URL rules for what these values can contain), with the classic bypasses listed, and end to
end: the authorize route records only a safe value, and the result page links only to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from broker.oauth.flows import _FLOW_SCOPE, hash_secret
from broker.runtime import Broker
from broker.store.models import OAuthFlow
from broker.web.redirects import safe_return_to
from tests import oauth_support
from tests.oauth_support import HOST_ORIGIN, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory
sec_broker = sec.sec_broker

ALLOWED = ["http://allowed.example", "https://app.allowed.example:8443"]

# Each must be refused: {a} is an allowed host (so only the bypass makes it dangerous).
CLASSIC = [
    "//evil.example",
    "///evil.example",
    "//{a}@evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "\\/evil.example",
    "https:/\\evil.example",
    "https:\\\\evil.example",
    "http:/evil.example",
    "http:evil.example",
    "http:///evil.example",
    "javascript:alert(1)",
    "JavaScript:alert(document.domain)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)",
    "http://{a}@evil.example",
    "http://{a}:pw@evil.example",
    "http://{a}.evil.example",
    "http://{a}\\@evil.example",
    "http://evil.example\\@{a}",
    "http://evil.example?{a}",
    "http://evil.example#{a}",
    "http://evil.example/{a}",
    "http://{a}%2eevil.example",
    "https://{a}",  # the allowed host on the other scheme: another origin
    "http://{a}:8080",
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r/evil.example",
    "\t//evil.example",
    "//evil.example\t",
    "/\x00/evil.example",
    "http://{a}\n.evil.example",
    " /path",
    "",
    "/" + "a" * 3000,
    "http://[::1",  # urlsplit raises on these: refused, not a 500
    "http://[evil.example]",
    "http://\uff0fevil.example",
    "http://{a}\uff20evil.example",
]
ACCEPTED = ["/", "/back", "/connect?session=x#y", "http://{a}", "http://{a}/back?x=1#y",
            "HTTP://{A}/back"]


def classic(host: str) -> list[str]:
    return [c.replace("{a}", host) for c in CLASSIC]


def browser_destination(value: str) -> str | None:
    """Where a browser sends a link ``value`` found on a broker page: "same-origin", an
    ``scheme://host[:port]`` origin, or None when that is not certain to be one of those.

    A model of the WHATWG URL parser for these inputs: leading/trailing C0 controls and
    spaces are stripped and tabs/newlines removed anywhere; backslash is a slash in special
    URLs; any run of slashes after ``http:`` starts the authority; userinfo ends at the
    last ``@`` before the path.
    """
    value = re.sub(r"[\t\n\r]", "", value.strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\n"
                                                "\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15"
                                                "\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f "))
    value = value.replace("\\", "/")
    if value.startswith("//"):
        return None  # scheme-relative: another host
    if value.startswith("/"):
        return "same-origin"
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", value, re.S)
    if match is None:
        return "same-origin"  # a relative path
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in ("http", "https"):
        return None
    rest = rest.lstrip("/")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    host = authority.rpartition("@")[2]
    if not host:
        return None
    return f"{scheme}://{host.lower()}"


def check(value: str) -> None:
    result = safe_return_to(value, ALLOWED)
    if result is None:
        return
    assert result == value, "a safe value is returned as it is, never rewritten"
    where = browser_destination(value)
    assert where == "same-origin" or where in ALLOWED, (value, where)
    # And nothing a browser would read differently from Python: no controls, no
    # backslashes, no userinfo, an explicit "//" authority.
    assert not re.search(r"[\x00-\x20\x7f\\]", value), value
    if not value.startswith("/"):
        assert re.match(r"(?i)https?://[^/?#@]+(?:[/?#]|$)", value), value


pieces = st.sampled_from([
    "", "/", "//", "///", "\\", "/\\", "\\/", ":", "@", "?", "#", ".", "%2f", "%5c", "%40",
    "\t", "\n", "\r", " ", "\x00", "\x7f", "\u3002", "\uff0f", "\uff20",
    "http:", "https:", "HTTP:", "javascript:", "data:", "http://", "https://",
    "allowed.example", "ALLOWED.example", "app.allowed.example:8443", "evil.example",
    "allowed.example.evil", "user:pw",
])
candidates = st.one_of(
    st.lists(pieces, max_size=8).map("".join),
    st.text(max_size=40),
    st.tuples(st.lists(pieces, max_size=5).map("".join), st.text(max_size=10)).map("".join),
)


@settings(max_examples=1000, deadline=None, database=None)
@given(value=candidates)
@example("http://allowed.example@evil.example")
@example("http://allowed.example\\@evil.example")
@example("https:/\\evil.example")
@example("http://\uff0f")
def test_safe_return_to_only_ever_accepts_a_broker_path_or_an_allowed_origin(value: str) -> None:
    check(value)


@pytest.mark.parametrize("value", classic("allowed.example"), ids=repr)
def test_classic_open_redirect_bypasses_are_refused(value: str) -> None:
    assert safe_return_to(value, ALLOWED) is None


@pytest.mark.parametrize("value", [v.replace("{a}", "allowed.example").replace(
    "{A}", "ALLOWED.EXAMPLE") for v in ACCEPTED])
def test_broker_paths_and_allowed_origins_are_accepted(value: str) -> None:
    assert safe_return_to(value, ALLOWED) == value


@given(path=st.text(alphabet=st.characters(codec="ascii", exclude_characters="\\"), max_size=30)
       .filter(lambda p: not re.search(r"[\x00-\x20\x7f]", p) and not p.startswith("/")),
       origin=st.sampled_from(ALLOWED))
@settings(max_examples=200, deadline=None, database=None)
def test_any_plain_path_on_an_allowed_origin_is_accepted(path: str, origin: str) -> None:
    assert safe_return_to(f"/{path}", ALLOWED) == f"/{path}"
    assert safe_return_to(f"{origin}/{path}", ALLOWED) == f"{origin}/{path}"


# --------------------------------------------------------------------------- end to end


async def flow_return_to(broker: Broker, state: str) -> Any:
    async with broker.session() as db:
        sealed = await db.scalar(
            select(OAuthFlow.sealed).where(OAuthFlow.state_hash == hash_secret(state))
        )
    assert sealed is not None
    return broker.keyring.open(_FLOW_SCOPE, hash_secret(state), sealed)["return_to"]


async def test_ticket_route_records_only_a_safe_return_to(sec_broker: Broker) -> None:
    host = sec.HOST_ORIGIN.split("://")[1]
    async with sec.app_client(sec_broker) as service:
        for value in [*classic(host), *[v.replace("{a}", host) for v in ACCEPTED[:5]]]:
            r = await service.post(
                "/groups/g1/integrations/acme/authorize", json={"return_to": value}
            )
            expected = safe_return_to(value, [sec.BASE_URL, sec.HOST_ORIGIN])
            assert (expected is None) == (value in classic(host)), value
            if expected is None:
                assert r.status_code == 422, (value, r.text)
                assert r.json()["error"]["field"] == "return_to"
                assert "evil" not in r.text
                continue
            assert r.status_code == 201, (value, r.text)
            started = await service.post(
                "/oauth/start", json={"ticket": r.json()["ticket"]},
                headers={"Origin": sec.BASE_URL},
            )
            assert started.status_code == 200, started.text
            location = started.json()["location"]
            assert "evil" not in location
            recorded = await flow_return_to(sec_broker, query_param(location, "state"))
            assert recorded == expected, (value, recorded)


async def test_result_page_links_back_only_to_a_safe_return_to(
    live_factory: Callable[..., Any],
) -> None:
    host = HOST_ORIGIN.split("://")[1]
    tricky = [
        "http://{a}@evil.example", "http://{a}.evil.example", "https:/\\evil.example",
        "//evil.example", "/\\evil.example", "java\tscript:alert(1)", "/\t/evil.example",
    ]
    async with live_factory() as live, live.browser() as browser:
        for value in [v.replace("{a}", host) for v in tricky]:
            r = await live.authorize(browser, query=f"&return_to={quote(value, safe='')}")
            assert r.status_code == 422, (value, r.text)
            assert "evil" not in r.text and "script:" not in r.text, value
        assert await live.flows() == 0
        page = await live.popup(browser, query=f"&return_to={quote(HOST_ORIGIN + '/x', safe='')}")
        assert f'<a href="{HOST_ORIGIN}/x">Go back</a>' in page.text
