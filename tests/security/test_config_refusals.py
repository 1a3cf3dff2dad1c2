"""Issue #11, item 9: configurations that load but cannot work, or that cost the loader
gigabytes, are refused at load with a clear message (and without echoing a secret).

- a service token starting with ``bcs_`` (the connect-session prefix) is read as a session
  by the gate, so it would never work;
- two webhooks with the same URL: deliveries are keyed by URL, so both would be signed
  with one of the two secrets;
- YAML aliases: a billion-laughs config.yaml of 565 bytes expands to a billion strings.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import SERVICE_TOKEN

from broker.config import load_settings
from broker.errors import ConfigError
from broker.runtime import Broker
from broker.web import create_app

SESSION_LIKE_TOKEN = "bcs_" + "s3cr3t-service-token-0123456789"
HOOK = "https://app.example.com/hooks/broker?key=k-0123"


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- bcs_ tokens


async def test_a_service_token_with_the_session_prefix_would_never_be_accepted(
    broker: Broker,
) -> None:
    # Why it is refused: the gate reads every bearer token starting bcs_ as a connect
    # session, so such a service token gets a 401 on every route.
    app = create_app(broker, service_tokens=[SESSION_LIKE_TOKEN])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://broker.test"
    ) as client:
        r = await client.get(
            "/groups/g1/integrations", headers={"Authorization": f"Bearer {SESSION_LIKE_TOKEN}"}
        )
    assert r.status_code == 401


def test_a_service_token_with_the_session_prefix_is_refused_at_load_without_echoing_it(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "config.yaml",
        f"auth:\n  service_tokens: [{SERVICE_TOKEN}, {SESSION_LIKE_TOKEN}]\n",
    )
    found = problems(path)
    assert [p for p in found if p.startswith(f"{path}: auth.service_tokens[1]: ")], found
    assert "must not start with 'bcs_'" in "\n".join(found)
    assert "connect-session" in "\n".join(found)
    assert SESSION_LIKE_TOKEN not in "\n".join(found)
    assert "s3cr3t" not in "\n".join(found)


# --------------------------------------------------------------------------- webhooks


def test_two_webhooks_with_the_same_url_are_refused_naming_both_entries_not_the_secrets(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "config.yaml",
        "webhooks:\n"
        f"  - {{url: '{HOOK}', secret: first-secret-0123456789}}\n"
        "  - {url: 'https://other.example.com/hooks', secret: other-secret-0123456789}\n"
        f"  - {{url: '{HOOK}', secret: second-secret-0123456789}}\n",
    )
    found = problems(path)
    text = "\n".join(found)
    assert any(p.startswith(f"{path}: webhooks: ") for p in found), found
    assert "webhooks[2] has the same url as webhooks[0]" in text
    # Neither secret, nor the URL (webhook URLs often carry a key of their own).
    assert "first-secret" not in text and "second-secret" not in text
    assert "k-0123" not in text


def test_webhooks_with_different_urls_each_keep_their_secret(tmp_path: Path) -> None:
    # The control: distinct URLs load, each with its own secret.
    path = write(
        tmp_path / "config.yaml",
        "webhooks:\n"
        "  - {url: 'https://app.example.com/hooks/a', secret: first-secret-0123456789}\n"
        "  - {url: 'https://app.example.com/hooks/b', secret: second-secret-0123456789}\n",
    )
    hooks = load_settings(path, env={}).webhooks
    assert [(h.url, h.secret.get_secret_value()) for h in hooks] == [
        ("https://app.example.com/hooks/a", "first-secret-0123456789"),
        ("https://app.example.com/hooks/b", "second-secret-0123456789"),
    ]


# --------------------------------------------------------------------------- YAML aliases


def billion_laughs() -> str:
    """The classic: ten levels of ten aliases, 10**9 strings once expanded (565 bytes)."""
    lines = ['lol0: &l0 "lol"']
    for level in range(1, 10):
        lines.append(f"lol{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def _limit_memory() -> None:
    # Before the fix this file needs tens of GiB: fail the child, not the machine.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_a_billion_laughs_config_yaml_is_refused_at_once_naming_the_alias(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "config.yaml", billion_laughs())
    assert len(path.read_bytes()) < 600
    try:
        result = subprocess.run(
            [sys.executable, "-m", "broker", "providers", "list", "--config", str(path)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading a billion-laughs config.yaml did not finish in 60 s")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "configuration is invalid" in result.stderr
    assert (
        f"{path}: not valid YAML: line 2, column 12: found the alias *l0: "
        "YAML aliases are not allowed" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [path]  # nothing created


@pytest.fixture(params=["libyaml", "pure Python"])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways ``catalog.load_yaml_file`` reads YAML: libyaml (its events looked through
    for aliases first) and, where libyaml is missing, the pure-Python ``_NoAliasLoader``."""
    from broker import catalog

    if request.param == "pure Python":
        monkeypatch.setattr(catalog, "_CLoader", None)
    else:
        assert catalog._CLoader is not None, "PyYAML's wheel ships libyaml"
    return str(request.param)


def test_an_alias_in_a_provider_catalog_file_is_refused_naming_that_file(
    tmp_path: Path, yaml_loader: str,
) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    provider = write(
        catalog / "laughs.yaml",
        "display_name: &name Laughs\n"
        "auth_type: apikey\n"
        "fields:\n"
        "  api_key: {title: *name}\n",
    )
    path = write(
        tmp_path / "config.yaml", "catalog_paths: [catalog]\nproviders:\n  laughs: {}\n"
    )
    found = problems(path)
    assert found == [
        f"{provider}: not valid YAML: line 4, column 20: found the alias *name: "
        "YAML aliases are not allowed in broker's YAML files (write the value out in full)"
    ]


def test_both_loaders_read_every_catalog_file_alike() -> None:
    from broker import catalog

    files = sorted(catalog.builtin_catalog_dir().glob("*.yaml"))
    assert len(files) >= 150
    with_libyaml = [catalog.load_yaml_file(f) for f in files]
    saved, catalog._CLoader = catalog._CLoader, None
    try:
        pure = [catalog.load_yaml_file(f) for f in files]
    finally:
        catalog._CLoader = saved
    assert with_libyaml == pure


def test_anchors_without_aliases_still_load(tmp_path: Path, yaml_loader: str) -> None:
    # Only aliases are refused: an anchor alone expands nothing.
    path = write(tmp_path / "config.yaml", "log_level: &level warning\n")
    assert load_settings(path, env={}).log_level == "warning"
