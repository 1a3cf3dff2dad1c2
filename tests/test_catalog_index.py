"""docs/providers.md is generated from the catalog and committed: it must be fresh, list
every file, and link each to the documentation it was checked against."""

from __future__ import annotations

from broker.catalog import builtin_catalog_dir
from broker.catalog_index import INDEX, render_index, rows


def test_the_provider_index_is_fresh() -> None:
    assert INDEX.read_text(encoding="utf-8") == render_index(), (
        "docs/providers.md is stale: run python -m broker.catalog_index"
    )


def test_every_provider_has_a_row_with_its_checked_pages() -> None:
    found = rows()
    names = sorted(p.stem for p in builtin_catalog_dir().glob("*.yaml"))
    assert [r["name"] for r in found] == names
    for row in found:
        assert row["docs"].startswith("[1](https://"), row["name"]
        assert row["enters"], row["name"]
        assert (row["redirect"] != "—") == (row["auth_type"] in {
            "oauth2", "oauth1", "app_installation"}), row["name"]
