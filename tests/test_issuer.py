"""``check_issuer``: which callback ``iss`` may finish a flow of which provider (pure, no I/O).

The live attack (two real authorization servers, one malicious) is in
``security/test_issuer_mixup.py``; these cover every rule and its edges.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.catalog import OAuth2Provider
from broker.oauth.issuer import check_issuer, origin_of


def provider(name: str, authorization_url: str, **extra: Any) -> OAuth2Provider:
    return OAuth2Provider.model_validate({
        "name": name,
        "display_name": name.title(),
        "auth_type": "oauth2",
        "authorization_url": authorization_url,
        "token_url": authorization_url.rsplit("/", 1)[0] + "/token",
        "client_id": f"{name}-client",
        **extra,
    })


HONEST = provider("honest", "https://login.honest.example/oauth/authorize")
EVIL = provider("evil", "https://evil.example:8443/authorize")
PINNED = provider(
    "pinned", "https://idp.pinned.example/authorize", issuer="https://idp.pinned.example/realm"
)
ZENDESKISH = provider(
    "zendeskish",
    "https://{subdomain}.zendeskish.example/oauth/authorizations/new",
    settings={"subdomain": {"title": "Subdomain", "secret": False, "pattern": "^[a-z0-9-]{1,63}$"}},
)
ALL = [HONEST, EVIL, PINNED, ZENDESKISH]


# --------------------------------------------------------------------------- no issuer set


@pytest.mark.parametrize(
    "iss",
    [
        "https://login.honest.example",
        "https://login.honest.example/",
        "https://LOGIN.honest.example",
        "https://login.honest.example:443",
        "https://login.honest.example/tenant-42/v2.0",  # an issuer with a path, same server
    ],
)
def test_without_an_issuer_an_iss_from_the_authorization_origin_is_accepted(iss: str) -> None:
    assert check_issuer(iss, HONEST, ALL) is None


def test_the_mix_up_an_honest_providers_iss_on_a_flow_of_the_evil_one_is_refused() -> None:
    # Neither has an issuer configured: before, any iss was accepted for either.
    refusal = check_issuer("https://login.honest.example", EVIL, ALL)
    assert refusal is not None and not refusal.missing
    assert refusal.other == "honest"
    assert refusal.reason == "iss comes from the server of provider honest, not evil"


@pytest.mark.parametrize(
    "iss",
    [
        "https://somewhere.example",
        "http://login.honest.example",  # another scheme is another origin
        "https://login.honest.example:444",
        "https://login.honest.example.evil.example",
        "https://user@login.honest.example",
        "",
        "login.honest.example",
        "javascript:alert(1)",
        "https://[::1",
    ],
)
def test_without_an_issuer_an_iss_from_any_other_origin_is_refused(iss: str) -> None:
    refusal = check_issuer(iss, HONEST, ALL)
    assert refusal is not None and not refusal.missing
    assert refusal.reason == "iss is not honest's (its authorization URL's origin)"
    assert refusal.other is None


def test_no_iss_is_accepted_when_nothing_requires_one() -> None:
    assert check_issuer(None, HONEST, ALL) is None
    assert check_issuer(None, PINNED, ALL) is None


# --------------------------------------------------------------------------- issuer set


def test_with_an_issuer_only_exactly_that_value_is_accepted() -> None:
    assert check_issuer("https://idp.pinned.example/realm", PINNED, ALL) is None
    for iss in (
        "https://idp.pinned.example",  # its origin is not enough once issuer is known
        "https://idp.pinned.example/realm/",
        "https://IDP.pinned.example/realm",
        "https://idp.pinned.example/other-realm",
    ):
        refusal = check_issuer(iss, PINNED, ALL)
        assert refusal is not None, iss
        assert refusal.reason == "iss is not pinned's (its issuer)"


def test_with_issuer_in_response_a_missing_iss_is_refused() -> None:
    always = provider(
        "always", "https://as.example/authorize", issuer="https://as.example",
        issuer_in_response=True,
    )
    refusal = check_issuer(None, always, ALL)
    assert refusal is not None and refusal.missing
    assert check_issuer("https://as.example", always, ALL) is None


def test_another_providers_configured_issuer_is_refused_even_from_this_ones_origin() -> None:
    # "gmail" defined inline on Google's server without an issuer, "google" with one: the
    # iss that Google sends is google's, so gmail must say so too (same issuer) to accept it.
    google = provider(
        "google", "https://accounts.google.example/o/oauth2/v2/auth",
        issuer="https://accounts.google.example",
    )
    gmail = provider("gmail", "https://accounts.google.example/o/oauth2/v2/auth")
    refusal = check_issuer("https://accounts.google.example", gmail, [google, gmail])
    assert refusal is not None and refusal.other == "google"
    assert "set the same issuer for gmail" in refusal.reason
    gmail_pinned = provider(
        "gmail", "https://accounts.google.example/o/oauth2/v2/auth",
        issuer="https://accounts.google.example",
    )
    assert check_issuer("https://accounts.google.example", gmail_pinned, [google]) is None


def test_another_providers_issuer_on_a_pinned_flow_is_named_as_that_providers() -> None:
    refusal = check_issuer("https://login.honest.example", PINNED, ALL)
    assert refusal is not None and refusal.other is None  # honest has no issuer to match
    refusal = check_issuer("https://idp.pinned.example/realm", HONEST, ALL)
    assert refusal is not None and refusal.other == "pinned"


def test_two_providers_on_one_server_without_issuers_both_accept_its_origin() -> None:
    drive = provider("drive", "https://login.honest.example/oauth/authorize")
    assert check_issuer("https://login.honest.example", HONEST, [HONEST, drive]) is None
    assert check_issuer("https://login.honest.example", drive, [HONEST, drive]) is None


def test_the_provider_itself_among_the_others_is_ignored() -> None:
    assert check_issuer("https://evil.example:8443", EVIL, ALL) is None


# --------------------------------------------------------------------------- templated URLs


def test_a_templated_authorization_url_is_compared_with_the_flows_own_settings() -> None:
    acme = {"subdomain": "acme"}
    assert check_issuer("https://acme.zendeskish.example", ZENDESKISH, ALL, settings=acme) is None
    refusal = check_issuer("https://other.zendeskish.example", ZENDESKISH, ALL, settings=acme)
    assert refusal is not None and refusal.other is None
    # Without the flow's settings the origin is unknown: nothing from it is accepted.
    assert check_issuer("https://acme.zendeskish.example", ZENDESKISH, ALL) is not None


def test_another_providers_templated_origin_is_not_guessed() -> None:
    refusal = check_issuer("https://acme.zendeskish.example", HONEST, ALL)
    assert refusal is not None and refusal.other is None


# --------------------------------------------------------------------------- origins and logs


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Example.COM/path?q=1#f", "https://example.com"),
        ("https://example.com:443/", "https://example.com"),
        ("http://example.com:80", "http://example.com"),
        ("http://127.0.0.1:8080/authorize", "http://127.0.0.1:8080"),
        ("https://[::1]:8443/x", "https://[::1]:8443"),
        ("ftp://example.com", None),
        ("https://", None),
        ("https://u:p@example.com", None),
        ("https://example.com:99999", None),
        ("", None),
    ],
)
def test_origin_of(url: str, origin: str | None) -> None:
    assert origin_of(url) == origin


def test_a_refusal_never_repeats_the_iss_it_was_given() -> None:
    hostile = "https://evil.example/\r\nforged log line <script>"
    for spec in ALL:
        refusal = check_issuer(hostile, spec, ALL)
        assert refusal is not None
        assert "forged" not in refusal.reason and "\n" not in refusal.reason
