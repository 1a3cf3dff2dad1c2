"""The ``broker`` command with a bad or good config.yaml, run as a real subprocess.

A bad configuration must stop every command with exit status 2 and every problem on
stderr, before a database, key or token file is created.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.crypto import generate_key

BAD_CONFIG = (
    "database_url: sqlite+aiosqlite:///state.db\n"
    "databse_url: sqlite+aiosqlite:///typo.db\n"
    "log_level: loud\n"
    "public_url: 'https://broker.example.com/?x=1'\n"
    "auth:\n  service_tokens: [short]\n"
)
BAD_KEYS = ["databse_url", "log_level", "public_url", "auth.service_tokens[0]"]


def run_broker(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_rejected(result: subprocess.CompletedProcess[str], label: str, keys: list[str]) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "broker: configuration is invalid:"
    for key in keys:
        assert any(line.startswith(f"  {label}: {key}: ") for line in lines), (key, lines)


@pytest.mark.parametrize(
    "command",
    [["db", "upgrade"], ["serve", "--port", "0"], ["keys", "rotate"], ["providers", "list"]],
    ids=["db-upgrade", "serve", "keys-rotate", "providers-list"],
)
def test_bad_config_exits_2_listing_every_problem_and_creates_no_files(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_CONFIG)
    result = run_broker(tmp_path, *command, "--config", "bad.yaml")
    assert_rejected(result, "bad.yaml", BAD_KEYS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_bad_provider_config_exits_2_before_touching_the_database(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "providers:\n"
        "  nosuch: {}\n"
        "  openweathermap:\n    fields:\n      api_key:\n        pattern: '(['\n"
    )
    result = run_broker(tmp_path, "db", "upgrade", "--config", "bad.yaml")
    assert_rejected(
        result, "bad.yaml", ["providers.nosuch", "providers.openweathermap.fields.api_key.pattern"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_environment_variable_exits_2_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("database_url: ${BROKER_TEST_UNSET_DB_URL}\n")
    result = run_broker(tmp_path, "db", "upgrade", "--config", "config.yaml")
    assert_rejected(result, "config.yaml", ["database_url"])
    assert "BROKER_TEST_UNSET_DB_URL" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_broker(tmp_path, "db", "upgrade", "--config", "absent.yaml")
    assert result.returncode == 2
    assert "  absent.yaml: file not found" in result.stderr.splitlines()
    assert list(tmp_path.iterdir()) == []


def test_broker_config_environment_variable_is_honoured(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_CONFIG)
    result = run_broker(tmp_path, "db", "upgrade", env={"BROKER_CONFIG": "bad.yaml"})
    assert_rejected(result, "bad.yaml", BAD_KEYS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_broker_config_points_at_a_good_config_outside_the_working_directory(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "etc" / "good.yaml"
    conf.parent.mkdir()
    conf.write_text("providers:\n  openweathermap: {display_name: Weather}\n")
    work = tmp_path / "work"
    work.mkdir()
    result = run_broker(work, "providers", "list", env={"BROKER_CONFIG": str(conf)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["openweathermap", "Weather", "apikey"]


def test_config_option_takes_precedence_over_broker_config(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_CONFIG)
    (tmp_path / "good.yaml").write_text("providers:\n  openweathermap: {}\n")
    result = run_broker(
        tmp_path, "providers", "list", "--config", "good.yaml", env={"BROKER_CONFIG": "bad.yaml"}
    )
    assert result.returncode == 0, result.stderr
    assert "openweathermap" in result.stdout


def test_providers_list_shows_each_enabled_provider_and_only_those(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(
        "providers:\n"
        "  openweathermap: {}\n"
        "  acme:\n    auth_type: apikey\n    display_name: Acme Inline\n"
        "    fields: {token: {title: Token}}\n"
    )
    result = run_broker(tmp_path, "providers", "list", "--config", "good.yaml")
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1)[0] for line in result.stdout.splitlines()]
    assert rows == ["openweathermap", "acme"]
    assert "OpenWeatherMap" in result.stdout
    assert "Acme Inline" in result.stdout
    assert "openai" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.yaml"]


def test_serve_without_service_tokens_on_postgresql_exits_2_before_connecting(
    tmp_path: Path,
) -> None:
    # Port 9 (discard) on localhost: if serve tried to connect it would fail differently.
    (tmp_path / "pg.yaml").write_text(
        "database_url: postgresql+asyncpg://broker@127.0.0.1:9/broker\n"
        f"encryption_keys: ['{generate_key()}']\n"
    )
    result = run_broker(tmp_path, "serve", "--port", "0", "--config", "pg.yaml")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{tmp_path / 'pg.yaml'}: auth.service_tokens: at least one token" in result.stderr
