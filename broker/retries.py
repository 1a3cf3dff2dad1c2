"""When a call to a provider's API is tried again, and after how long. Pure functions.

The rules, shared by ``ctx.client`` and the proxy route:

1. A ``refresh_on`` status (default 401) from a connection whose token can be refreshed:
   refresh once (the single-flight refresh every caller shares) and send again, whatever
   the method: the provider refused the request before doing anything.
2. A ``retry_on`` status (default 429, 502, 503, 504): send again, at most ``retries``
   times, only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE) unless the caller
   opted in for the others. The wait is what the provider said in the first of the
   ``wait_headers`` it sent, plus a little jitter; with no such header, an exponential
   backoff with full jitter. When the provider asks for longer than
   ``max_retry_wait_seconds``, the answer goes back to the caller at once: sending again
   sooner would only be refused again, and a node is better told now.
3. Nothing is sent twice whose body cannot be replayed (a streamed upload).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

from .apispec import Placement, WaitHeader

__all__ = ["IDEMPOTENT", "Step", "backoff", "next_step", "told_wait"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
BACKOFF_BASE = 0.5


@dataclass(frozen=True)
class Step:
    """What to do with an answer: ``refresh`` the credential, or ``retry`` after ``wait``
    seconds, and send the request again."""

    action: Literal["refresh", "retry"]
    wait: float = 0.0


def told_wait(
    headers: Mapping[str, str], wait_headers: Iterable[WaitHeader], now: float,
    status: int = 429,
) -> float | None:
    """Seconds the provider asked to wait in an answer of ``status``, from the first of
    ``wait_headers`` read on that status that it sent with a value that parses (``now``:
    the Unix time, for epoch and date values); None when it said nothing usable. Never
    negative."""
    for spec in wait_headers:
        if status not in spec.statuses:
            continue
        raw = headers.get(spec.name)
        if raw is None:
            continue
        value = _parse(raw.strip(), spec.format, now)
        if value is not None and math.isfinite(value):
            return max(0.0, value)
    return None


def _parse(raw: str, fmt: str, now: float) -> float | None:
    try:
        number = float(raw)
    except ValueError:
        number = None
    if fmt in ("retry_after", "seconds"):
        if number is not None:
            return number
        if fmt == "seconds":
            return None
        try:
            return float(parsedate_to_datetime(raw).timestamp()) - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if number is None:
        return None
    return (number / 1000 if fmt == "epoch_ms" else number) - now


def backoff(attempt: int, cap: float, rand: Callable[[], float]) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th retry (0-based)."""
    return rand() * min(cap, BACKOFF_BASE * 2.0**attempt)


def next_step(
    *,
    method: str,
    status: int,
    headers: Mapping[str, str],
    placement: Placement,
    retried: int,
    refreshed: bool,
    replayable: bool,
    can_refresh: bool,
    retry_non_idempotent: bool,
    now: float,
    rand: Callable[[], float],
) -> Step | None:
    """What to do with an answer of ``status`` (see the module docstring); None: hand it
    back. ``retried``: retries made so far; ``refreshed``: whether this request already
    caused a refresh."""
    if not replayable:
        return None
    api = placement.api
    if status in api.refresh_on and can_refresh and not refreshed:
        return Step("refresh")
    if status not in api.retry_on or retried >= api.retries:
        return None
    if method.upper() not in IDEMPOTENT and not retry_non_idempotent:
        return None
    cap = api.max_retry_wait_seconds
    told = told_wait(headers, api.wait_headers, now, status)
    if told is None:
        return Step("retry", backoff(retried, cap, rand))
    if told > cap:
        return None
    # A little later than asked, spread so that callers told the same time do not all
    # come back at once.
    return Step("retry", min(cap, told + rand() * min(1.0, 0.1 * told + 0.1)))
