"""``basic``: a user name and a password, sent as ``Authorization: Basic`` (RFC 7617).

    auth_type: basic
    fields:
      username: {title: Account SID, secret: false, pattern: "^AC[0-9a-f]{32}$"}
      password: {title: Auth Token}
    # or, for an API key sent as the user name with a fixed password (Freshdesk):
    fields:
      username: {title: API key}
    password: X

The two fields are always named ``username`` and ``password`` (their titles, patterns and
secrecy are data). Connected like an API key (the form, the ``verify`` request with the
credential applied); stored as ``{username, password}``; a node gets both and
``authorization``, the header value ready to send. Never renewed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from ..apispec import Apply
from ..catalog import FieldsProvider, ProviderBase
from ..integrations import Integration
from .apikey import form_integration
from .base import AuthKind

__all__ = ["KIND", "BasicKind", "BasicProvider", "basic_authorization"]

FIELD_NAMES = ("username", "password")


def basic_authorization(username: str, password: str) -> str:
    """The ``Authorization`` value for these credentials (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class BasicProvider(FieldsProvider):
    """See the module docstring."""

    auth_type: Literal["basic"]
    password: str | None = Field(default=None, min_length=1, max_length=256)
    """A fixed password (the user then gives only the user name)."""

    @model_validator(mode="after")
    def _two_fields(self) -> BasicProvider:
        unknown = set(self.fields) - set(FIELD_NAMES)
        if unknown:
            raise ValueError(
                f"fields: a basic provider has username and password only, not {sorted(unknown)}"
            )
        if "username" not in self.fields:
            raise ValueError("fields: username is required")
        if ("password" in self.fields) == (self.password is not None):
            raise ValueError(
                "give either a password field or a fixed password (password: X), not both"
            )
        if self.apply is not None:
            raise ValueError("apply: a basic provider's credential goes in Authorization")
        if ":" in (self.password or ""):
            raise ValueError("password: a fixed password cannot contain ':'")
        return self

    def stored(self, data: Mapping[str, str]) -> dict[str, str]:
        return {"username": data["username"], "password": self.password or data["password"]}

    def header_fields(self) -> frozenset[str]:
        return frozenset(self.fields)

    def credential_names(self) -> set[str]:
        return {*FIELD_NAMES, "authorization"}

    def default_auth(self) -> Apply:
        return Apply(headers={"Authorization": "{authorization}"})

    def apply_to(self, data: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        stored = self.stored(data)
        return {"Authorization": basic_authorization(**stored)}, {}


class BasicKind(AuthKind):
    name = "basic"

    @property
    def spec(self) -> type[ProviderBase]:
        return BasicProvider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, BasicProvider)
        return form_integration(spec)

    def node_view(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        view = dict(stored)
        username, password = stored.get("username"), stored.get("password")
        if isinstance(username, str) and isinstance(password, str):
            view["authorization"] = basic_authorization(username, password)
        return view


KIND = BasicKind()
