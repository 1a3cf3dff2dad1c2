"""config.yaml -> typed, validated settings.

Loading happens once, at start, before the database is touched. Every problem is reported
as ``<file>: <key.path>: <what was expected>`` in one ``ConfigError``, so an operator fixes
them all in one pass.

``${VAR}`` anywhere in a string value is replaced from the environment; ``${VAR:-default}``
gives a default; ``$${`` is a literal ``${``. A missing variable is an error naming the key.

Relative paths (a SQLite file, ``key_file``, ``catalog_paths``, plugin directories) are
resolved against the directory of the config file, so ``broker serve --config
/etc/broker/config.yaml`` does not depend on the working directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .catalog import (
    NAME_PATTERN,
    ProviderBase,
    builtin_catalog_dir,
    find_provider_file,
    load_yaml_file,
    merge,
    parse_provider,
)
from .errors import ConfigError
from .sessions import SESSION_PREFIX

__all__ = ["DEFAULT_CONFIG_PATH", "Settings", "load_settings"]

DEFAULT_CONFIG_PATH = Path("config.yaml")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _service_token(token: SecretStr) -> SecretStr:
    value = token.get_secret_value()
    if len(value) < 16:
        raise ValueError("a service token must be at least 16 characters")
    if value.startswith(SESSION_PREFIX):
        # The gate reads every bearer token with this prefix as a connect session, so a
        # service token that starts with it would never be accepted.
        raise ValueError(
            f"a service token must not start with {SESSION_PREFIX!r}, the prefix of "
            "connect-session tokens (it would never be accepted as a service token)"
        )
    return token


class AuthSettings(_Model):
    service_tokens: list[Annotated[SecretStr, AfterValidator(_service_token)]] = []
    """Bearer tokens for the host platform's backend and for remote nodes."""
    allowed_origins: list[str] = []
    """Origins of host frontends that may embed the connect page and receive its events."""
    connect_session_ttl_seconds: int = Field(default=1800, ge=60, le=86400)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
                raise ValueError(
                    f"{origin!r} is not an origin: expected scheme://host[:port], no path"
                )
        return value


class WebhookSettings(_Model):
    url: str = Field(pattern=r"^https?://\S+$")
    secret: SecretStr
    """HMAC-SHA256 key for the ``Broker-Signature`` header (at least 16 characters)."""

    @field_validator("secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("a webhook secret must be at least 16 characters")
        return value


class RefreshSettings(_Model):
    min_validity_seconds: int = Field(default=60, ge=0, le=3600)
    """A token handed out is valid for at least this long (refreshed first if not)."""
    interval_seconds: float = Field(default=30.0, ge=1, le=3600)
    max_concurrency: int = Field(default=10, ge=1, le=1000)


class ServerSettings(_Model):
    """How ``broker serve`` treats client connections (see ``broker.web.server``)."""

    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """A request's head (request line and headers) must arrive within this time of the
    connection opening, or of its first byte on a kept-alive connection."""
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """A request's body must arrive in full within this time of its head."""
    keep_alive_seconds: int = Field(default=5, ge=1, le=600)
    """An idle kept-alive connection is closed after this long."""
    max_connections: int = Field(default=2048, ge=1, le=1_000_000)
    """Connections served at once; a request on one more gets 503 and the connection is
    closed. Keep the process's open-file limit (``ulimit -n``) above it."""
    http: Literal["auto", "httptools", "h11"] = "auto"
    """The HTTP/1.1 parser: httptools (C; ``auto`` when installed) or h11 (pure Python).
    Both have the deadlines above."""
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The event loop of ``broker serve`` and ``broker refresher``: uvloop (``auto`` when
    installed) or asyncio's own."""


class ProxySettings(_Model):
    """Calls to providers' APIs: the proxy route and ``ctx.client`` (see ``broker.web.proxy``)."""

    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """Connecting to a provider's API (the read timeout is the provider's
    ``api.timeout_seconds``)."""
    max_request_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """The largest request body the proxy forwards (413 past it); streamed, never held."""
    buffer_bytes: int = Field(default=1024 * 1024, ge=0, le=64 * 1024 * 1024)
    """Request bodies up to this size are held so that a request can be sent again (after
    a refresh or a 429); a larger body is streamed and sent once."""
    max_connections: int = Field(default=100, ge=1, le=100_000)
    """Connections to providers' APIs at once, all providers together."""


class MetricsSettings(_Model):
    """``GET /metrics`` (Prometheus text format; see ``broker.metrics``)."""

    enabled: bool = False
    token: SecretStr | None = None
    """When set, scrapes must send ``Authorization: Bearer <token>`` (and ``allow`` is not
    consulted)."""
    allow: list[str] = ["127.0.0.1/32", "::1/128"]
    """Without a token: the client addresses (networks) that may scrape."""

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"metrics.allow: {item!r} is not an address or network") from None
        return value

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("metrics.token must be at least 16 characters")
        return value


class EventsSettings(_Model):
    """How long events are kept, and how much the sweep prunes at a time (``retention``)."""

    retention_days: int = Field(default=30, ge=1, le=3650)
    """Events older than this are deleted, with their finished webhook deliveries."""
    refreshed_retention_days: int = Field(default=3, ge=1, le=3650)
    """``refreshed`` events (nearly all of them at scale) are deleted sooner."""
    prune_batch_size: int = Field(default=1000, ge=1, le=10_000)
    """Events deleted per transaction."""
    prune_batches_per_sweep: int = Field(default=20, ge=1, le=1000)
    """Transactions per sweep at most: the sweep's pruning work is bounded."""

    @model_validator(mode="after")
    def _refreshed_not_longer(self) -> EventsSettings:
        if self.refreshed_retention_days > self.retention_days:
            raise ValueError(
                f"refreshed_retention_days ({self.refreshed_retention_days}) must not exceed "
                f"retention_days ({self.retention_days})"
            )
        return self


class RawSettings(_Model):
    """config.yaml as written (providers not yet resolved against the catalog)."""

    database_url: str = "sqlite+aiosqlite:///broker.db"
    encryption_keys: list[SecretStr] = []
    key_file: Path | None = None
    public_url: str = "http://127.0.0.1:8000"
    auth: AuthSettings = AuthSettings()
    refresh: RefreshSettings = RefreshSettings()
    server: ServerSettings = ServerSettings()
    events: EventsSettings = EventsSettings()
    proxy: ProxySettings = ProxySettings()
    metrics: MetricsSettings = MetricsSettings()
    webhooks: list[WebhookSettings] = []
    providers: dict[str, dict[str, Any] | None] = {}
    catalog_paths: list[Path] = []
    plugins: list[str] = []
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
    log_format: Literal["text", "json"] = "text"
    """``text``: one line per record for people; ``json``: one JSON object per line, with
    the record's fields (event, group, integration, provider, outcome, duration_ms)."""

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from exc
        if url.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
            raise ValueError(
                "expected a sqlite+aiosqlite:/// or postgresql+asyncpg:// URL, "
                f"got driver {url.drivername!r}"
            )
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", value):
            raise ValueError("expected an absolute http(s) URL without query or fragment")
        return value.rstrip("/")

    @field_validator("webhooks")
    @classmethod
    def _one_secret_per_url(cls, value: list[WebhookSettings]) -> list[WebhookSettings]:
        # Deliveries are keyed by URL: a second entry with the same URL would have every
        # delivery to that URL signed with one of the two secrets, never both.
        seen: dict[str, int] = {}
        for index, hook in enumerate(value):
            if hook.url in seen:
                raise ValueError(
                    f"webhooks[{index}] has the same url as webhooks[{seen[hook.url]}]; "
                    "give each URL one entry (one secret)"
                )
            seen[hook.url] = index
        return value

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"provider name {name!r} must match {NAME_PATTERN}")
        return value

    @field_validator("plugins")
    @classmethod
    def _plugin_refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not re.fullmatch(r"[\w.]+:[\w.]+", ref):
                raise ValueError(f"plugin {ref!r}: expected 'module:attribute'")
        return value


class Settings(RawSettings):
    """Validated settings with providers resolved to specs."""

    source: Path | None = None
    resolved_providers: dict[str, ProviderBase] = {}

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source is not None else Path.cwd()

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.database_url).drivername.startswith("sqlite")

    def sqlite_path(self) -> Path | None:
        url = make_url(self.database_url)
        if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database)

    @property
    def public_origin(self) -> str:
        scheme, _, rest = self.public_url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    @property
    def redirect_uri(self) -> str:
        """The OAuth2 redirect URI to register with every provider."""
        return f"{self.public_url}/oauth/callback"

    def default_key_file(self) -> Path | None:
        if self.key_file is not None:
            return self.key_file
        db = self.sqlite_path()
        return db.with_suffix(".key") if db is not None else None


def _interpolate(value: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in env and (env[name] or default is None):
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else str(k), env, problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(value)]
    return value


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(errors: ValidationError, prefix: str) -> list[str]:
    lines = []
    for err in errors.errors(include_url=False, include_input=False):
        where = _loc(tuple(err["loc"]))
        if prefix:
            where = prefix if where == "(top level)" else f"{prefix}.{where}"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        lines.append(f"{where}: {message}")
    return lines


def _resolve_path(base: Path, value: Path) -> Path:
    return value if value.is_absolute() else (base / value)


def load_settings(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read, interpolate and validate config.yaml, and resolve its providers.

    ``path=None`` means ``./config.yaml`` if it exists, otherwise every default.
    Raises ConfigError listing every problem found.
    """
    env = os.environ if env is None else env
    if path is None:
        path = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    label = str(path) if path is not None else "(defaults)"
    data: Any = {}
    if path is not None:
        try:
            data = load_yaml_file(path)
        except FileNotFoundError:
            raise ConfigError([f"{label}: file not found"]) from None
        except OSError as exc:
            raise ConfigError([f"{label}: cannot be read: {exc.strerror or exc}"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{label}: not UTF-8 text: {exc.reason}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{label}: not valid YAML: {exc}"]) from None
        except RecursionError:
            raise ConfigError([f"{label}: not valid YAML: nested too deeply"]) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError([f"{label}: expected a mapping of settings at the top level"])

    problems: list[str] = []
    try:
        data = _interpolate(data, "", env, problems)
    except RecursionError:
        # A YAML alias inside its own anchor ("a: &a [*a]") makes a value contain itself.
        raise ConfigError(
            [f"{label}: a value contains itself (a recursive YAML alias) or is nested too deeply"]
        ) from None
    if problems:
        raise ConfigError(f"{label}: {p}" for p in problems)
    try:
        raw = RawSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{label}: {line}" for line in _describe(exc, "")) from None

    base = path.resolve().parent if path is not None else Path.cwd()
    settings = Settings.model_validate(
        {**raw.model_dump(), "source": path.resolve() if path is not None else None}
    )
    settings.database_url = _absolute_sqlite(settings.database_url, base)
    if settings.key_file is not None:
        settings.key_file = _resolve_path(base, settings.key_file)
    settings.catalog_paths = [_resolve_path(base, p) for p in settings.catalog_paths]

    search = [*settings.catalog_paths, builtin_catalog_dir()]
    resolved: dict[str, ProviderBase] = {}
    for name, override in raw.providers.items():
        where = f"providers.{name}"
        catalog_file = find_provider_file(name, search)
        base_def: dict[str, Any] = {}
        if catalog_file is not None:
            try:
                loaded = load_yaml_file(catalog_file)
            except yaml.YAMLError as exc:
                problems.append(f"{catalog_file}: not valid YAML: {exc}")
                continue
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{catalog_file}: cannot be read: {exc}")
                continue
            if not isinstance(loaded, dict):
                problems.append(f"{catalog_file}: expected a mapping")
                continue
            base_def = loaded
        elif not override or "auth_type" not in override:
            problems.append(
                f"{label}: {where}: unknown provider: no {name}.yaml in the catalog "
                f"({', '.join(str(d) for d in search)}) and no inline definition with auth_type"
            )
            continue
        for forbidden in ("client_id", "client_secret"):
            if forbidden in base_def:
                problems.append(f"{catalog_file}: {forbidden}: belongs in config.yaml, not here")
        merged = merge({"name": name, **base_def}, override or {})
        merged["name"] = name
        over = f" (merged over {catalog_file})" if catalog_file else ""
        try:
            resolved[name] = parse_provider(merged)
        except ValidationError as exc:
            problems += [f"{label}: {line}{over}" for line in _describe(exc, where)]
        except ValueError as exc:
            problems.append(f"{label}: {where}: {exc}{over}")
    if problems:
        raise ConfigError(problems)
    settings.resolved_providers = resolved
    return settings


def _absolute_sqlite(url_text: str, base: Path) -> str:
    url = make_url(url_text)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return url_text
    db = Path(url.database)
    if db.is_absolute():
        return url_text
    return url.set(database=str(base / db)).render_as_string(hide_password=False)
