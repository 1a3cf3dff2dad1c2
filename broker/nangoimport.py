"""Provider files from a file in Nango's ``providers.yaml`` format (which an operator
downloads themselves: the broker ships none of its entries).

``convert(name, entries)`` is pure: it maps one entry (after following its ``alias``) to
a broker provider file's data, and says what it could not carry over. It refuses, with the
reason, an entry whose auth mode the broker has no type for or that cannot be made safe —
a URL whose whole host comes from a connection value (no allow-list can be inferred), or
a file that does not then load (``catalog.parse_provider``). Mapped:

    auth_mode               OAUTH2 oauth2, OAUTH2_CC oauth2_cc, API_KEY apikey, BASIC basic
    ${connectionConfig.x}   {x}, a setting (oauth2) or field with a pattern (a host-label
                            pattern when it fills a host label and gives none)
    authorization_method    header: client_secret_basic, body: client_secret_post
    body_format             token_request_format
    disable_pkce            pkce (on unless disabled)
    token_response_metadata extra_fields
    alternate_access_token_response_path   token_path, when it names <object>.access_token
    proxy.base_url/headers  api.base_url, api.headers (static ones), api.auth (${apiKey}...)
    proxy.query             api.auth.query
    proxy.retry             api.wait_headers (after: Retry-After style, at: epoch)
    proxy.verification      verify (API keys)
    authorization_params, token_params, refresh_params, scope_separator, default_scopes,
    docs (docs_url), display_name, alias
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .catalog import parse_provider

__all__ = ["HOST_LABEL", "Conversion", "convert", "dump_provider"]

HOST_LABEL = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
MODES = {"OAUTH2": "oauth2", "OAUTH2_CC": "oauth2_cc", "API_KEY": "apikey", "BASIC": "basic"}
_CONFIG = re.compile(r"\$\{connectionConfig\.([A-Za-z0-9_]+)\}")
_CRED = re.compile(r"\$\{(apiKey|username|password|accessToken)\}")
_OTHER = re.compile(r"\$\{[^}]*\}")
_CREDENTIAL_NAMES = {"apiKey": "api_key", "username": "username", "password": "password",
                     "accessToken": "access_token"}
_SUPPORTED = {
    "display_name", "auth_mode", "authorization_url", "token_url", "refresh_url",
    "authorization_params", "token_params", "refresh_params", "scope_separator",
    "default_scopes", "disable_pkce", "authorization_method", "body_format",
    "token_response_metadata", "alternate_access_token_response_path", "proxy", "docs",
    "connection_config", "alias", "categories", "credentials",
}


@dataclass
class Conversion:
    """One entry's outcome: ``data`` to write (None when refused), ``notes`` on what was
    not carried over, ``refused`` why nothing is written."""

    name: str
    data: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    refused: str | None = None


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("-", "_")


def _template(value: str, config_names: set[str], notes: list[str], where: str) -> str:
    """``${connectionConfig.x}`` -> ``{x}``, credentials -> their broker names; any other
    ``${...}`` is reported and left out of the result (the caller refuses on it)."""
    def config(match: re.Match[str]) -> str:
        config_names.add(_snake(match.group(1)))
        return "{" + _snake(match.group(1)) + "}"

    out = _CONFIG.sub(config, value)
    out = _CRED.sub(lambda m: "{" + _CREDENTIAL_NAMES[m.group(1)] + "}", out)
    left = _OTHER.search(out)
    if left is not None:
        notes.append(f"{where}: {left.group(0)} has no broker equivalent")
        raise ValueError(where)
    return out


def _whole_host(template: str) -> str | None:
    """The placeholder that forms a URL's whole host, if one does."""
    match = re.match(r"^https?://\{([a-z0-9_]+)\}(?:[:/]|$)", template)
    return match.group(1) if match else None


def _resolve(name: str, entries: Mapping[str, Any]) -> dict[str, Any]:
    entry = dict(entries[name])
    seen = {name}
    while "alias" in entry and entry["alias"] in entries and entry["alias"] not in seen:
        seen.add(entry["alias"])
        base = copy.deepcopy(dict(entries[entry["alias"]]))
        base.update({k: v for k, v in entry.items() if k != "alias"})
        entry = base
    return entry


def convert(name: str, entries: Mapping[str, Any]) -> Conversion:
    """The broker provider file for entry ``name`` of a Nango-format file."""
    out = Conversion(name)
    entry = _resolve(name, entries)
    mode = MODES.get(str(entry.get("auth_mode", "")))
    if mode is None:
        out.refused = f"auth mode {entry.get('auth_mode')!r} has no broker auth type here"
        return out
    notes = out.notes
    for key in sorted(set(entry) - _SUPPORTED):
        notes.append(f"{key}: not carried over")
    data: dict[str, Any] = {"display_name": entry.get("display_name", name), "auth_type": mode}
    if entry.get("docs"):
        data["docs_url"] = entry["docs"]
    used: set[str] = set()
    try:
        for key in ("authorization_url", "token_url", "refresh_url"):
            if entry.get(key):
                data[key] = _template(str(entry[key]), used, notes, key)
        proxy = entry.get("proxy") or {}
        api: dict[str, Any] = {}
        auth: dict[str, dict[str, str]] = {"headers": {}, "query": {}}
        if proxy.get("base_url"):
            api["base_url"] = _template(str(proxy["base_url"]), used, notes, "proxy.base_url")
        for header, value in (proxy.get("headers") or {}).items():
            text = _template(str(value), used, notes, f"proxy.headers.{header}")
            target = auth["headers"] if "{" in text else api.setdefault("headers", {})
            target[str(header)] = text
        for param, value in (proxy.get("query") or {}).items():
            auth["query"][str(param)] = _template(str(value), used, notes, f"proxy.query.{param}")
    except ValueError as exc:
        out.refused = f"{exc}: a value the broker cannot fill"
        return out
    for key in [k for k in ("authorization_url", "token_url", "refresh_url") if k in data]:
        host = _whole_host(data[key])
        if host is not None:
            out.refused = (f"{key}: its whole host comes from {{{host}}}; no host allow-list can "
                           "be inferred (write allowed_hosts and a pattern by hand)")
            return out
    if api.get("base_url") and _whole_host(api["base_url"]) is not None:
        notes.append("proxy.base_url: its whole host comes from a connection value: left out")
        api.pop("base_url")
    _connection_values(entry, data, mode, used, notes)
    if mode in ("oauth2", "oauth2_cc"):
        _oauth(entry, data, mode, notes)
        if auth["headers"] and "authorization" not in {h.lower() for h in auth["headers"]}:
            auth["headers"]["Authorization"] = "Bearer {access_token}"
    elif mode == "apikey":
        data.setdefault("fields", {})["api_key"] = {"title": "API key", "secret": True}
        if auth["headers"] or auth["query"]:
            data["apply"] = {k: v for k, v in auth.items() if v}
        else:
            notes.append("no proxy header or query carries ${apiKey}: give apply by hand")
        auth = {"headers": {}, "query": {}}
        _verification(proxy, api, data, notes)
    elif mode == "basic":
        fields = data.setdefault("fields", {})
        fields["username"] = {"title": "User name", "secret": False}
        fields["password"] = {"title": "Password", "secret": True}
        auth = {"headers": {}, "query": {}}  # the broker sends Authorization: Basic itself
        _verification(proxy, api, data, notes)
    if auth["headers"] or auth["query"]:
        api["auth"] = {k: v for k, v in auth.items() if v}
    retry = proxy.get("retry") or {}
    waits = []
    if retry.get("after"):
        waits.append({"name": str(retry["after"]), "format": "retry_after"})
    if retry.get("at"):
        waits.append({"name": str(retry["at"]), "format": "epoch"})
    if waits and api.get("base_url"):
        api["wait_headers"] = waits
    if api.get("base_url"):
        data["api"] = api
    elif api:
        notes.append("proxy: no usable base_url, so no api section")
    try:
        check = dict(data)
        if mode == "oauth2":
            check["client_id"] = "check"
        parse_provider({**check, "name": name})
    except ValueError as exc:
        out.refused = f"the converted file does not load: {str(exc).splitlines()[0][:300]}"
        return out
    out.data = data
    return out


def _connection_values(
    entry: Mapping[str, Any], data: dict[str, Any], mode: str, used: set[str], notes: list[str]
) -> None:
    """Declare every ``{x}`` the templates use, from ``connection_config``."""
    config = {_snake(str(k)): v for k, v in (entry.get("connection_config") or {}).items()}
    target = data.setdefault("settings" if mode == "oauth2" else "fields", {})
    for name in sorted(used):
        spec = config.get(name) or {}
        value: dict[str, Any] = {"title": str(spec.get("title") or name.replace("_", " ")),
                                 "secret": False}
        if spec.get("pattern"):
            value["pattern"] = str(spec["pattern"])
        else:
            value["pattern"] = HOST_LABEL
            notes.append(f"{name}: no pattern given; a host label's is used (check it)")
        if spec.get("example"):
            value["example"] = str(spec["example"])
        if spec.get("description"):
            value["description"] = str(spec["description"])
        target[name] = value
    if not target:
        data.pop("settings" if mode == "oauth2" else "fields", None)


def _oauth(entry: Mapping[str, Any], data: dict[str, Any], mode: str, notes: list[str]) -> None:
    method = entry.get("authorization_method")
    if method == "header":
        data["token_endpoint_auth_method"] = "client_secret_basic"
    elif method == "body":
        data["token_endpoint_auth_method"] = "client_secret_post"
    if entry.get("body_format") == "json":
        data["token_request_format"] = "json"
    for key in ("authorization_params", "token_params", "refresh_params"):
        if entry.get(key) and (mode == "oauth2" or key == "token_params"):
            data[key] = {str(k): str(v) for k, v in entry[key].items()}
    if entry.get("scope_separator"):
        data["scope_separator"] = str(entry["scope_separator"])
    if entry.get("default_scopes"):
        data["default_scopes"] = [str(s) for s in entry["default_scopes"]]
    if mode == "oauth2":
        data["pkce"] = not entry.get("disable_pkce", False)
    metadata = entry.get("token_response_metadata") or []
    if metadata:
        data["extra_fields"] = {_snake(str(m).replace(".", "_")): str(m) for m in metadata}
    path = entry.get("alternate_access_token_response_path")
    if path:
        if str(path).endswith(".access_token"):
            data["token_path"] = str(path).removesuffix(".access_token")
        else:
            notes.append(f"alternate_access_token_response_path {path!r}: not carried over")


def _verification(
    proxy: Mapping[str, Any], api: Mapping[str, Any], data: dict[str, Any], notes: list[str]
) -> None:
    check = proxy.get("verification") or {}
    endpoints = check.get("endpoints") or ([check["endpoint"]] if check.get("endpoint") else [])
    if not endpoints:
        return
    base = api.get("base_url")
    method = str(check.get("method", "GET")).upper()
    if base is None or method not in ("GET", "HEAD"):
        notes.append("proxy.verification: not carried over (no base URL, or not read-only)")
        return
    url = base.rstrip("/") + "/" + str(endpoints[0]).lstrip("/")
    data["verify"] = {"method": method, "url": url}


def dump_provider(name: str, data: Mapping[str, Any], source: str) -> str:
    """The provider file's text: a header saying where it came from and that it was not
    checked against the provider's documentation, then the data."""
    import yaml

    header = (
        f"# {data.get('display_name', name)}: imported from {source} (Nango's providers.yaml\n"
        "# format) by `broker providers import`. NOT checked against the provider's own\n"
        "# documentation: check every URL, scope and pattern before enabling it.\n"
    )
    return header + yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True)
