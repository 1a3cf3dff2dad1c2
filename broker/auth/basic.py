"""``basic``: a user name and a password, sent as ``Authorization: Basic`` (RFC 7617).

    auth_type: basic
    fields:                                  # what the user types (names are free)
      account_sid: {title: Account SID, secret: false, pattern: "^AC[0-9a-f]{32}$"}
      auth_token: {title: Auth Token}
    username: "{account_sid}"                # templates over the fields
    password: "{auth_token}"
    # Freshdesk: an API key as the user name and a fixed password
    #   fields: {api_key: {title: API key}}, username: "{api_key}", password: X
    # Zendesk API tokens: username: "{email}/token", password: "{api_token}"

``username`` and ``password`` default to ``{username}`` and ``{password}`` (fields of
those names). A field need not appear in either (a subdomain for ``api.base_url``).
Connected like an API key (the form, the ``verify`` request with the credential applied);
stored as the fields plus the rendered ``username`` and ``password``; a node gets those and
``authorization``, the header value ready to send. Never renewed.
"""

from __future__ import annotations

import base64
import string
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from ..apispec import Apply
from ..catalog import FieldsProvider, ProviderBase, render
from ..errors import InvalidInput
from ..integrations import Integration
from ..urltemplates import template_names
from .apikey import form_integration
from .base import AuthKind

__all__ = ["KIND", "BasicKind", "BasicProvider", "basic_authorization"]


def basic_authorization(username: str, password: str) -> str:
    """The ``Authorization`` value for these credentials (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class BasicProvider(FieldsProvider):
    """See the module docstring."""

    auth_type: Literal["basic"]
    username: str = Field(default="{username}", min_length=1, max_length=256)
    """The user name: a template over the fields (literal text allowed)."""
    password: str = Field(default="{password}", min_length=1, max_length=256)
    """The password: a template over the fields, or a fixed one (``X``)."""

    @model_validator(mode="after")
    def _templates(self) -> BasicProvider:
        for label, template in (("username", self.username), ("password", self.password)):
            try:
                names = template_names(template)
            except ValueError:
                raise ValueError(f"{label}: {template!r} is not a template") from None
            unknown = names - set(self.fields)
            if unknown:
                raise ValueError(f"{label} names {sorted(unknown)} which are not fields")
        if ":" in _literal(self.username):
            raise ValueError("username: a user name cannot contain ':' (RFC 7617)")
        if self.apply is not None:
            raise ValueError("apply: a basic provider's credential goes in Authorization")
        return self

    def stored(self, data: Mapping[str, str]) -> dict[str, str]:
        """The fields and the rendered user name and password; InvalidInput when the user
        name would contain ':' (it ends at the first one)."""
        username = render(self.username, data)
        if ":" in username:
            names = sorted(template_names(self.username))
            field = names[0] if names else None
            title = self.fields[field].title if field else "The user name"
            raise InvalidInput(f"{title} cannot contain ':'.", field=field)
        return {**data, "username": username, "password": render(self.password, data)}

    def header_fields(self) -> frozenset[str]:
        return frozenset(template_names(self.username) | template_names(self.password))

    def credential_names(self) -> set[str]:
        return {*self.fields, "username", "password", "authorization"}

    def default_auth(self) -> Apply:
        return Apply(headers={"Authorization": "{authorization}"})

    def apply_to(self, data: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        stored = self.stored(data)
        return {"Authorization": basic_authorization(stored["username"], stored["password"])}, {}


def _literal(template: str) -> str:
    """The text of ``template`` outside its placeholders."""
    return "".join(text for text, _, _, _ in string.Formatter().parse(template))


class BasicKind(AuthKind):
    name = "basic"
    title = "Basic"

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
