"""``broker providers``: the catalog as this configuration sees it, checking one provider,
and converting Nango-format definitions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click

from ..auth import kind
from ..catalog import (
    PopupProvider,
    ProviderBase,
    builtin_catalog_dir,
    find_provider_file,
    load_yaml_file,
    merge,
    parse_provider,
)
from ..config import Settings
from .common import config_option, load_config
from .progress import Progress

__all__ = ["describe", "providers"]


@click.group()
def providers() -> None:
    """The provider catalog."""


@providers.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--only", "only", multiple=True, help="Convert only these entries (repeatable).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("providers-imported"), show_default=True,
              help="Where to write the provider files.")
def providers_import(source: Path, only: tuple[str, ...], out: Path) -> None:
    """Convert a file in Nango's providers.yaml format into broker provider files, and
    say, for each entry, what could not be carried over and why."""
    import yaml

    from ..nangoimport import convert, dump_provider

    try:
        entries = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{source}: not YAML ({type(exc).__name__})") from None
    if not isinstance(entries, dict):
        raise click.ClickException(f"{source}: expected a mapping of provider entries")
    names = list(only) or sorted(str(k) for k in entries)
    missing = [n for n in names if n not in entries]
    if missing:
        raise click.ClickException(f"not in {source}: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    written = refused = 0
    with Progress(len(names), "converting") as progress:
        for done, name in enumerate(names, 1):
            result = convert(name, entries)
            if result.data is None:
                refused += 1
                click.echo(f"{name}: refused: {result.refused}")
            else:
                written += 1
                (out / f"{name}.yaml").write_text(
                    dump_provider(name, result.data, source.name), encoding="utf-8"
                )
                click.echo(f"{name}: written to {out / (name + '.yaml')}")
            for note in result.notes:
                click.echo(f"  - {note}")
            progress.to(done)
    click.echo(f"{written} written, {refused} refused")


@providers.command("list")
@config_option
def providers_list(config_path: Path | None) -> None:
    """The enabled providers, how each is connected, and the OAuth2 redirect URI."""
    settings = load_config(config_path)
    oauth = False
    for name, spec in settings.resolved_providers.items():
        auth_type = getattr(spec, "auth_type", "")
        oauth = oauth or kind(auth_type).connect == "popup"
        click.echo(f"{name:20} {spec.display_name:24} {auth_type}")
    if oauth:
        click.echo(
            "\nRedirect URI to register with each provider connected by a sign-in popup: "
            f"{settings.redirect_uri}"
        )


_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def _templates(spec: ProviderBase) -> Iterator[tuple[str, str]]:
    """(what, URL template) of every URL the provider's connections use."""
    if isinstance(spec, PopupProvider):
        names = ("authorization_url", "request_token_url", "token_url", "refresh_url",
                 "revocation_url")
        for name in names:
            value = getattr(spec, name, None)
            if isinstance(value, str):
                yield name, value
        revocation = getattr(spec, "revocation", None)
        if revocation is not None:
            yield "revocation", revocation.url
    else:
        for name in ("token_url", "audience_url"):
            value = getattr(spec, name, None)
            if isinstance(value, str):
                yield name, value
    verify = getattr(spec, "verify", None)
    if verify is not None:
        yield f"verify ({verify.method})", verify.url
    for name, value in spec.connect_values.items():
        if value.source == "lookup" and value.url:
            yield f"connect value {name}", value.url
    if spec.api is not None:
        yield "api.base_url", spec.api.base_url


def describe(spec: ProviderBase, settings: Settings) -> list[str]:
    """What ``providers check`` prints: the provider's auth type, what a user enters, its
    URLs with each ``{placeholder}`` filled from the value's example or default where it
    has one (and left as written where it has not), and the redirect URI to register for
    a popup provider. Pure: no request is sent."""
    auth = kind(spec.auth_type)
    lines = [f"{spec.name}: {spec.display_name} ({spec.auth_type}: {auth.title}; "
             f"connected {'by a sign-in popup' if auth.connect == 'popup' else 'by a form'})"]
    if spec.docs_url:
        lines.append(f"  docs: {spec.docs_url}")
    values = {}
    for source in ("fields", "settings"):
        for name, field in (getattr(spec, source, None) or {}).items():
            shown = field.example or field.default
            if shown:
                values[name] = shown
            lines.append(
                f"  {source[:-1]} {name}: {field.title}"
                + ("" if field.required else " (optional)")
                + (" [secret]" if field.secret else "")
                + (f" pattern {field.pattern}" if field.pattern else "")
            )
    for what, template in _templates(spec):
        rendered = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
        lines.append(f"  {what}: {rendered}")
        if rendered != template:
            lines.append(f"    (template: {template})")
    if spec.allowed_hosts:
        lines.append(f"  allowed hosts: {', '.join(spec.allowed_hosts)}")
    if auth.connect == "popup":
        lines.append(f"  redirect URI to register with the provider: {settings.redirect_uri}")
    return lines


@providers.command("check")
@config_option
@click.argument("name")
def providers_check(config_path: Path | None, name: str) -> None:
    """Validate one provider (as enabled in config.yaml, or the catalog's file alone when it
    is not enabled) and print its URLs and the redirect URI to register."""
    settings = load_config(config_path)
    spec = settings.resolved_providers.get(name)
    if spec is None:
        search = [*settings.catalog_paths, builtin_catalog_dir()]
        path = find_provider_file(name, search)
        if path is None:
            raise click.ClickException(
                f"no provider {name!r}: not in config.yaml and no {name}.yaml in "
                f"{', '.join(str(d) for d in search)}"
            )
        data = load_yaml_file(path)
        if not isinstance(data, dict):
            raise click.ClickException(f"{path}: expected a mapping")
        # Not enabled: a stand-in client id lets an oauth2 file validate on its own.
        stand_in = {"client_id": "client-id-from-config"} if kind(
            str(data.get("auth_type", ""))).connect == "popup" else {}
        try:
            spec = parse_provider(merge({"name": name, **data}, stand_in))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            click.echo(f"{path}: invalid:", err=True)
            for line in str(exc).splitlines():
                click.echo(f"  {line}", err=True)
            raise SystemExit(1) from None
        click.echo(f"{path}: valid (not enabled in {settings.source or 'config.yaml'}: "
                   f"add `providers: {{{name}: {{...}}}}` to use it)")
    else:
        click.echo(f"providers.{name} in {settings.source or 'the defaults'}: valid")
    for line in describe(spec, settings):
        click.echo(line)
