"""Integrations made from provider specs, exactly as if a plugin had registered them.

Each enabled provider becomes an ``Integration`` whose ``complete_integration`` validates
the submitted fields against the spec (and, when the spec has a ``verify`` request, asks the
provider whether the credential works) before storing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from .catalog import ApiKeyProvider, ProviderBase, render
from .errors import CredentialRejected, InvalidInput, ProviderUnreachable
from .integrations import (
    AuthType,
    Integration,
    NestedOauthConfig,
    OauthConfig,
    disconnect_custom_integration,
    has_custom_integration,
    register_custom_integration,
)

__all__ = ["check_fields", "integration_for", "verify_credential"]


def check_fields(spec: ApiKeyProvider, body: Mapping[str, Any]) -> dict[str, str]:
    """The credential in ``body`` if it fits the spec's fields; else InvalidInput.

    The error names the first field at fault in ``field`` and lists every problem in
    ``errors``. Messages never repeat the submitted value.
    """
    problems: list[dict[str, str]] = []
    for name in body:
        if name not in spec.fields:
            problems.append({"field": name, "message": "unknown field"})
    data: dict[str, str] = {}
    for name, field in spec.fields.items():
        value = body.get(name)
        if value is None or value == "":
            if field.required:
                problems.append({"field": name, "message": f"{field.title} is required"})
            continue
        if not isinstance(value, str):
            problems.append({"field": name, "message": f"{field.title} must be a string"})
            continue
        value = value.strip()
        if len(value) > field.max_length:
            problems.append(
                {"field": name, "message": f"{field.title} is longer than {field.max_length}"}
            )
        elif not field.matches(value):
            expected = f" (like {field.example})" if field.example else ""
            problems.append(
                {"field": name, "message": f"{field.title} does not look right{expected}"}
            )
        else:
            data[name] = value
    if problems:
        raise InvalidInput(problems[0]["message"], field=problems[0]["field"], errors=problems)
    return data


async def verify_credential(
    spec: ApiKeyProvider, data: Mapping[str, str], *, client: httpx.AsyncClient | None = None
) -> None:
    """Send the spec's verify request with the credential applied.

    Raises CredentialRejected on 401/403, ProviderUnreachable on anything else that is
    not an expected status. Neither message carries the request, its URL or its response.
    """
    if spec.verify is None:
        return
    headers, params = spec.apply_to(data)
    url = render(spec.verify.url, data)
    owned = client is None
    http = client or httpx.AsyncClient(timeout=spec.verify.timeout_seconds)
    try:
        response = await http.request(spec.verify.method, url, headers=headers, params=params)
    except httpx.HTTPError as exc:
        raise ProviderUnreachable(
            f"Could not reach {spec.display_name} to check the credential "
            f"({type(exc).__name__}). Try again later."
        ) from None
    finally:
        if owned:
            await http.aclose()
    if response.status_code in spec.verify.ok_status:
        return
    secret_fields = [n for n, f in spec.fields.items() if f.secret] or list(spec.fields)
    if response.status_code in (401, 403):
        raise CredentialRejected(
            f"{spec.display_name} did not accept this credential "
            f"(HTTP {response.status_code}). Check it and try again.",
            field=secret_fields[0],
        )
    raise ProviderUnreachable(
        f"{spec.display_name} answered HTTP {response.status_code} while the credential was "
        "being checked. Try again later."
    )


def _apikey_integration(spec: ApiKeyProvider) -> Integration:
    name = spec.name

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        body = await request.json()
        if not isinstance(body, dict):
            raise InvalidInput("expected a JSON object of fields")
        data = check_fields(spec, body)
        await verify_credential(spec, data)
        return await register_custom_integration(
            db, group, name, data, hint=spec.credential_hint(data)
        )

    async def status(db: AsyncSession, group: Any) -> bool:
        return await has_custom_integration(db, group, name)

    async def remove(db: AsyncSession, group: Any, _request: Any) -> bool:
        return await disconnect_custom_integration(db, group, name)

    return Integration(
        name=spec.display_name,
        authorized=True,
        image=spec.image or "",
        integration=OauthConfig(
            type=AuthType(spec.auth_type),
            config=NestedOauthConfig(
                width=spec.popup.width,
                height=spec.popup.height,
                name=spec.display_name,
                delete=f"/groups/{{group_id}}/integrations/custom/{name}/disconnect",
                trigger=f"/groups/{{group_id}}/integrations/custom/{name}",
            ),
        ),
        get_status=status,
        complete_integration=complete,
        delete_integration=remove,
        slug=name,
        provider=spec,
    )


def integration_for(spec: ProviderBase) -> Integration:
    """The Integration for an enabled provider."""
    if isinstance(spec, ApiKeyProvider):
        return _apikey_integration(spec)
    raise TypeError(f"no integration factory for {type(spec).__name__}")
