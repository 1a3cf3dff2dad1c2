"""``broker providers import`` on a Nango-format file written for these tests: what each
kind of entry becomes, what is reported as not carried over, what is refused and why,
and that every written file loads as a broker provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from broker.catalog import parse_provider
from broker.cli import main
from broker.nangoimport import HOST_LABEL, convert

FIXTURE = Path(__file__).parent / "fixtures" / "nango-format-providers.yaml"
ENTRIES: dict[str, Any] = yaml.safe_load(FIXTURE.read_text())


def test_an_oauth2_entry_keeps_what_the_broker_can_express() -> None:
    result = convert("acme-crm", ENTRIES)
    assert result.refused is None and result.data is not None
    data = result.data
    assert data["auth_type"] == "oauth2" and data["pkce"] is True
    assert data["token_endpoint_auth_method"] == "client_secret_basic"
    assert data["token_request_format"] == "json"
    assert data["scope_separator"] == "," and data["default_scopes"] == ["contacts.read", "offline"]
    assert data["extra_fields"] == {"account_id": "account.id"}
    assert data["token_path"] == "data"
    assert data["api"]["headers"] == {"accept": "application/json", "x-api-version": "2026-01"}
    assert data["api"]["wait_headers"] == [
        {"name": "retry-after", "format": "retry_after"},
        {"name": "x-ratelimit-reset", "format": "epoch"},
    ]
    assert data["docs_url"] == "https://docs.acme-crm.example/oauth"


def test_connection_values_become_patterned_settings_and_aliases_are_followed() -> None:
    desk = convert("desk", ENTRIES)
    assert desk.data is not None
    assert desk.data["authorization_url"] == "https://{subdomain}.desk.example/oauth/authorize"
    assert desk.data["settings"]["subdomain"]["pattern"] == HOST_LABEL
    assert desk.data["pkce"] is False
    assert any("subdomain: no pattern given" in n for n in desk.notes)
    eu = convert("desk-eu", ENTRIES)
    assert eu.data is not None and eu.data["display_name"] == "Desk (EU)"
    assert eu.data["token_url"] == desk.data["token_url"]


def test_api_keys_get_their_placement_and_a_read_only_verify() -> None:
    result = convert("weatherly", ENTRIES)
    assert result.data is not None
    assert result.data["apply"] == {"query": {"key": "{api_key}"}}
    assert result.data["verify"] == {"method": "GET", "url": "https://api.weatherly.example/v1/me"}


def test_what_cannot_be_made_safe_or_expressed_is_refused_with_the_reason() -> None:
    selfhosted = convert("selfhosted", ENTRIES)
    assert selfhosted.data is None and "whole host" in (selfhosted.refused or "")
    assert "no broker auth type" in (convert("twostep", ENTRIES).refused or "")
    oddity = convert("oddity", ENTRIES)
    assert oddity.data is None and "${credentials.secret}" in " ".join(oddity.notes)
    # A placeholder whose connection_config entry is named differently still gets a
    # pattern (a host label's): the file loads, and the report says so.
    ledger = convert("ledger", ENTRIES)
    assert ledger.data is not None and ledger.data["auth_type"] == "basic"
    assert any("region: no pattern given" in n for n in ledger.notes)


def test_the_command_writes_loadable_files_and_reports_each_entry(tmp_path: Path) -> None:
    out = tmp_path / "imported"
    result = CliRunner().invoke(main, ["providers", "import", str(FIXTURE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "5 written, 3 refused" in result.output
    assert "selfhosted: refused: authorization_url: its whole host" in result.output
    written = sorted(p.stem for p in out.glob("*.yaml"))
    assert written == ["acme-crm", "desk", "desk-eu", "ledger", "weatherly"]
    for path in out.glob("*.yaml"):
        text = path.read_text()
        assert "NOT checked against the provider's own" in text
        data = yaml.safe_load(text)
        if data["auth_type"] == "oauth2":
            data["client_id"] = "x"
        parse_provider({**data, "name": path.stem})
    only = CliRunner().invoke(main, ["providers", "import", str(FIXTURE), "--only", "weatherly",
                                     "--out", str(tmp_path / "one")])
    assert only.exit_code == 0 and "1 written, 0 refused" in only.output
    unknown = CliRunner().invoke(main, ["providers", "import", str(FIXTURE), "--only", "nope"])
    assert unknown.exit_code != 0 and "not in" in unknown.output
