"""A revocation endpoint that is not RFC 7009, described as data.

    revocation:
      url: "https://api.github.com/applications/{client_id}/token"
      method: DELETE              # POST (default) or DELETE
      format: json                # form (default) or json
      client_auth: basic          # basic (default), post (client_id/client_secret in the
                                  # body) or none
      body: {access_token: "{access_token}"}
      ok_status: [204]            # default [200, 204]

``url`` may name ``client_id`` and the connection's settings (held to their patterns, as
every provider URL is). ``body`` values are templates over ``token`` (the refresh token
when there is one, else the access token: revoking a refresh token ends the grant),
``access_token`` and ``refresh_token``. A provider with an RFC 7009 endpoint gives
``revocation_url`` instead. ``request`` is pure; ``revoke`` in ``auth/oauth2.py`` sends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..urltemplates import template_names

__all__ = ["TOKEN_NAMES", "Revocation"]

TOKEN_NAMES = frozenset({"token", "access_token", "refresh_token"})


class Revocation(BaseModel):
    """See the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    method: Literal["POST", "DELETE"] = "POST"
    format: Literal["form", "json"] = "form"
    client_auth: Literal["basic", "post", "none"] = "basic"
    body: dict[str, str] = Field(min_length=1)
    ok_status: list[int] = Field(default_factory=lambda: [200, 204])

    @field_validator("body")
    @classmethod
    def _body(cls, value: dict[str, str]) -> dict[str, str]:
        for template in value.values():
            unknown = template_names(template) - TOKEN_NAMES
            if unknown:
                raise ValueError(
                    f"revocation.body names {sorted(unknown)}; it may name "
                    f"{sorted(TOKEN_NAMES)}"
                )
        return value

    def request(
        self, url: str, stored: Mapping[str, object], *, client_id: str,
        client_secret: str | None,
    ) -> httpx.Request | None:
        """The revocation request for the stored credential at the rendered ``url``;
        None when the credential lacks a token the body needs."""
        access, refresh = stored.get("access_token"), stored.get("refresh_token")
        tokens = {
            "access_token": access if isinstance(access, str) else "",
            "refresh_token": refresh if isinstance(refresh, str) else "",
        }
        tokens["token"] = tokens["refresh_token"] or tokens["access_token"]
        body = {k: v.format_map(tokens) for k, v in self.body.items()}
        if any(not tokens[n] for t in self.body.values() for n in template_names(t)):
            return None
        auth: httpx.Auth | None = None
        if self.client_auth == "basic":
            auth = httpx.BasicAuth(client_id, client_secret or "")
        elif self.client_auth == "post":
            body = {"client_id": client_id, **({"client_secret": client_secret}
                                               if client_secret else {}), **body}
        headers = {"Accept": "application/json"}
        if self.format == "json":
            request = httpx.Request(self.method, url, headers=headers, json=body)
        else:
            request = httpx.Request(self.method, url, headers=headers, data=body)
        if auth is not None:
            request = next(auth.sync_auth_flow(request))
        return request
