"""The provider index for people: ``docs/providers.md``, generated from the catalog.

    python -m broker.catalog_index            # rewrite docs/providers.md
    python -m broker.catalog_index --check    # exit 1 when it is not fresh

One row per catalog file: its name and display name, its auth type, what the user enters
to connect, whether a redirect URI must be registered with the provider (and which), its
default scopes, and the documentation pages it was checked against (``docs_url`` and the
``# Checked:`` lines of its header). Built from the files as written (no operator values
are needed), so it is the same on every machine.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from .auth import kind
from .catalog import builtin_catalog_dir

__all__ = ["INDEX", "render_index", "rows"]

INDEX = Path(__file__).resolve().parent.parent / "docs" / "providers.md"
# A checked page starts its line of the header's "# Checked:" block.
_PAGE = re.compile(r"^#(?: Checked:)?\s+(https?://[^\s)\"',;]+)")
REDIRECT = "`<public_url>/oauth/callback`"


def _checked(text: str) -> list[str]:
    """The URLs of a file's ``# Checked:`` block (the header comment's first lines)."""
    urls: list[str] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# Checked:"):
            inside = True
        elif line.startswith("# - "):
            inside = False
        match = _PAGE.match(line) if inside else None
        if match and "{" not in match.group(1):
            urls.append(match.group(1).rstrip("."))
    return list(dict.fromkeys(urls))


def _enters(data: dict[str, Any]) -> str:
    """What the user gives to connect."""
    auth_type = str(data.get("auth_type", ""))
    if auth_type == "oauth2_cc":
        return "client ID, client secret" + (", audience" if data.get("audience") else "")
    titles = [str(f.get("title", n)) for n, f in (data.get("fields") or {}).items()]
    settings = [str(f.get("title", n)) for n, f in (data.get("settings") or {}).items()]
    if kind(auth_type).connect == "popup":
        what = {"app_installation": "installs the app"}.get(auth_type, "signs in")
        return "; ".join([*(f"{t} (setting)" for t in settings), f"{what} in a popup"])
    return ", ".join(titles)


def rows(catalog: Path | None = None) -> list[dict[str, str]]:
    """One row per catalog file, sorted by name."""
    found = []
    for path in sorted((catalog or builtin_catalog_dir()).glob("*.yaml"), key=lambda p: p.stem):
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        auth_type = str(data.get("auth_type", ""))
        popup = kind(auth_type).connect == "popup"
        docs = list(dict.fromkeys([*([data["docs_url"]] if data.get("docs_url") else []),
                                   *_checked(text)]))
        scopes = data.get("default_scopes") or []
        found.append({
            "name": path.stem,
            "display_name": str(data.get("display_name", path.stem)),
            "auth_type": auth_type,
            "enters": _enters(data),
            "redirect": REDIRECT if popup else "—",
            "scopes": " ".join(f"`{s}`" for s in scopes) or "—",
            "docs": " ".join(f"[{i + 1}]({u})" for i, u in enumerate(docs)) or "—",
        })
    return found


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def render_index(catalog: Path | None = None) -> str:
    items = rows(catalog)
    lines = [
        "# Providers",
        "",
        "Generated from `providers/` by `python -m broker.catalog_index`; do not edit by hand",
        "(a test checks it is fresh). Every file names the provider documentation it was",
        "checked against; the numbers link to those pages. Popup providers need the broker's",
        "redirect URI registered with the provider (`broker providers list` prints it).",
        "",
        f"{len(items)} providers.",
        "",
        "| provider | name | auth | the user enters | redirect URI | default scopes "
        "| checked against |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in items:
        lines.append("| " + " | ".join(_cell(r[k]) for k in (
            "display_name", "name", "auth_type", "enters", "redirect", "scopes", "docs")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render_index()
    if "--check" in argv:
        fresh = INDEX.exists() and INDEX.read_text(encoding="utf-8") == text
        if not fresh:
            print(f"{INDEX} is not fresh: run python -m broker.catalog_index", file=sys.stderr)
        return 0 if fresh else 1
    INDEX.parent.mkdir(parents=True, exist_ok=True)
    INDEX.write_text(text, encoding="utf-8")
    print(f"wrote {INDEX} ({text.count(chr(10)) - 11} providers)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
