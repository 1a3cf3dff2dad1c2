"""Every provider file in the shipped catalog loads through the real config loader.

Each ``providers/*.yaml`` is enabled by name in a throwaway config.yaml and loaded with
``load_settings(path, env={})``, exactly as an operator's config would be. No network: verify
requests go to an ``httpx.MockTransport`` in the test process.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import yaml

from broker.catalog import ApiKeyProvider, ProviderBase, builtin_catalog_dir, render
from broker.config import Settings, load_settings
from broker.errors import ConfigError, CredentialRejected
from broker.providers import verify_credential

CATALOG = builtin_catalog_dir()
PROVIDER_FILES = sorted(CATALOG.glob("*.yaml"))
PROVIDER_NAMES = [p.stem for p in PROVIDER_FILES]
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
    if _raw(CATALOG / f"{name}.yaml").get("auth_type") == "oauth2":
        return {"client_id": "test-client-id", "client_secret": "test-client-secret"}
    return {}


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
