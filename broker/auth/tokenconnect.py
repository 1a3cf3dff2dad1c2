"""The end of a connect that asks for a token at once (client credentials, token exchange,
JWT bearer): the token request, its refusal or failure as the user's error, reading the
answer, the values learnt at connect, and the row. Written once: each auth type says only
how it asks, how it reads the answer, what it keeps to renew with and what it shows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from ..catalog import ProviderBase
from ..connectvalues import learn, shown
from ..credentials import expiry
from ..errors import BrokerError, ProviderUnreachable, TokenEndpointError
from ..oauth.client import Borrowed
from ..oauth.decisions import Outcome
from ..oauth.tokens import node_view
from ..providers import check_api_values

__all__ = ["connect_with_token"]


async def connect_with_token(
    db: AsyncSession,
    group_id: str,
    spec: ProviderBase,
    *,
    ask: Callable[[], Awaitable[Mapping[str, Any]]],
    read: Callable[[Mapping[str, Any], datetime], dict[str, Any]],
    refused: Callable[[TokenEndpointError], BrokerError | None],
    keep: tuple[str, Any],
    hint: Mapping[str, Any],
) -> dict[str, str]:
    """Ask for a token (``ask``), read it (``read(answer, requested_at)``), learn the
    connect values, check the API values, keep ``keep`` (name, value) beside the token to
    renew with, and store the connection with ``hint``.

    A provider that cannot answer now (a transient outcome), or whose refusal ``refused``
    maps to None, is a ``ProviderUnreachable``; otherwise ``refused`` says which field was
    wrong. An answer without a token is ``ProviderUnreachable``. Nothing is stored unless a
    token was issued and read."""
    broker = db.info["broker"]
    label = spec.display_name
    now = broker.now()  # expiry counted from the request (see oauth2.py)
    try:
        answer = await ask()
    except TokenEndpointError as exc:
        error = None if exc.outcome == Outcome.transient else refused(exc)
        if error is not None:
            raise error from None
        raise ProviderUnreachable(
            f"{label} could not issue a token right now. Try again later."
        ) from None
    try:
        token = read(answer, now)
    except ValueError:
        raise ProviderUnreachable(f"{label} answered without a token.") from None
    learnt = await learn(spec, node_view(token), transport=Borrowed(broker.token_transport))
    token["extra"].update(learnt)
    check_api_values(spec, node_view(token))
    token[keep[0]] = keep[1]
    expires_at = expiry(token)
    await broker.repository.put(
        db, group_id, spec.name, token, auth_type=spec.auth_type,
        hint={**hint, **shown(spec, learnt)}, expires_at=expires_at,
        next_refresh_at=broker.next_refresh_at(now, expires_at, spec),
    )
    return {"integration": spec.name, "status": "connected"}
