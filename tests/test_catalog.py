"""Every provider file in the shipped catalog loads through the real config loader.

Each ``providers/*.yaml`` is enabled by name in a throwaway config.yaml and loaded with
``load_settings(path, env={})``, exactly as an operator's config would be. No network: verify
requests go to an ``httpx.MockTransport`` in the test process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import yaml

from broker.catalog import (
    ApiKeyProvider,
    FieldsProvider,
    OAuth2Provider,
    ProviderBase,
    builtin_catalog_dir,
    load_yaml_file,
    render,
)
from broker.config import Settings, load_settings
from broker.errors import ConfigError, CredentialRejected, InvalidInput
from broker.providers import check_fields, verify_credential

CATALOG = builtin_catalog_dir()
PROVIDER_FILES = sorted(CATALOG.glob("*.yaml"))
PROVIDER_NAMES = sorted(p.stem for p in PROVIDER_FILES)
LEFTOVER_BRACES = re.compile(r"[{}]")


def _raw(path: Path) -> dict[str, object]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: expected a mapping"
    return data


APIKEY_FILES = [p for p in PROVIDER_FILES if _raw(p).get("auth_type") == "apikey"]
APIKEY_NAMES = [p.stem for p in APIKEY_FILES]


def enable(name: str) -> dict[str, object]:
    """The config.yaml entry that enables ``name``: OAuth2 apps need the operator's client
    credentials there (never in the catalog file); API-key providers need nothing."""
    raw = _raw(CATALOG / f"{name}.yaml")
    if raw.get("auth_type") == "oauth2":
        return {"client_id": "test-client-id", "client_secret": "test-client-secret"}
    if raw.get("auth_type") == "jwt_bearer" and "private_key_from" not in raw:
        return {"client_id": "test-consumer-key", "private_key": TEST_PEM}
    if raw.get("auth_type") == "oauth1":
        return {"client_id": "test-key", "client_secret": "test-secret"}
    if raw.get("auth_type") == "app_installation":
        return {"app_slug": "test-app", "client_id": "Iv1.test", "client_secret": "s",
                "private_key": TEST_PEM}
    return {}


# An operator's signing key for the jwt_bearer files that use one (never used to sign here).
TEST_PEM = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


def write_config(tmp_path: Path, providers: dict[str, object], **extra: object) -> Path:
    data: dict[str, object] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}",
        "providers": providers,
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def load_any(tmp_path: Path, name: str) -> ProviderBase:
    settings: Settings = load_settings(write_config(tmp_path, {name: enable(name)}), env={})
    return settings.resolved_providers[name]


def load_provider(tmp_path: Path, name: str) -> ApiKeyProvider:
    spec = load_any(tmp_path, name)
    assert isinstance(spec, ApiKeyProvider)
    return spec


def sample_values(spec: ApiKeyProvider) -> dict[str, str]:
    """Each field's example, or a plain stand-in when the file gives none."""
    return {
        name: field.example or f"sample-{name}-0123456789" for name, field in spec.fields.items()
    }


def test_the_catalog_is_not_empty() -> None:
    assert CATALOG.is_dir(), CATALOG
    for expected in ("openai", "anthropic", "stripe", "sendgrid", "openweathermap"):
        assert expected in PROVIDER_NAMES


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_provider_file_validates_through_the_loader(tmp_path: Path, name: str) -> None:
    spec = load_any(tmp_path, name)
    assert spec.name == name
    assert spec.display_name.strip()
    if spec.docs_url is not None:
        assert spec.docs_url.startswith("https://"), spec.docs_url


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_provider_file_names_the_docs_it_was_checked_against(name: str) -> None:
    text = (CATALOG / f"{name}.yaml").read_text(encoding="utf-8")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("#"), f"{name}.yaml should open with a comment naming its docs"
    assert any("https://" in line for line in header), f"{name}.yaml: no doc URL in its header"


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_provider_file_holds_no_oauth_client_credentials(name: str) -> None:
    raw = _raw(CATALOG / f"{name}.yaml")
    assert "client_id" not in raw
    assert "client_secret" not in raw


@pytest.mark.parametrize("name", APIKEY_NAMES)
def test_apply_renders_every_template(tmp_path: Path, name: str) -> None:
    spec = load_provider(tmp_path, name)
    values = sample_values(spec)
    headers, query = spec.apply_to(values)
    assert headers or query, f"{name}: the credential is applied nowhere"
    for key, value in {**headers, **query}.items():
        assert value, f"{name}: {key} renders empty"
        assert not LEFTOVER_BRACES.search(value), f"{name}: {key} = {value!r}"
        assert "\n" not in value and "\r" not in value
    # Every secret field ends up on the request somewhere.
    rendered = " ".join([*headers.values(), *query.values()])
    for field_name, field in spec.fields.items():
        if field.secret and field.required:
            assert values[field_name] in rendered, f"{name}: {field_name} is never sent"


@pytest.mark.parametrize("name", APIKEY_NAMES)
def test_examples_match_their_own_patterns(tmp_path: Path, name: str) -> None:
    spec = load_provider(tmp_path, name)
    for field_name, field in spec.fields.items():
        if field.pattern is not None:
            re.compile(field.pattern)
        if field.example is not None:
            assert field.matches(field.example), (
                f"{name}.{field_name}: example {field.example!r} does not match {field.pattern!r}"
            )
            assert len(field.example) <= field.max_length


@pytest.mark.parametrize("name", APIKEY_NAMES)
def test_verify_request_is_https_and_fully_rendered(tmp_path: Path, name: str) -> None:
    spec = load_provider(tmp_path, name)
    if spec.verify is None:
        pytest.skip(f"{name} has no verify request")
    url = render(spec.verify.url, sample_values(spec))
    assert url.startswith("https://"), url
    assert not LEFTOVER_BRACES.search(url), url
    assert spec.verify.method in ("GET", "HEAD"), "a verify request must not change anything"
    assert 200 in spec.verify.ok_status
    assert 401 not in spec.verify.ok_status, "401 means the key was refused"


def _verify_url(path: Path) -> str | None:
    verify = _raw(path).get("verify")
    url = verify.get("url") if isinstance(verify, dict) else None
    return url if isinstance(url, str) else None


VERIFY_NAMES = [p.stem for p in APIKEY_FILES if _verify_url(p) is not None]
VERIFY_CASES = [p.stem for p in APIKEY_FILES if _verify_url(p) is not None]


@pytest.mark.parametrize("name", VERIFY_CASES)
async def test_verify_request_carries_the_credential_and_the_whole_url(
    tmp_path: Path, name: str
) -> None:
    spec = load_provider(tmp_path, name)
    assert spec.verify is not None
    values = sample_values(spec)
    headers, query = spec.apply_to(values)
    sent: list[httpx.Request] = []
    ok = spec.verify.ok_status[0]

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(ok)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        await verify_credential(spec, values, client=client)
    assert len(sent) == 1
    request = sent[0]
    expected = urlsplit(render(spec.verify.url, values))
    assert (request.url.scheme, request.url.host, request.url.path) == (
        expected.scheme,
        expected.hostname,
        expected.path,
    )
    assert request.method == spec.verify.method
    for key, value in headers.items():
        assert request.headers.get(key) == value
    # The headers every call needs (a version header) go on the check too.
    for key, value in (spec.api.headers if spec.api else {}).items():
        if key.lower() not in {h.lower() for h in headers}:
            assert request.headers.get(key) == value, (name, key)
    assert dict(request.url.params) == {**dict(parse_qsl(expected.query)), **query}


@pytest.mark.parametrize("name", VERIFY_NAMES)
async def test_verify_reports_a_refused_key(tmp_path: Path, name: str) -> None:
    spec = load_provider(tmp_path, name)

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "invalid key"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(CredentialRejected):
            await verify_credential(spec, sample_values(spec), client=client)


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("openai", "sk-proj-abc123", "pk-abc123"),
        ("anthropic", "sk-ant-api03-abc123", "sk-abc123"),
        ("stripe", "rk_live_abc123", "pk_live_abc123"),
        ("stripe", "sk_test_abc123", "sk_abc123"),
        ("sendgrid", "SG.abc.def", "sg-abc"),
    ],
)
def test_documented_prefixes_accept_and_reject(
    tmp_path: Path, name: str, good: str, bad: str
) -> None:
    field = load_provider(tmp_path, name).fields["api_key"]
    assert field.matches(good)
    assert not field.matches(bad)


def test_anthropic_sends_the_required_version_header(tmp_path: Path) -> None:
    headers, _ = load_provider(tmp_path, "anthropic").apply_to({"api_key": "sk-ant-x"})
    assert headers == {"x-api-key": "sk-ant-x", "anthropic-version": "2023-06-01"}


def test_a_catalog_file_with_client_secret_is_rejected(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "leaky.yaml").write_text(
        yaml.safe_dump(
            {
                "display_name": "Leaky",
                "auth_type": "apikey",
                "client_secret": "do-not-ship-me",
                "fields": {"api_key": {"title": "API key"}},
                "apply": {"headers": {"Authorization": "Bearer {api_key}"}},
            }
        ),
        encoding="utf-8",
    )
    path = write_config(tmp_path, {"leaky": {}}, catalog_paths=[str(catalog)])
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert any("client_secret" in problem for problem in info.value.problems)
    assert "do-not-ship-me" not in str(info.value)


def test_a_catalog_file_with_client_id_is_rejected(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "leaky.yaml").write_text(
        yaml.safe_dump(
            {
                "display_name": "Leaky",
                "auth_type": "apikey",
                "client_id": "some-client",
                "fields": {"api_key": {"title": "API key"}},
            }
        ),
        encoding="utf-8",
    )
    path = write_config(tmp_path, {"leaky": {}}, catalog_paths=[str(catalog)])
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert any("client_id" in problem for problem in info.value.problems)


def test_all_providers_load_together(tmp_path: Path) -> None:
    enabled: dict[str, object] = {name: enable(name) for name in PROVIDER_NAMES}
    settings = load_settings(write_config(tmp_path, enabled), env={})
    assert sorted(settings.resolved_providers) == PROVIDER_NAMES


# --- OAuth2 (authorization code) catalog files --------------------------------------------
# Each oauth2 file is enabled the way an operator would, with client credentials that only
# config.yaml may hold (client_id: test-client, client_secret: test-secret), and checked for
# what the broker relies on: https everywhere, URL templates naming declared settings, setting
# patterns that keep a connection on the provider's own host, and the documented quirks.

OAUTH2_FILES = [p for p in PROVIDER_FILES if _raw(p).get("auth_type") == "oauth2"]
OAUTH2_NAMES = [p.stem for p in OAUTH2_FILES]
OAUTH2_CLIENT = {"client_id": "test-client", "client_secret": "test-secret"}


def load_oauth2(tmp_path: Path, name: str) -> OAuth2Provider:
    settings = load_settings(write_config(tmp_path, {name: dict(OAUTH2_CLIENT)}), env={})
    spec = settings.resolved_providers[name]
    assert isinstance(spec, OAuth2Provider)
    return spec


def oauth2_examples(spec: OAuth2Provider) -> dict[str, str]:
    values = {}
    for setting_name, field in spec.settings.items():
        assert field.example, f"{spec.name}.{setting_name}: give an example"
        values[setting_name] = field.example
    return values


def test_the_oauth2_catalog_has_the_expected_providers() -> None:
    expected = {
        "github",
        "google",
        "microsoft",
        "slack",
        "notion",
        "hubspot",
        "salesforce",
        "atlassian",
        "zendesk",
        "linear",
        "dropbox",
        "spotify",
    }
    assert expected <= set(OAUTH2_NAMES)


def test_oauth2_enable_helper_supplies_client_credentials() -> None:
    for name in OAUTH2_NAMES:
        entry = enable(name)
        assert entry.get("client_id") and entry.get("client_secret"), name


@pytest.mark.parametrize("name", OAUTH2_NAMES)
def test_oauth2_file_validates_with_client_credentials_from_config(
    tmp_path: Path, name: str
) -> None:
    spec = load_oauth2(tmp_path, name)
    assert spec.client_id is not None and spec.client_secret is not None
    assert spec.client_id.get_secret_value() == "test-client"
    assert spec.client_secret.get_secret_value() == "test-secret"
    assert spec.docs_url and spec.docs_url.startswith("https://")


@pytest.mark.parametrize("name", OAUTH2_NAMES)
def test_oauth2_urls_are_https_and_templates_name_declared_settings(
    tmp_path: Path, name: str
) -> None:
    from broker.catalog import template_names

    spec = load_oauth2(tmp_path, name)
    declared = set(spec.settings)
    values = oauth2_examples(spec)
    for url in spec.urls():
        assert url.startswith("https://"), url
        assert template_names(url) <= declared, url
        rendered = render(url, values)
        assert not LEFTOVER_BRACES.search(rendered), rendered
        parts = urlsplit(rendered)
        assert parts.scheme == "https" and parts.hostname, rendered
        assert not parts.username and not parts.password and not parts.fragment, rendered
    if spec.issuer is not None:
        assert spec.issuer.startswith("https://")


@pytest.mark.parametrize("name", OAUTH2_NAMES)
def test_oauth2_settings_are_plain_patterned_values(tmp_path: Path, name: str) -> None:
    from broker.catalog import template_names

    spec = load_oauth2(tmp_path, name)
    in_urls = {n for url in spec.urls() for n in template_names(url)}
    for setting_name, field in spec.settings.items():
        assert not field.secret, f"{name}.{setting_name}: settings are not secret"
        assert field.required or field.default or setting_name not in in_urls, (
            f"{name}.{setting_name}: an optional setting without a default cannot be rendered")
        assert field.pattern, f"{name}.{setting_name}: a URL setting needs a pattern"
        assert field.example and field.matches(field.example)


@pytest.mark.parametrize(
    "value",
    ["evil.com/x", "acme.evil", "evil.com#", "a@b", "acme:443", "-acme", "acme-", "", "a/b", "x y"],
)
def test_zendesk_subdomain_cannot_leave_zendesk_com(tmp_path: Path, value: str) -> None:
    field = load_oauth2(tmp_path, "zendesk").settings["subdomain"]
    assert not field.matches(value)


def test_zendesk_subdomain_accepts_real_labels(tmp_path: Path) -> None:
    field = load_oauth2(tmp_path, "zendesk").settings["subdomain"]
    for value in ("acme", "acme-support", "Acme2", "d3v"):
        assert field.matches(value)


@pytest.mark.parametrize("name", OAUTH2_NAMES)
def test_oauth2_has_no_client_credentials_or_secrets_in_params(name: str) -> None:
    raw = _raw(CATALOG / f"{name}.yaml")
    for key in ("authorization_params", "token_params", "exchange_params", "refresh_params"):
        params = raw.get(key) or {}
        assert isinstance(params, dict)
        for param in params:
            assert param not in ("client_id", "client_secret", "code_verifier"), (name, param)


# name -> (auth method, body format, pkce, scope separator)
OAUTH2_QUIRKS = {
    "github": ("client_secret_post", "form", True, " "),
    "google": ("client_secret_post", "form", True, " "),
    "microsoft": ("client_secret_post", "form", True, " "),
    "slack": ("client_secret_basic", "form", False, ","),
    "notion": ("client_secret_basic", "json", False, " "),
    "hubspot": ("client_secret_post", "form", True, " "),
    "salesforce": ("client_secret_post", "form", True, " "),
    "atlassian": ("client_secret_post", "json", False, " "),
    "zendesk": ("client_secret_post", "json", True, " "),
    "linear": ("client_secret_post", "form", True, ","),
    "dropbox": ("client_secret_basic", "form", True, " "),
    "spotify": ("client_secret_basic", "form", False, " "),
}


@pytest.mark.parametrize("name", sorted(OAUTH2_QUIRKS))
def test_oauth2_documented_token_endpoint_quirks(tmp_path: Path, name: str) -> None:
    spec = load_oauth2(tmp_path, name)
    method, body, pkce, separator = OAUTH2_QUIRKS[name]
    assert spec.token_endpoint_auth_method == method
    assert spec.token_request_format == body
    assert spec.pkce is pkce
    assert spec.scope_separator == separator


def test_oauth2_provider_specific_parameters(tmp_path: Path) -> None:
    google = load_oauth2(tmp_path, "google")
    assert google.authorization_params == {"access_type": "offline", "prompt": "consent"}
    assert {"openid", "email", "profile"} <= set(google.default_scopes)
    atlassian = load_oauth2(tmp_path, "atlassian")
    assert atlassian.authorization_params["audience"] == "api.atlassian.com"
    assert atlassian.authorization_params["prompt"] == "consent"
    assert "offline_access" in atlassian.default_scopes
    assert "offline_access" in load_oauth2(tmp_path, "microsoft").default_scopes
    assert load_oauth2(tmp_path, "dropbox").authorization_params == {"token_access_type": "offline"}
    assert load_oauth2(tmp_path, "notion").authorization_params == {"owner": "user"}
    assert "refresh_token" in load_oauth2(tmp_path, "salesforce").default_scopes
    slack = load_oauth2(tmp_path, "slack")
    assert slack.token_path == "authed_user"
    assert slack.extra_fields["team_id"] == "team.id"
    assert " " not in slack.authorization_params["user_scope"]  # comma-separated
    assert load_oauth2(tmp_path, "github").default_scopes == ["read:user"]
    # OAuth App tokens (no expires_in, no refresh token) are stored as not expiring: no
    # 90-day stand-in lifetime any more.
    assert "default_lifetime_seconds" not in _raw(CATALOG / "github.yaml")


@pytest.mark.parametrize("name", OAUTH2_NAMES)
def test_oauth2_authorization_url_carries_scopes_params_and_pkce(tmp_path: Path, name: str) -> None:
    from broker.auth.oauth2 import authorization_url

    spec = load_oauth2(tmp_path, name)
    values = oauth2_examples(spec)
    verifier = "v" * 64
    url = authorization_url(
        spec,
        state="state-123",
        verifier=verifier if spec.pkce else None,
        redirect_uri="https://broker.example/oauth/callback",
        settings=values,
    )
    parts = urlsplit(url)
    expected = urlsplit(render(spec.authorization_url, values))
    assert (parts.scheme, parts.hostname, parts.path) == (
        expected.scheme,
        expected.hostname,
        expected.path,
    )
    query = dict(parse_qsl(parts.query))
    assert query["client_id"] == "test-client"
    assert query["response_type"] == "code"
    assert query["state"] == "state-123"
    assert query["redirect_uri"] == "https://broker.example/oauth/callback"
    assert "client_secret" not in query
    if spec.default_scopes:
        assert query["scope"] == spec.scope_separator.join(spec.default_scopes)
    else:
        assert "scope" not in query
    for key, value in spec.authorization_params.items():
        assert query[key] == value
    assert ("code_challenge" in query) is spec.pkce
    if spec.pkce:
        assert query["code_challenge_method"] == "S256"


def _sample_token_response(name: str) -> dict[str, object]:
    if name == "slack":
        return {
            "ok": True,
            "app_id": "A1",
            "authed_user": {
                "id": "U1",
                "scope": "users:read",
                "access_token": "xoxp-user-token",
                "token_type": "user",
            },
            "team": {"id": "T1", "name": "Acme"},
            "enterprise": None,
            "is_enterprise_install": False,
        }
    response: dict[str, object] = {
        "access_token": f"{name}-access",
        "token_type": "bearer",
        "refresh_token": f"{name}-refresh",
        "expires_in": 3600,
    }
    if name == "notion":
        response.update(
            {"bot_id": "b1", "workspace_id": "w1", "workspace_name": "Acme", "owner": {}}
        )
        del response["expires_in"]
    if name == "salesforce":
        response.update(
            {"instance_url": "https://acme.my.salesforce.com", "id": "https://login/id/1/2"}
        )
        del response["expires_in"]
    if name == "hubspot":
        response.update({"hub_id": 62515, "expires_in": 1800})
    return response


@pytest.mark.parametrize("name", OAUTH2_NAMES)
async def test_oauth2_code_exchange_request_and_stored_token(tmp_path: Path, name: str) -> None:
    import base64
    import json
    from datetime import UTC, datetime

    from broker.oauth import client
    from broker.oauth.tokens import node_view, stored_token

    spec = load_oauth2(tmp_path, name)
    values = oauth2_examples(spec)
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=_sample_token_response(name))

    response = await client.exchange_code(
        spec,
        code="the-code",
        code_verifier="v" * 64 if spec.pkce else None,
        redirect_uri="https://broker.example/oauth/callback",
        settings=values,
        transport=httpx.MockTransport(answer),
    )
    assert len(sent) == 1
    request = sent[0]
    assert request.method == "POST"
    assert str(request.url) == render(spec.token_url, values)
    content_type = request.headers.get("content-type", "")
    if spec.token_request_format == "json":
        assert content_type.startswith("application/json")
        body = json.loads(request.content)
    else:
        assert content_type.startswith("application/x-www-form-urlencoded")
        body = dict(parse_qsl(request.content.decode()))
    assert body["grant_type"] == "authorization_code"
    assert body["code"] == "the-code"
    assert ("code_verifier" in body) is spec.pkce
    basic = "Basic " + base64.b64encode(b"test-client:test-secret").decode()
    if spec.token_endpoint_auth_method == "client_secret_basic":
        assert request.headers.get("authorization") == basic
        assert "client_secret" not in body
    else:
        assert "authorization" not in request.headers
        assert body["client_id"] == "test-client"
        assert body["client_secret"] == "test-secret"

    token = stored_token(
        response,
        now=datetime(2030, 1, 1, tzinfo=UTC),
        default_lifetime=spec.default_lifetime_seconds,
        token_path=spec.token_path,
        extra_fields=spec.extra_fields,
        settings=values,
    )
    view = node_view(token)
    assert view["access_token"]
    assert "refresh_token" not in view
    if name == "slack":
        assert view["access_token"] == "xoxp-user-token"
        assert view["team_id"] == "T1" and view["user_id"] == "U1"
        assert "enterprise_id" not in view
    if name == "notion":
        assert view["workspace_id"] == "w1" and view["bot_id"] == "b1"
    if name == "salesforce":
        assert view["instance_url"] == "https://acme.my.salesforce.com"
        assert token["lifetime"] == 900
    if name == "hubspot":
        assert view["hub_id"] == 62515
    if name == "zendesk":
        assert view["subdomain"] == "acme"


def test_every_oauth2_catalog_file_says_what_was_checked_about_its_issuer() -> None:
    # Issue #11, item 5: the mix-up check depends on `issuer` being set wherever a provider
    # sends one; each file names the page checked, or says it could not be confirmed.
    checked = []
    for path in sorted(builtin_catalog_dir().glob("*.yaml")):
        data = load_yaml_file(path)
        if data.get("auth_type") != "oauth2":
            continue
        text = path.read_text(encoding="utf-8")
        assert "# - Issuer (RFC 9207): " in text, path.name
        issuer = data.get("issuer")
        assert issuer is None or issuer.startswith("https://"), path.name
        checked.append(path.stem)
    assert len(checked) >= 12, checked


# --- The api section ------------------------------------------------------------------------
# Every catalog file says where its provider's API is (issue #12). Each base URL is rendered the
# way ctx.client and the proxy will render it, over example values, and must land on the host
# the provider's docs give (each file's "Checked:" list names the page).

# The host each file's api.base_url must render to, as its provider's docs give it, and
# plausible values for what a base URL uses that no field or setting gives an example of
# (values learnt at connect, kept extra fields): tests/catalog_hosts.json.
CATALOG_HOSTS: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parent / "catalog_hosts.json").read_text(encoding="utf-8"))
API_HOSTS = {name: entry["host"] for name, entry in CATALOG_HOSTS.items()}
API_EXTRA_VALUES = {name: entry["values"] for name, entry in CATALOG_HOSTS.items()
                    if entry.get("values")}


def api_values(spec: ProviderBase) -> dict[str, str]:
    """A connection's values for rendering ``spec``'s base URL: each setting's or field's
    example, and a plausible value for each kept extra field it uses."""
    values = {n: f.example for n, f in spec.url_values().items() if f.example is not None}
    return {**values, **API_EXTRA_VALUES.get(spec.name, {})}


def test_every_catalog_file_has_a_documented_api_host() -> None:
    assert sorted(API_HOSTS) == PROVIDER_NAMES


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_api_base_url_renders_to_the_documented_host(tmp_path: Path, name: str) -> None:
    spec = load_any(tmp_path, name)
    placement = spec.placement()
    assert placement is not None, f"{name}.yaml has no api section"
    url = placement.base(api_values(spec))
    parts = urlsplit(url)
    assert parts.scheme == "https", url
    assert parts.hostname == API_HOSTS[name], url
    assert parts.port is None and not parts.username and not parts.password, url
    assert not parts.query and not parts.fragment and not url.endswith("/"), url
    assert not LEFTOVER_BRACES.search(url), url


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_api_section_says_what_was_checked(name: str) -> None:
    lines = (CATALOG / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    at = lines.index("api:")
    assert lines[at - 1].startswith("# api: "), f"{name}.yaml: say what was checked above api:"


@pytest.mark.parametrize("name", APIKEY_NAMES)
def test_api_auth_sends_every_secret_field(tmp_path: Path, name: str) -> None:
    spec = load_provider(tmp_path, name)
    placement = spec.placement()
    assert placement is not None
    values = sample_values(spec)
    headers, query = placement.apply(values)
    sent = " ".join([*headers.values(), *query.values()])
    for field_name, field in spec.fields.items():
        if field.secret and field.required:
            assert values[field_name] in sent, f"{name}: {field_name} is never sent"
    # A static header and the credential's headers never name the same header twice.
    assert not {h.lower() for h in headers} & {h.lower() for h in placement.api.headers}


@pytest.mark.parametrize(
    "instance_url",
    [
        "https://acme.my.salesforce.com.evil.example",
        "https://evil.example",
        "https://acme.my.site.com",  # Experience Cloud sites: customer content
        "https://acme.force.com",
        "https://na1.salesforce.com",  # a legacy instance host: not allowed
        "http://acme.my.salesforce.com",
        "https://acme.my.salesforce.com:8443",
        "https://acme.my.salesforce.com/path",
        "https://user@acme.my.salesforce.com",
    ],
)
def test_salesforce_api_base_stays_on_a_my_domain(tmp_path: Path, instance_url: str) -> None:
    placement = load_any(tmp_path, "salesforce").placement()
    assert placement is not None
    with pytest.raises(InvalidInput) as info:
        placement.base({"instance_url": instance_url})
    assert info.value.field == "instance_url"


def test_salesforce_api_base_takes_sandbox_and_developer_my_domains(tmp_path: Path) -> None:
    placement = load_any(tmp_path, "salesforce").placement()
    assert placement is not None
    for host in (
        "acme--uat.sandbox.my.salesforce.com",
        "acme-dev-ed.develop.my.salesforce.com",
    ):
        url = placement.base({"instance_url": f"https://{host}"})
        assert url == f"https://{host}/services/data/v66.0", url


def test_a_field_left_empty_takes_its_default_so_the_api_address_can_use_it(
    tmp_path: Path,
) -> None:
    spec = load_any(tmp_path, "mailgun")
    assert isinstance(spec, FieldsProvider)
    data = check_fields(spec, {"api_key": "key-0123456789abcdef"})
    assert data["api_domain"] == "api.mailgun.net"
    placement = spec.placement()
    assert placement is not None
    assert placement.base(data) == "https://api.mailgun.net"
    eu = check_fields(spec, {"api_key": "k", "api_domain": "api.eu.mailgun.net"})
    assert placement.base(eu) == "https://api.eu.mailgun.net"
    with pytest.raises(InvalidInput):
        check_fields(spec, {"api_key": "k", "api_domain": "evil.example"})


@pytest.mark.parametrize(
    ("given", "tenant"),
    [({}, "common"), ({"tenant": "organizations"}, "organizations"),
     ({"tenant": "contoso.onmicrosoft.com"}, "contoso.onmicrosoft.com"),
     ({"tenant": "72f988bf-86f1-41af-91ab-2d7cd011db47"}, "72f988bf-86f1-41af-91ab-2d7cd011db47")],
)
def test_microsoft_tenant_defaults_to_common(
    tmp_path: Path, given: dict[str, str], tenant: str
) -> None:
    from broker.oauth.service import check_settings

    spec = load_oauth2(tmp_path, "microsoft")
    values = check_settings(spec, given)
    assert spec.render_url(spec.token_url, values) == (
        f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token")


@pytest.mark.parametrize("value", ["evil.com/x", "a@b", "..", "x y", "common/../x", "a:b"])
def test_microsoft_tenant_refuses_what_is_not_a_tenant(tmp_path: Path, value: str) -> None:
    from broker.oauth.service import check_settings

    with pytest.raises(InvalidInput):
        check_settings(load_oauth2(tmp_path, "microsoft"), {"tenant": value})


@pytest.mark.parametrize(
    ("given", "host"),
    [({}, "login.salesforce.com"), ({"login_host": "test.salesforce.com"}, "test.salesforce.com"),
     ({"login_host": "acme--uat.sandbox.my.salesforce.com"},
      "acme--uat.sandbox.my.salesforce.com")],
)
def test_salesforce_login_host_is_a_setting(
    tmp_path: Path, given: dict[str, str], host: str
) -> None:
    from broker.oauth.service import check_settings

    spec = load_oauth2(tmp_path, "salesforce")
    values = check_settings(spec, given)
    assert spec.render_url(spec.token_url, values) == f"https://{host}/services/oauth2/token"


@pytest.mark.parametrize(
    "value", ["evil.example", "login.salesforce.com.evil.example", "acme.my.site.com",
              "na1.salesforce.com", "login.salesforce.com/x"],
)
def test_salesforce_login_host_refuses_other_hosts(tmp_path: Path, value: str) -> None:
    from broker.oauth.service import check_settings

    with pytest.raises(InvalidInput):
        check_settings(load_oauth2(tmp_path, "salesforce"), {"login_host": value})


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_every_url_in_a_catalog_file_is_https(name: str) -> None:
    raw = _raw(CATALOG / f"{name}.yaml")
    urls = [s for s in _strings(raw) if re.match(r"^[a-z][a-z0-9+.-]*://", s)]
    assert all(u.startswith("https://") for u in urls), [u for u in urls if "https://" not in u]


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_verify_requests_are_read_only(name: str) -> None:
    verify = _raw(CATALOG / f"{name}.yaml").get("verify")
    if verify:
        assert verify.get("method", "GET") in ("GET", "HEAD"), f"{name}: verify must not write"


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_provider_file_lists_its_checked_pages(name: str) -> None:
    text = (CATALOG / f"{name}.yaml").read_text(encoding="utf-8")
    assert re.search(r"^# Checked: https://", text, re.M), f"{name}.yaml: no '# Checked:' page"
