"""config.yaml loading: defaults, interpolation, validation and provider resolution.

Every error test asserts the problem line names the file, the dotted key path and what was
expected, because that is what an operator sees before the process exits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from broker.catalog import ApiKeyProvider, builtin_catalog_dir
from broker.config import Settings, load_settings
from broker.errors import ConfigError

TOKEN = "service-token-0123456789"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config(tmp_path: Path, text: str) -> Path:
    return write(tmp_path / "config.yaml", text)


def load(path: Path, env: dict[str, str] | None = None) -> Settings:
    return load_settings(path, env={} if env is None else env)


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def line_for(problems: list[str], path: Path, key: str) -> str:
    """The one problem line for ``key`` in ``path``, as ``<file>: <key>: <expected>``."""
    prefix = f"{path}: {key}: "
    matching = [p for p in problems if p.startswith(prefix)]
    assert len(matching) == 1, f"expected one line starting {prefix!r} in {problems}"
    return matching[0]


# --- defaults and minimal config ------------------------------------------------------------


def test_no_config_file_gives_every_default_with_sqlite_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, env={})
    assert settings.source is None
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    assert settings.sqlite_path() == tmp_path / "broker.db"
    assert settings.default_key_file() == tmp_path / "broker.key"
    assert settings.encryption_keys == []
    assert settings.key_file is None
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.auth.service_tokens == []
    assert settings.providers == {}
    assert settings.resolved_providers == {}
    assert settings.catalog_paths == []
    assert settings.plugins == []
    assert settings.log_level == "info"


def test_no_path_reads_config_yaml_from_the_working_directory_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config(tmp_path, "log_level: debug\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, env={})
    assert settings.log_level == "debug"
    assert settings.source == (tmp_path / "config.yaml").resolve()


def test_empty_config_file_is_all_defaults(tmp_path: Path) -> None:
    settings = load(config(tmp_path, "# nothing here\n"))
    assert settings.log_level == "info"
    assert settings.resolved_providers == {}


def test_minimal_config_enables_a_catalog_provider_in_a_few_lines(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        f"auth:\n  service_tokens: [{TOKEN}]\nproviders:\n  openweathermap: {{}}\n",
    )
    settings = load(path)
    assert [t.get_secret_value() for t in settings.auth.service_tokens] == [TOKEN]
    spec = settings.resolved_providers["openweathermap"]
    assert isinstance(spec, ApiKeyProvider)
    assert spec.name == "openweathermap"
    assert spec.display_name == "OpenWeatherMap"
    assert spec.fields["api_key"].title == "API key"
    assert spec.verify is not None
    assert spec.apply_to({"api_key": "k"}) == ({}, {"appid": "k"})


def test_provider_named_with_no_value_is_enabled_from_the_catalog(tmp_path: Path) -> None:
    settings = load(config(tmp_path, "providers:\n  openweathermap:\n"))
    assert settings.resolved_providers["openweathermap"].display_name == "OpenWeatherMap"


# --- file-level errors ------------------------------------------------------------------------


def test_missing_config_file_is_reported_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problems_of(path) == [f"{path}: file not found"]


def test_malformed_yaml_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = config(tmp_path, "log_level: info\nproviders: [openweathermap\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: not valid YAML:")
    assert "line 2" in problem


def test_non_utf8_config_file_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00log_level: [")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: not UTF-8 text")


def test_top_level_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = config(tmp_path, "- database_url\n- log_level\n")
    assert problems_of(path) == [f"{path}: expected a mapping of settings at the top level"]


# --- key-level errors -------------------------------------------------------------------------


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    path = config(tmp_path, "databse_url: sqlite+aiosqlite:///x.db\n")
    assert problems_of(path) == [f"{path}: databse_url: unknown key"]


def test_unknown_nested_key_is_named_by_its_dotted_path(tmp_path: Path) -> None:
    path = config(tmp_path, f"auth:\n  tokens: [{TOKEN}]\n")
    assert problems_of(path) == [f"{path}: auth.tokens: unknown key"]


def test_wrong_type_in_a_list_names_the_item_index(tmp_path: Path) -> None:
    path = config(tmp_path, f"auth:\n  service_tokens: [{TOKEN}, 12345678901234567890]\n")
    line = line_for(problems_of(path), path, "auth.service_tokens[1]")
    assert "valid string" in line


def test_wrong_type_for_a_list_setting_says_a_list_was_expected(tmp_path: Path) -> None:
    path = config(tmp_path, "catalog_paths: 5\n")
    assert "valid list" in line_for(problems_of(path), path, "catalog_paths")


def test_provider_entry_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = config(tmp_path, "providers:\n  openweathermap: yes please\n")
    assert "valid dictionary" in line_for(problems_of(path), path, "providers.openweathermap")


def test_log_level_outside_the_known_levels_is_rejected(tmp_path: Path) -> None:
    path = config(tmp_path, "log_level: loud\n")
    assert "debug|info|warning|error" in line_for(problems_of(path), path, "log_level")


def test_plugin_reference_without_attribute_is_rejected(tmp_path: Path) -> None:
    path = config(tmp_path, "plugins: [my_plugins]\n")
    assert "'module:attribute'" in line_for(problems_of(path), path, "plugins")


def test_invalid_provider_name_is_rejected(tmp_path: Path) -> None:
    path = config(tmp_path, "providers:\n  Open Weather: {}\n")
    line = line_for(problems_of(path), path, "providers")
    assert "'Open Weather'" in line
    assert "must match" in line


def test_several_problems_are_reported_together_in_one_error(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "databse_url: x\n"
        "log_level: loud\n"
        "public_url: 'https://broker.example.com/?x=1'\n"
        "auth:\n  service_tokens: [short]\n"
        "database_url: 'mysql://u@db/broker'\n",
    )
    problems = problems_of(path)
    assert len(problems) == 5
    line_for(problems, path, "databse_url")
    line_for(problems, path, "log_level")
    line_for(problems, path, "public_url")
    line_for(problems, path, "auth.service_tokens[0]")
    line_for(problems, path, "database_url")


def test_several_provider_problems_are_reported_together(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "providers:\n"
        "  openweathermap:\n    fields:\n      api_key:\n        pattern: '(['\n"
        "  nosuch: {}\n"
        "  inline:\n    auth_type: apikey\n    display_name: Inline\n"
        "    fields: {token: {title: Token}}\n    colour: red\n",
    )
    problems = problems_of(path)
    assert len(problems) == 3
    line_for(problems, path, "providers.openweathermap.fields.api_key.pattern")
    line_for(problems, path, "providers.nosuch")
    assert line_for(problems, path, "providers.inline.colour").endswith(": unknown key")


# --- interpolation ----------------------------------------------------------------------------


def test_environment_variable_is_interpolated(tmp_path: Path) -> None:
    path = config(tmp_path, "database_url: ${DB_URL}\nauth:\n  service_tokens: ['${TOKEN}']\n")
    settings = load(path, env={"DB_URL": "postgresql+asyncpg://u@db/broker", "TOKEN": TOKEN})
    assert settings.database_url == "postgresql+asyncpg://u@db/broker"
    assert settings.auth.service_tokens[0].get_secret_value() == TOKEN


def test_interpolation_works_inside_a_longer_string(tmp_path: Path) -> None:
    path = config(tmp_path, "public_url: https://${HOST}:${PORT}/broker\n")
    settings = load(path, env={"HOST": "broker.example.com", "PORT": "8443"})
    assert settings.public_url == "https://broker.example.com:8443/broker"


def test_default_is_used_when_the_variable_is_unset(tmp_path: Path) -> None:
    path = config(tmp_path, "log_level: ${LEVEL:-warning}\n")
    assert load(path).log_level == "warning"
    assert load(path, env={"LEVEL": "debug"}).log_level == "debug"


def test_default_is_used_when_the_variable_is_empty_as_in_the_shell(tmp_path: Path) -> None:
    path = config(tmp_path, "log_level: ${LEVEL:-warning}\n")
    assert load(path, env={"LEVEL": ""}).log_level == "warning"


def test_empty_default_is_allowed(tmp_path: Path) -> None:
    path = config(tmp_path, "providers:\n  openweathermap:\n    docs_url: '${DOCS:-}'\n")
    assert load(path).resolved_providers["openweathermap"].docs_url == ""


def test_missing_variable_is_an_error_naming_the_key_and_the_variable(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        f"auth:\n  service_tokens: [{TOKEN}, '${{SECOND_TOKEN}}']\n"
        "providers:\n  openweathermap:\n    verify:\n      url: https://x/${VERIFY_HOST}\n",
    )
    problems = problems_of(path)
    assert len(problems) == 2
    assert line_for(problems, path, "auth.service_tokens[1]").endswith(
        "environment variable SECOND_TOKEN is not set"
    )
    assert line_for(problems, path, "providers.openweathermap.verify.url").endswith(
        "environment variable VERIFY_HOST is not set"
    )


def test_double_dollar_is_a_literal_dollar_and_is_not_interpolated(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "providers:\n  openweathermap:\n    display_name: 'Costs $$5 and ${HOME}'\n"
        "    docs_url: 'literal $${HOME}'\n",
    )
    spec = load(path, env={"HOME": "/root"}).resolved_providers["openweathermap"]
    assert spec.display_name == "Costs $5 and /root"
    assert spec.docs_url == "literal ${HOME}"


def test_interpolated_value_is_validated_like_a_written_one(tmp_path: Path) -> None:
    path = config(tmp_path, "log_level: ${LEVEL}\n")
    line_for(problems_of(path, env={"LEVEL": "loud"}), path, "log_level")


def test_without_env_argument_the_process_environment_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path, "log_level: ${BROKER_TEST_LEVEL}\n")
    monkeypatch.setenv("BROKER_TEST_LEVEL", "error")
    assert load_settings(path).log_level == "error"
    line_for(problems_of(path, env={}), path, "log_level")


# --- providers: catalog, overrides, inline ----------------------------------------------------


ACME_CATALOG = (
    "display_name: Acme\n"
    "auth_type: apikey\n"
    "docs_url: https://acme.example/keys\n"
    "fields:\n"
    "  api_key: {title: API key, pattern: '^ak_[a-z0-9]{8}$'}\n"
    "  account: {title: Account, secret: false}\n"
    "apply:\n  headers: {X-Key: '{api_key}'}\n"
    "verify:\n  url: https://acme.example/me\n  ok_status: [200, 204]\n"
)


def test_provider_override_merges_over_the_catalog_key_by_key(tmp_path: Path) -> None:
    write(tmp_path / "catalog" / "acme.yaml", ACME_CATALOG)
    path = config(
        tmp_path,
        "catalog_paths: [catalog]\n"
        "providers:\n  acme:\n    display_name: Acme Corp\n"
        "    fields:\n      api_key:\n        description: From your account page\n",
    )
    spec = load(path).resolved_providers["acme"]
    assert isinstance(spec, ApiKeyProvider)
    assert spec.display_name == "Acme Corp"
    assert set(spec.fields) == {"api_key", "account"}
    field = spec.fields["api_key"]
    assert field.description == "From your account page"
    assert field.title == "API key"
    assert field.pattern == "^ak_[a-z0-9]{8}$"
    assert spec.fields["account"].secret is False
    assert spec.docs_url == "https://acme.example/keys"
    assert spec.apply is not None and spec.apply.headers == {"X-Key": "{api_key}"}
    assert spec.verify is not None and spec.verify.ok_status == [200, 204]


def test_builtin_provider_override_changes_display_name_and_keeps_fields(
    tmp_path: Path,
) -> None:
    path = config(tmp_path, "providers:\n  openweathermap:\n    display_name: Weather\n")
    spec = load(path).resolved_providers["openweathermap"]
    assert isinstance(spec, ApiKeyProvider)
    assert spec.display_name == "Weather"
    assert spec.fields["api_key"].title == "API key"
    assert spec.apply_to({"api_key": "k"}) == ({}, {"appid": "k"})


def test_override_list_value_replaces_the_catalog_list(tmp_path: Path) -> None:
    write(tmp_path / "catalog" / "acme.yaml", ACME_CATALOG)
    path = config(
        tmp_path,
        "catalog_paths: [catalog]\nproviders:\n  acme:\n    verify: {ok_status: [201]}\n",
    )
    spec = load(path).resolved_providers["acme"]
    assert isinstance(spec, ApiKeyProvider)
    assert spec.verify is not None
    assert spec.verify.ok_status == [201]
    assert spec.verify.url == "https://acme.example/me"


def test_verify_null_removes_verification(tmp_path: Path) -> None:
    path = config(tmp_path, "providers:\n  openweathermap:\n    verify: null\n")
    spec = load(path).resolved_providers["openweathermap"]
    assert isinstance(spec, ApiKeyProvider)
    assert spec.verify is None
    assert spec.apply is not None


def test_inline_provider_needs_no_catalog_file(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "providers:\n  acme:\n    auth_type: apikey\n    display_name: Acme\n"
        "    fields:\n      token: {title: Token}\n"
        "    apply:\n      headers: {Authorization: 'Bearer {token}'}\n",
    )
    assert not (builtin_catalog_dir() / "acme.yaml").exists()
    spec = load(path).resolved_providers["acme"]
    assert isinstance(spec, ApiKeyProvider)
    assert spec.display_name == "Acme"
    assert spec.apply_to({"token": "t"}) == ({"Authorization": "Bearer t"}, {})


def test_inline_provider_template_naming_an_unknown_field_is_rejected(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "providers:\n  acme:\n    auth_type: apikey\n    display_name: Acme\n"
        "    fields:\n      token: {title: Token}\n"
        "    apply:\n      query: {key: '{api_key}'}\n",
    )
    line = line_for(problems_of(path), path, "providers.acme")
    assert "apply names ['api_key'], which a connection does not have" in line


def test_inline_provider_with_unsupported_auth_type_lists_the_known_ones(tmp_path: Path) -> None:
    path = config(
        tmp_path, "providers:\n  acme:\n    auth_type: carrier-pigeon\n    display_name: A\n"
    )
    line = line_for(problems_of(path), path, "providers.acme")
    assert "auth_type: expected one of " in line
    assert "apikey" in line
    assert "got 'carrier-pigeon'" in line


def test_unknown_provider_names_the_catalog_search_path(tmp_path: Path) -> None:
    path = config(tmp_path, "catalog_paths: [my-catalog]\nproviders:\n  nosuch: {}\n")
    line = line_for(problems_of(path), path, "providers.nosuch")
    assert "unknown provider" in line
    assert "nosuch.yaml" in line
    assert str(tmp_path / "my-catalog") in line
    assert str(builtin_catalog_dir()) in line


def test_catalog_paths_resolve_against_the_config_directory_and_come_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    write(
        conf / "catalog" / "openweathermap.yaml",
        "display_name: Local weather\nauth_type: apikey\nfields:\n  key: {title: Key}\n",
    )
    write(
        conf / "catalog" / "acme.yaml",
        "display_name: Acme\nauth_type: apikey\nfields:\n  token: {title: Token}\n",
    )
    path = config(conf, "catalog_paths: [catalog]\nproviders:\n  openweathermap: {}\n  acme: {}\n")
    monkeypatch.chdir(tmp_path)
    settings = load(path)
    assert settings.catalog_paths == [conf / "catalog"]
    assert settings.resolved_providers["openweathermap"].display_name == "Local weather"
    assert settings.resolved_providers["acme"].display_name == "Acme"


def test_catalog_file_with_client_id_is_rejected_naming_that_file(tmp_path: Path) -> None:
    catalog = write(
        tmp_path / "catalog" / "acme.yaml",
        "display_name: Acme\nauth_type: apikey\nclient_id: abc\nfields:\n  token: {title: T}\n",
    )
    path = config(tmp_path, "catalog_paths: [catalog]\nproviders:\n  acme: {}\n")
    problems = problems_of(path)
    assert f"{catalog}: client_id: belongs in config.yaml, not here" in problems


def test_malformed_catalog_file_is_reported_with_its_name(tmp_path: Path) -> None:
    catalog = write(tmp_path / "catalog" / "acme.yaml", "display_name: [Acme\n")
    path = config(tmp_path, "catalog_paths: [catalog]\nproviders:\n  acme: {}\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{catalog}: not valid YAML")


def test_invalid_regex_in_a_field_pattern_is_rejected_with_the_full_key_path(
    tmp_path: Path,
) -> None:
    path = config(
        tmp_path,
        "providers:\n  openweathermap:\n    fields:\n      api_key:\n        pattern: '[a-z'\n",
    )
    line = line_for(problems_of(path), path, "providers.openweathermap.fields.api_key.pattern")
    assert "not a valid regular expression" in line
    assert str(builtin_catalog_dir() / "openweathermap.yaml") in line


# --- paths and URLs ---------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc" / "broker"
    path = config(conf, "database_url: sqlite+aiosqlite:///data/broker.db\nkey_file: keys/k.key\n")
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "x", "").parent)
    settings = load(path)
    assert settings.database_url == f"sqlite+aiosqlite:///{conf / 'data' / 'broker.db'}"
    assert settings.sqlite_path() == conf / "data" / "broker.db"
    assert settings.key_file == conf / "keys" / "k.key"
    assert settings.base_dir == conf


def test_default_key_file_sits_beside_a_relative_sqlite_database(tmp_path: Path) -> None:
    path = config(tmp_path, "database_url: sqlite+aiosqlite:///state/broker.db\n")
    assert load(path).default_key_file() == tmp_path / "state" / "broker.key"


def test_absolute_sqlite_path_and_postgresql_url_are_left_as_written(tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "b.db"
    path = config(tmp_path, f"database_url: sqlite+aiosqlite:///{absolute}\n")
    assert make_url(load(path).database_url).database == str(absolute)
    pg = "postgresql+asyncpg://broker:pw@db:5432/broker"
    path = config(tmp_path, f"database_url: '{pg}'\n")
    assert load(path).database_url == pg


@pytest.mark.parametrize(
    ("url", "driver"),
    [("mysql://u@db/broker", "'mysql'"), ("sqlite:///broker.db", "'sqlite'")],
)
def test_unsupported_database_driver_is_rejected(tmp_path: Path, url: str, driver: str) -> None:
    path = config(tmp_path, f"database_url: '{url}'\n")
    line = line_for(problems_of(path), path, "database_url")
    assert "expected a sqlite+aiosqlite:/// or postgresql+asyncpg:// URL" in line
    assert f"got driver {driver}" in line


def test_database_url_that_is_not_a_url_is_rejected(tmp_path: Path) -> None:
    path = config(tmp_path, "database_url: just-a-file.db\n")
    assert "not a database URL" in line_for(problems_of(path), path, "database_url")


def test_short_service_token_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    path = config(tmp_path, f"auth:\n  service_tokens: [{TOKEN}, hunter2-secret]\n")
    problems = problems_of(path)
    line = line_for(problems, path, "auth.service_tokens[1]")
    assert "at least 16 characters" in line
    assert "hunter2-secret" not in "\n".join(problems)


def test_service_token_of_exactly_16_characters_is_accepted(tmp_path: Path) -> None:
    path = config(tmp_path, "auth:\n  service_tokens: [0123456789abcdef]\n")
    assert len(load(path).auth.service_tokens) == 1


@pytest.mark.parametrize(
    "url",
    ["https://broker.example.com/?next=1", "https://broker.example.com/#top", "broker.example.com"],
)
def test_public_url_with_query_fragment_or_no_scheme_is_rejected(tmp_path: Path, url: str) -> None:
    path = config(tmp_path, f"public_url: '{url}'\n")
    line = line_for(problems_of(path), path, "public_url")
    assert "expected an absolute http(s) URL without query or fragment" in line


def test_public_url_trailing_slash_is_stripped(tmp_path: Path) -> None:
    path = config(tmp_path, "public_url: https://broker.example.com/base/\n")
    assert load(path).public_url == "https://broker.example.com/base"


def test_server_section_has_defaults_and_refuses_values_out_of_range(tmp_path: Path) -> None:
    server = load(config(tmp_path, "")).server
    assert (server.header_timeout_seconds, server.body_timeout_seconds) == (10.0, 30.0)
    assert (server.keep_alive_seconds, server.max_connections) == (5, 2048)
    path = config(
        tmp_path,
        "server:\n  header_timeout_seconds: 0\n  max_connections: 0\n  keep_alive: 5\n",
    )
    problems = problems_of(path)
    assert "greater than 0" in line_for(problems, path, "server.header_timeout_seconds")
    assert "greater than or equal to 1" in line_for(problems, path, "server.max_connections")
    assert "unknown key" in line_for(problems, path, "server.keep_alive")
