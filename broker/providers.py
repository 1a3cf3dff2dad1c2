"""Integrations made from provider specs, exactly as if a plugin had registered them.

Each enabled provider becomes an ``Integration`` whose ``complete_integration`` validates
the submitted fields against the spec (and, when the spec has a ``verify`` request, asks the
provider whether the credential works) before storing it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from .auth import kind
from .catalog import (
    FieldsProvider,
    OAuth2ClientCredentialsProvider,
    ProviderBase,
    header_safe,
)
from .errors import CredentialCorrupt, CredentialRejected, InvalidInput, ProviderUnreachable
from .integrations import (
    AuthType,
    Complete,
    Integration,
    NestedOauthConfig,
    OauthConfig,
    disconnect_custom_integration,
)
from .refresh import shown_status
from .store.database import after_commit

__all__ = [
    "base_integration",
    "check_api_values",
    "check_fields",
    "integration_for",
    "popup_integration",
    "read_fields",
    "verify_credential",
]


def check_fields(
    spec: FieldsProvider | OAuth2ClientCredentialsProvider, body: Mapping[str, Any]
) -> dict[str, str]:
    """The credential in ``body`` if it fits the spec's fields; else InvalidInput.

    The error names the first field at fault in ``field`` and lists every problem in
    ``errors``. Messages never repeat the submitted value. A value applied to a header
    must be printable ASCII (anything else could not be sent, or would split the header).
    """
    headers = spec.header_fields()
    problems: list[dict[str, str]] = []
    for name in body:
        if name not in spec.fields:
            problems.append({"field": name, "message": "unknown field"})
    data: dict[str, str] = {}
    for name, field in spec.fields.items():
        value = body.get(name)
        if value is None or value == "":
            if field.default is not None:
                data[name] = field.default  # stored, so the API address can use it later
            elif field.required:
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
        elif name in headers and not header_safe(value):
            problems.append(
                {
                    "field": name,
                    "message": f"{field.title} can only contain printable ASCII characters",
                }
            )
        elif field.format == "json" and not _json_object(value):
            problems.append(
                {"field": name, "message": f"{field.title} must be a JSON object (the file's "
                 "contents, as downloaded)"}
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


def _json_object(value: str) -> bool:
    try:
        return isinstance(json.loads(value), dict)
    except ValueError:
        return False


async def read_fields(
    spec: FieldsProvider | OAuth2ClientCredentialsProvider, request: Request
) -> dict[str, str]:
    """The posted JSON object's fields, checked (``check_fields``); InvalidInput for a
    body that is not a JSON object."""
    body = await request.json()
    if not isinstance(body, dict):
        raise InvalidInput("expected a JSON object of fields")
    return check_fields(spec, body)


async def verify_credential(
    spec: FieldsProvider, data: Mapping[str, str], *, client: httpx.AsyncClient | None = None
) -> None:
    """Send the spec's verify request with the credential applied; only its status counts.

    Raises InvalidInput naming a value that cannot be used in the verify URL (nothing is
    sent then), CredentialRejected on 401/403, ProviderUnreachable on anything else that
    is not an expected status, a redirect included (never followed). Neither message
    carries the request, its URL or its response. The response body is never read: the
    connection is closed once the status line and headers are in.
    """
    if spec.verify is None:
        return
    headers, params = spec.apply_to(data)
    # The headers every call to the API needs (a version header) go on the check too.
    static = spec.api.headers if spec.api is not None else {}
    headers = {**{k: v for k, v in static.items() if k.lower() not in
                  {h.lower() for h in headers}}, **headers}
    # Add the credential's query parameters to the verify URL's own (httpx's params=
    # would replace them).
    url = httpx.URL(spec.verify_url(data)).copy_merge_params(params)
    owned = client is None
    http = client or httpx.AsyncClient(timeout=spec.verify.timeout_seconds)
    try:
        # httpx's timeout is per read: a server dripping its headers a byte at a time would
        # hold the request (and the user's connect) for as long as it liked. The whole
        # request gets ``timeout_seconds``.
        async with asyncio.timeout(spec.verify.timeout_seconds), http.stream(
            spec.verify.method, url, headers=headers, follow_redirects=False
        ) as response:
            status = response.status_code
    except (httpx.HTTPError, TimeoutError) as exc:
        raise ProviderUnreachable(
            f"Could not reach {spec.display_name} to check the credential "
            f"({type(exc).__name__}). Try again later."
        ) from None
    finally:
        if owned:
            await http.aclose()
    if status in spec.verify.ok_status:
        return
    secret_fields = [n for n, f in spec.fields.items() if f.secret] or list(spec.fields)
    if status in (401, 403):
        raise CredentialRejected(
            f"{spec.display_name} did not accept this credential "
            f"(HTTP {status}). Check it and try again.",
            field=secret_fields[0],
        )
    raise ProviderUnreachable(
        f"{spec.display_name} answered HTTP {status} while the credential was "
        "being checked. Try again later."
    )


def check_api_values(spec: ProviderBase, values: Mapping[str, Any]) -> None:
    """Refuse (InvalidInput naming the field) values that would send the connection's API
    calls somewhere its ``api`` section does not allow."""
    placement = spec.placement()
    if placement is not None:
        placement.check_values(values)


def base_integration(
    spec: ProviderBase, complete: Complete, *, trigger: str | None = None
) -> Integration:
    name = spec.name

    async def status(db: AsyncSession, group: Any) -> str:
        broker = db.info["broker"]
        info = await broker.repository.info(db, str(group.id), name)
        if info is None:
            return "not_connected"
        return shown_status(str(info.status), info.last_error, info.expires_at, broker.now())

    async def remove(db: AsyncSession, group: Any, _request: Any) -> bool:
        broker = db.info["broker"]
        group_id = str(group.id)
        stored = None
        if kind(spec.auth_type).revocable(spec):
            try:
                found = await broker.repository.get(db, group_id, name)
            except CredentialCorrupt:
                found = None  # nothing to revoke with
            stored = found.data if found is not None else None
        removed = await disconnect_custom_integration(db, group, name)
        if removed and stored is not None:
            after_commit(db, lambda: broker.revocations.start(group_id, name, spec, stored))
        return removed

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
                trigger=trigger or f"/groups/{{group_id}}/integrations/custom/{name}",
            ),
        ),
        get_status=status,
        complete_integration=complete,
        delete_integration=remove,
        slug=name,
        provider=spec,
    )


def popup_integration(spec: ProviderBase) -> Integration:
    """A provider connected through the sign-in popup (a ticket from its trigger route),
    not by posting fields to it."""

    async def complete(db: AsyncSession, group: Any, request: Any) -> Any:
        raise InvalidInput(
            f"{spec.display_name} is connected through its sign-in popup: ask for a ticket "
            f"with POST /groups/{{group_id}}/integrations/{spec.name}/authorize",
            field="name",
        )

    return base_integration(
        spec, complete, trigger=f"/groups/{{group_id}}/integrations/{spec.name}/authorize"
    )


def integration_for(spec: ProviderBase) -> Integration:
    """The Integration for an enabled provider (made by its auth type: ``broker.auth``)."""
    return kind(spec.auth_type).integration(spec)
