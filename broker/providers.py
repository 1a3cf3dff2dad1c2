"""Integrations made from provider specs, exactly as if a plugin had registered them.

Each enabled provider becomes an ``Integration`` whose ``complete_integration`` validates
the submitted fields against the spec (and, when the spec has a ``verify`` request, asks the
provider whether the credential works) before storing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from .catalog import (
    ApiKeyProvider,
    OAuth2ClientCredentialsProvider,
    OAuth2Provider,
    ProviderBase,
    ProviderSpec,
    header_safe,
)
from .credentials import expiry
from .errors import CredentialRejected, InvalidInput, ProviderUnreachable, TokenEndpointError
from .integrations import (
    AuthType,
    Complete,
    Integration,
    NestedOauthConfig,
    OauthConfig,
    disconnect_custom_integration,
    register_custom_integration,
)
from .oauth import client
from .oauth.decisions import Outcome
from .oauth.tokens import node_view, stored_token

__all__ = ["check_fields", "integration_for", "verify_credential"]


def check_fields(
    spec: ApiKeyProvider | OAuth2ClientCredentialsProvider, body: Mapping[str, Any]
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
        elif name in headers and not header_safe(value):
            problems.append(
                {
                    "field": name,
                    "message": f"{field.title} can only contain printable ASCII characters",
                }
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


def _apikey_integration(spec: ApiKeyProvider) -> Integration:
    name = spec.name

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        body = await request.json()
        if not isinstance(body, dict):
            raise InvalidInput("expected a JSON object of fields")
        data = check_fields(spec, body)
        check_api_values(spec, data)
        await verify_credential(spec, data)
        return await register_custom_integration(
            db, group, name, data, hint=spec.credential_hint(data)
        )

    return _integration(spec, complete)


def check_api_values(spec: ProviderBase, values: Mapping[str, Any]) -> None:
    """Refuse (InvalidInput naming the field) values that would send the connection's API
    calls somewhere its ``api`` section does not allow."""
    placement = spec.placement()
    if placement is not None:
        placement.check_values(values)


def _integration(
    spec: ProviderSpec, complete: Complete, *, trigger: str | None = None
) -> Integration:
    name = spec.name

    async def status(db: AsyncSession, group: Any) -> str:
        broker = db.info["broker"]
        info = await broker.repository.info(db, str(group.id), name)
        if info is None:
            return "not_connected"
        if (
            info.status == "connected"
            and info.last_error is not None
            and info.expires_at is not None
            and info.expires_at <= broker.now()
        ):
            # Refreshes are failing and the token has run out: nodes cannot use it now.
            return "unavailable"
        return str(info.status)

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
                trigger=trigger or f"/groups/{{group_id}}/integrations/custom/{name}",
            ),
        ),
        get_status=status,
        complete_integration=complete,
        delete_integration=remove,
        slug=name,
        provider=spec,
    )


def _client_credentials_integration(spec: OAuth2ClientCredentialsProvider) -> Integration:
    """Connected by submitting a client id and secret; the broker fetches the token."""
    name = spec.name

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        body = await request.json()
        if not isinstance(body, dict):
            raise InvalidInput("expected a JSON object of fields")
        data = check_fields(spec, body)
        scopes = data.get("scopes", "").split() or None
        broker = db.info["broker"]
        try:
            response = await client.client_credentials(
                spec,
                client_id=data["client_id"],
                client_secret=data["client_secret"],
                scopes=scopes,
                audience=data.get("audience"),
                transport=broker.token_transport,
            )
        except TokenEndpointError as exc:
            reason = f" ({exc.error})" if exc.error else ""
            if exc.outcome == Outcome.transient:
                raise ProviderUnreachable(
                    f"{spec.display_name} could not issue a token right now{reason}. "
                    "Try again later."
                ) from None
            raise CredentialRejected(
                f"{spec.display_name} did not accept these client credentials{reason}.",
                field="client_secret",
            ) from None
        now = broker.now()
        try:
            token = stored_token(
                response, now=now, default_lifetime=spec.default_lifetime_seconds,
                token_path=spec.token_path, extra_fields=spec.extra_fields,
            )
        except ValueError:
            raise ProviderUnreachable(
                f"{spec.display_name} answered without an access token."
            ) from None
        check_api_values(spec, node_view(token))
        token["client"] = {
            "client_id": data["client_id"],
            "client_secret": data["client_secret"],
            "scopes": scopes,
            "audience": data.get("audience"),
        }
        expires_at = expiry(token)
        await broker.repository.put(
            db, str(group.id), name, token, auth_type=spec.auth_type,
            hint={"client_id": data["client_id"]},
            expires_at=expires_at,
            next_refresh_at=broker.next_refresh_at(now, expires_at, spec),
        )
        return {"integration": name, "status": "connected"}

    return _integration(spec, complete)


def _oauth2_integration(spec: OAuth2Provider) -> Integration:
    """Connected through the sign-in popup (a ticket from its trigger route), not by
    posting fields."""

    async def complete(db: AsyncSession, group: Any, request: Request) -> Any:
        raise InvalidInput(
            f"{spec.display_name} is connected through its sign-in popup: ask for a ticket "
            f"with POST /groups/{{group_id}}/integrations/{spec.name}/authorize",
            field="name",
        )

    return _integration(
        spec, complete, trigger=f"/groups/{{group_id}}/integrations/{spec.name}/authorize"
    )


def integration_for(spec: ProviderBase) -> Integration:
    """The Integration for an enabled provider."""
    if isinstance(spec, ApiKeyProvider):
        return _apikey_integration(spec)
    if isinstance(spec, OAuth2Provider):
        return _oauth2_integration(spec)
    if isinstance(spec, OAuth2ClientCredentialsProvider):
        return _client_credentials_integration(spec)
    raise TypeError(f"no integration factory for {type(spec).__name__}")
