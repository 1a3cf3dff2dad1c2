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
    "backoff",
    "keep_alive_at",
    "lease_covers",
    "needs_refresh",
    "next_refresh_at",
    "refresh_margin",
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
