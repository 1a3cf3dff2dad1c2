"""Paths under a provider's base URL (``broker.apipaths``) and base URL rendering
(``broker.apispec``): pure, no I/O."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from broker.apipaths import check_path, join, within
from broker.catalog import parse_provider
from broker.errors import InvalidInput

BASE = "https://api.example.com/v2"

ESCAPES = [
    "/a/../b", "../x", "/..", "/.", "/./a", "/a/%2e%2e/b", "/a/%2E%2e/b", "/a/.%2e/b",
    "/%2e", "/a%2fb", "/a%2Fb", "/a%5cb", "/a%5Cb", "/a%00b", "/a\\b", "\\\\evil.com",
    "//evil.com", "//evil.com/x", "https://evil.com/x", "http:/\\evil.com", "/a//b",
    "/a?x=1", "/a#frag", "/a b", "/a\nb", "/a\x00b", "/x%zz", "/x%", "/é",
    "/%40evil.com/..",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_every_escape_is_refused(path: str) -> None:
    with pytest.raises(InvalidInput) as info:
        join(BASE, path)
    assert info.value.field == "path"
    assert path not in info.value.message or len(path) < 3


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/user", "", f"{BASE}/user"),
        ("user", "", f"{BASE}/user"),
        ("/repos/o/r/issues", "state=open&per_page=5",
         f"{BASE}/repos/o/r/issues?state=open&per_page=5"),
        ("/v1/x:run", "", f"{BASE}/v1/x:run"),
        ("/a%20b/%C3%A9", "", f"{BASE}/a%20b/%C3%A9"),
        ("/.well-known/x", "", f"{BASE}/.well-known/x"),
        ("/...", "", f"{BASE}/..."),
        ("/trailing/", "", f"{BASE}/trailing/"),
        ("", "", f"{BASE}/"),
        ("/users/@me", "", f"{BASE}/users/@me"),
    ],
)
def test_paths_under_the_base(path: str, query: str, expected: str) -> None:
    url = join(BASE, path, query)
    assert url == expected
    assert within(BASE, httpx.URL(url))


def test_the_base_query_is_kept_first() -> None:
    assert join("https://x.test/api?v=2", "/a", "b=1") == "https://x.test/api/a?v=2&b=1"


def test_within_refuses_other_origins_and_sibling_paths() -> None:
    assert not within(BASE, httpx.URL("https://evil.com/v2/user"))
    assert not within(BASE, httpx.URL("http://api.example.com/v2/user"))
    assert not within(BASE, httpx.URL("https://api.example.com:444/v2/user"))
    assert not within(BASE, httpx.URL("https://api.example.com/v22/user"))
    assert not within(BASE, httpx.URL("https://api.example.com/v2/a%2fb"))
    assert within(BASE, httpx.URL(BASE))


def test_check_path_returns_the_relative_path() -> None:
    assert check_path("/a/b") == "a/b"
    assert check_path("a/b") == "a/b"


def _provider(**extra: Any) -> Any:
    data = {
        "name": "acme", "display_name": "Acme", "auth_type": "oauth2",
        "authorization_url": "https://login.acme.com/authorize",
        "token_url": "https://login.acme.com/token", "client_id": "id",
        **extra,
    }
    return parse_provider(data)


def test_settings_and_extra_fields_fill_the_base_url() -> None:
    spec = _provider(
        settings={"subdomain": {"title": "Sub", "secret": False, "pattern": "^[a-z0-9-]{1,63}$"}},
        extra_fields={"site": "site"},
        api={"base_url": "https://{subdomain}.acme.com/api/{site}", "values": {"site": "^[0-9]+$"}},
    )
    placement = spec.placement()
    assert placement.base({"subdomain": "tenant", "site": "42"}) == "https://tenant.acme.com/api/42"
    for bad in ({"subdomain": "evil.com#", "site": "42"}, {"subdomain": "t", "site": "../x"},
                {"subdomain": "t"}):
        with pytest.raises(InvalidInput):
            placement.base(bad)


ORIGIN_API = {
    "base_url": "{instance_url}/services/data/v62.0",
    "values": {"instance_url": r"^https://[a-z0-9-]+(\.[a-z0-9-]+)*\.salesforce\.com$"},
}


def test_an_origin_placeholder_needs_a_pattern_and_allowed_hosts() -> None:
    with pytest.raises(ValueError, match="allowed_hosts"):
        _provider(extra_fields={"instance_url": "instance_url"}, api=ORIGIN_API)
    with pytest.raises(ValueError, match="pattern"):
        _provider(
            extra_fields={"instance_url": "instance_url"}, allowed_hosts=["*.salesforce.com"],
            api={"base_url": "{instance_url}/x"},
        )


@pytest.mark.parametrize(
    "value",
    [
        "https://evil.com", "http://na1.salesforce.com", "https://na1.salesforce.com.evil.com",
        "https://user@na1.salesforce.com", "https://na1.salesforce.com:8443",
        "https://na1.salesforce.com/x", "https://na1.salesforce.com?x", "javascript:alert(1)",
        "https://na1.salesforce.com#x", "",
    ],
)
def test_an_origin_value_is_only_ever_an_allowed_https_host(value: str) -> None:
    spec = _provider(
        extra_fields={"instance_url": "instance_url"},
        allowed_hosts=["login.acme.com", "*.salesforce.com"], api=ORIGIN_API,
    )
    with pytest.raises(InvalidInput) as info:
        spec.placement().base({"instance_url": value})
    assert info.value.field == "instance_url"


def test_an_origin_value_renders() -> None:
    spec = _provider(
        extra_fields={"instance_url": "instance_url"},
        allowed_hosts=["login.acme.com", "*.salesforce.com"], api=ORIGIN_API,
    )
    assert spec.placement().base({"instance_url": "https://acme.my.salesforce.com"}) == (
        "https://acme.my.salesforce.com/services/data/v62.0"
    )


def test_credential_placement() -> None:
    spec = _provider(api={"base_url": "https://api.acme.com"})
    placement = spec.placement()
    assert placement.apply({"access_token": "tok"}) == ({"Authorization": "Bearer tok"}, {})
    with pytest.raises(InvalidInput):
        placement.apply({"access_token": "bad\r\nX-Injected: 1"})
    custom = _provider(api={"base_url": "https://api.acme.com",
                            "auth": {"query": {"token": "{access_token}"}}}).placement()
    assert custom.apply({"access_token": "tok"}) == ({}, {"token": "tok"})


def test_auth_templates_must_name_what_a_connection_has() -> None:
    with pytest.raises(ValueError, match=r"api\.auth"):
        _provider(api={"base_url": "https://api.acme.com",
                       "auth": {"headers": {"X-Key": "{client_secret}"}}})


def test_static_headers_take_no_placeholders() -> None:
    with pytest.raises(ValueError, match="placeholders"):
        _provider(api={"base_url": "https://api.acme.com", "headers": {"X": "{access_token}"}})


def test_apikey_auth_defaults_to_apply() -> None:
    spec = parse_provider({
        "name": "k", "display_name": "K", "auth_type": "apikey",
        "fields": {"api_key": {"title": "Key"}}, "apply": {"query": {"appid": "{api_key}"}},
        "api": {"base_url": "https://api.k.test"},
    })
    placement = spec.placement()
    assert placement is not None
    assert placement.apply({"api_key": "s3cret"}) == ({}, {"appid": "s3cret"})
