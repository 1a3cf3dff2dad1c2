"""The auth-type registry (``broker.auth``): pure, no I/O."""

from __future__ import annotations

from broker.auth import kind, kinds
from broker.auth.app_installation import AppInstallationProvider
from broker.auth.basic import BasicProvider
from broker.auth.jwt_bearer import JwtBearerProvider
from broker.auth.oauth1 import OAuth1Provider
from broker.auth.token_exchange import TokenExchangeProvider
from broker.catalog import (
    ApiKeyProvider,
    OAuth2ClientCredentialsProvider,
    OAuth2Provider,
    parse_provider,
)
from broker.integrations import AuthType


def test_every_type_has_a_schema_and_says_whether_it_is_renewed() -> None:
    assert {name: (k.spec, k.refreshable) for name, k in kinds().items()} == {
        "apikey": (ApiKeyProvider, False),
        "basic": (BasicProvider, False),
        "oauth2": (OAuth2Provider, True),
        "oauth2_cc": (OAuth2ClientCredentialsProvider, True),
        "token_exchange": (TokenExchangeProvider, True),
        "jwt_bearer": (JwtBearerProvider, True),
        "app_installation": (AppInstallationProvider, True),
        "oauth1": (OAuth1Provider, False),
    }
    # What the connect page shows and how it connects each one.
    assert {name: k.connect for name, k in kinds().items()} == {
        "apikey": "form", "basic": "form", "oauth2": "popup", "oauth2_cc": "form",
        "token_exchange": "form", "jwt_bearer": "form", "app_installation": "popup",
        "oauth1": "popup",
    }


def test_what_a_node_gets_is_the_types() -> None:
    stored = {
        "access_token": "at", "token_type": "Bearer", "expires_at": 1, "scope": None,
        "refresh_token": "rt", "client": {"client_secret": "cs"},
        "settings": {"tenant": "t"}, "extra": {"site": "s"},
    }
    for name in ("oauth2", "oauth2_cc"):
        view = kind(name).node_view(stored)
        assert "refresh_token" not in view and "client" not in view
        assert view["tenant"] == "t" and view["site"] == "s"
    assert kind("apikey").node_view({"api_key": "k"}) == {"api_key": "k"}


def test_a_type_no_module_implements_is_handed_out_as_stored() -> None:
    fallback = kind("saml")
    assert not fallback.refreshable
    assert fallback.node_view({"user": "u", "password": "p"}) == {"user": "u", "password": "p"}


def test_the_catalog_takes_its_schemas_from_the_registry() -> None:
    spec = parse_provider({
        "name": "k", "display_name": "K", "auth_type": "apikey",
        "fields": {"api_key": {"title": "Key"}},
    })
    assert isinstance(spec, kinds()["apikey"].spec)
    try:
        parse_provider({"name": "k", "display_name": "K", "auth_type": "nope"})
    except ValueError as exc:
        names = "apikey, app_installation, basic, jwt_bearer, oauth1, oauth2, oauth2_cc, "
        names += "token_exchange"
        assert names in str(exc)
    else:
        raise AssertionError("an unknown auth_type was accepted")


def test_client_credentials_errors_are_the_users() -> None:
    assert kind("oauth2_cc").outcome("operator") == "reauth"
    assert kind("oauth2").outcome("operator") == "operator"
    new: dict[str, object] = {}
    kind("oauth2_cc").carry({"client": {"client_id": "x"}}, new)
    assert new == {"client": {"client_id": "x"}}


def test_auth_type_names_every_implemented_type_and_nothing_else() -> None:
    # The seed's enum keeps its members; a type a module adds is one too.
    assert AuthType("apikey") is AuthType.apikey
    assert AuthType("token_exchange").value == "token_exchange"
    assert AuthType("token_exchange") is AuthType("token_exchange")
    try:
        AuthType("nope")
    except ValueError:
        pass
    else:
        raise AssertionError("an unknown auth type was accepted")
