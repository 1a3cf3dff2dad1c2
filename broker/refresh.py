"""When to refresh a token. Pure functions, no I/O.

The rule (``refresh_margin``): a token is refreshed ahead of expiry by a margin of 20 % of
its lifetime, but at least ``min_validity + 2 * interval`` (so the sweep gets to it before a
node would have to wait for an on-demand refresh), never more than half its lifetime (so a
short-lived token is not refreshed the moment it arrives) and never more than one hour.
A 5-second token is refreshed 2.5 s early, a 1-hour token 12 minutes early, a 30-day token
1 hour early. Up to 10 % of the margin is taken off at random so that connections made
together do not refresh together.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

__all__ = [
    "INTERRUPTED",
    "backoff",
    "interrupted_by",
    "keep_alive_at",
    "lease_covers",
    "lease_seconds",
    "needs_refresh",
    "next_look",
    "next_refresh_at",
    "reauth_reason",
    "refresh_margin",
    "shown_status",
]

MAX_MARGIN = 3600.0


def refresh_margin(lifetime: float, *, interval: float = 30.0, min_validity: float = 60.0) -> float:
    """Seconds before expiry at which to refresh a token of ``lifetime`` seconds."""
    margin = max(lifetime * 0.2, min_validity + 2 * interval)
    return max(0.0, min(margin, lifetime * 0.5, MAX_MARGIN))


def next_refresh_at(
    issued_at: datetime,
    expires_at: datetime,
    *,
    interval: float = 30.0,
    min_validity: float = 60.0,
    rng: random.Random | None = None,
) -> datetime:
    """When the sweep should refresh a token issued at ``issued_at``."""
    lifetime = (expires_at - issued_at).total_seconds()
    margin = refresh_margin(lifetime, interval=interval, min_validity=min_validity)
    jitter = (rng or random).uniform(0.0, 0.1 * margin)
    return expires_at - timedelta(seconds=margin + jitter)


def needs_refresh(expires_at: datetime | None, now: datetime, *, min_validity: float) -> bool:
    """Whether a token must be refreshed before it is handed out."""
    if expires_at is None:
        return False
    return (expires_at - now).total_seconds() < min_validity


BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0


def backoff(
    failures: int, *, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Seconds to wait after the ``failures``-th transient failure in a row.

    Capped exponential (1 s, 2 s, 4 s ... 5 minutes) with full jitter on the upper half,
    and never sooner than the provider's ``Retry-After``.
    """
    # The exponent is clamped: 2.0 ** 1024 overflows, and failures keep counting for days.
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(max(failures - 1, 0), 32))
    delay *= (rng or random).uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 24 * 3600.0))
    return delay


def keep_alive_at(
    next_at: datetime | None, now: datetime, idle_refresh_days: float | None
) -> datetime | None:
    """``next_at``, brought forward so a refresh token that dies when idle is used in time."""
    if idle_refresh_days is None:
        return next_at
    keep_alive = now + timedelta(days=idle_refresh_days)
    return keep_alive if next_at is None or keep_alive < next_at else next_at


def lease_covers(
    lease_expires_at: datetime | None, now: datetime, *, request_timeout: float
) -> bool:
    """Whether a refresh lease taken earlier (by the sweep's claim) still has room for a
    whole token request and the write after it (the request's timeout plus 5 s). If not,
    the refresher renews it before asking the provider."""
    if lease_expires_at is None:
        return False
    return (lease_expires_at - now).total_seconds() >= request_timeout + 5.0


def lease_seconds(request_timeout: float) -> float:
    """How long a refresh lease lasts, for a provider whose token requests time out after
    ``request_timeout`` seconds: the request and the write after it (the timeout plus 5 s,
    what ``lease_covers`` asks of a lease before the request), and up to 5 s more for a row
    the sweep claimed ahead to wait for its turn (one that waited longer has its lease
    renewed first).

    It is also how long a connection waits when its holder stops mid-refresh: the next
    attempt, with the same refresh token, comes at most this long after the one that was
    cut off (``next_look``). Short, for providers that accept a rotated refresh token again
    for a grace period (Okta's default: 30 s; with the default 15 s timeout a lease lasts
    25 s).
    """
    return request_timeout + 5.0 + min(request_timeout, 5.0)


LAPSE_MARGIN = 0.05
"""Seconds after a lease's expiry at which it is taken over (it must have run out)."""


def next_look(lapse_in: float | None, *, every: float) -> float:
    """Seconds until the lease watch (``lapses.LapseWatch``) looks again: just after the
    earliest lease it knows of runs out, ``lapse_in`` seconds from now (0 or less: it has),
    or after ``every`` seconds when none runs out sooner."""
    if lapse_in is None:
        return every
    return min(every, max(lapse_in, 0.0) + LAPSE_MARGIN)


INTERRUPTED = (
    "a refresh was interrupted (the process holding it stopped); "
    "the provider had rotated the refresh token"
)


def interrupted_by(lapsed_lease_owner: str | None, owner: str) -> str | None:
    """The holder whose refresh ``owner`` has taken over, or None: the lease ``owner``
    claimed had run out unreleased (``Connection.lapsed_lease_owner``), so its holder
    stopped mid-refresh, perhaps after the provider had answered. A lease of ``owner``'s
    own that ran out (a row that waited too long in its sweep) is not one."""
    if lapsed_lease_owner is None or lapsed_lease_owner == owner:
        return None
    return lapsed_lease_owner


def reauth_reason(error: str, interrupted: str | None) -> str | None:
    """Why a refresh that ended in ``error`` (an ``Outcome.reauth``) needs the user to
    reconnect, when the broker knows more than the provider's error code: an
    ``invalid_grant`` answer to a refresh taken over from a holder that stopped
    (``interrupted_by``) means the provider had already rotated the refresh token for the
    request cut off, and its answer died with that holder."""
    if error == "invalid_grant" and interrupted is not None:
        return INTERRUPTED
    return None


def shown_status(
    status: str, last_error: str | None, expires_at: datetime | None, now: datetime
) -> str:
    """The status people see: the stored one, except that a connected row whose refreshes
    are failing and whose token has run out is ``unavailable`` (nodes cannot use it now;
    the broker keeps retrying)."""
    if (
        status == "connected" and last_error is not None
        and expires_at is not None and expires_at <= now
    ):
        return "unavailable"
    return status
