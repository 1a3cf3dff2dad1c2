"""Plugins: objects with ``integrations()`` (and optionally ``nodes()``).

Loaded from ``plugins:`` in config.yaml (``module:attribute``; the config file's directory
is importable, like uvicorn's app dir) and from the ``broker.plugins`` entry-point group.
A plugin given as a class is instantiated with no arguments.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import PluginError
from .integrations import Integration

__all__ = ["ENTRY_POINT_GROUP", "Plugin", "load_plugins"]

ENTRY_POINT_GROUP = "broker.plugins"


@runtime_checkable
class Plugin(Protocol):
    def integrations(self) -> Iterable[Integration]: ...


def _resolve(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"plugin {ref!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"plugin {ref!r}: {module_name!r} has no {attr!r}") from None
    return obj


def _contents(obj: Any, source: str) -> tuple[list[Integration], list[type[Any]]]:
    if isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, Plugin):
        raise PluginError(f"plugin {source}: expected an object with integrations()")
    integrations = list(obj.integrations())
    for item in integrations:
        if not isinstance(item, Integration):
            raise PluginError(f"plugin {source}: integrations() returned {item!r}")
    nodes_method = getattr(obj, "nodes", None)
    nodes = list(nodes_method()) if callable(nodes_method) else []
    return integrations, nodes


def load_plugins(
    refs: list[str], *, base_dir: Path, entry_point_group: str = ENTRY_POINT_GROUP
) -> Iterator[tuple[list[Integration], list[type[Any]], str]]:
    """Yield ``(integrations, nodes, source)`` for each configured and installed plugin."""
    if refs and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    for ref in refs:
        yield (*_contents(_resolve(ref), f"plugins: {ref}"), f"plugin {ref}")
    for ep in entry_points(group=entry_point_group):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(f"entry point {ep.name!r} ({ep.value}): {exc}") from exc
        yield (*_contents(obj, f"entry point {ep.name}"), f"entry point {ep.name}")
