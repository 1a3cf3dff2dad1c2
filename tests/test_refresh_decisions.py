"""The refresh engine's pure decisions: when to refresh, how long to back off, what a token
endpoint's answer means, what is stored and what a node sees. No I/O."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from broker.credentials import is_stale
from broker.oauth.decisions import Outcome, classify, safe_error_code
from broker.oauth.tokens import MAX_LIFETIME, lifetime_seconds, node_view, stored_token
from broker.refresh import (
    BACKOFF_CAP,
    INTERRUPTED,
    LAPSE_MARGIN,
    backoff,
    interrupted_by,
    keep_alive_at,
    lease_covers,
    lease_seconds,
    needs_refresh,
    next_look,
    next_refresh_at,
    reauth_reason,
    refresh_margin,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0
LIFETIMES = [
    1, 4, 5, 10, 30, 59, 60, 61, 119, 120, 300, 599, 600, 1800, 3599, 3600, 7200,
    17999, 18000, 18001, 86400, 7 * DAY, 30 * DAY, 90 * DAY,
]
SETTINGS = [(30.0, 60.0), (1.0, 1.0), (1.0, 0.0), (300.0, 3600.0)]  # (interval, min_validity)


# --- refresh_margin ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "margin"),
    [(5, 2.5), (3600, 720.0), (30 * DAY, 3600.0)],
    ids=["5s", "1h", "30d"],
)
def test_documented_margins(lifetime: float, margin: float) -> None:
    assert refresh_margin(lifetime) == pytest.approx(margin)


@pytest.mark.parametrize(("interval", "min_validity"), SETTINGS)
def test_margin_is_bounded_by_half_the_lifetime_and_an_hour(
    interval: float, min_validity: float
) -> None:
    for lifetime in LIFETIMES:
        margin = refresh_margin(lifetime, interval=interval, min_validity=min_validity)
        assert 0 <= margin <= lifetime / 2
        assert margin <= 3600
        # ...and otherwise large enough for the sweep to get there before a node must wait.
        assert margin >= min(min_validity + 2 * interval, lifetime / 2, 3600) - 1e-9


@pytest.mark.parametrize(("interval", "min_validity"), SETTINGS)
def test_margin_is_monotone_in_the_lifetime(interval: float, min_validity: float) -> None:
    lifetimes = sorted({*LIFETIMES, *(x / 7 for x in range(1, 5000, 37))})
    margins = [refresh_margin(t, interval=interval, min_validity=min_validity) for t in lifetimes]
    assert margins == sorted(margins)


def test_margin_of_a_zero_or_negative_lifetime_is_zero() -> None:
    assert refresh_margin(0) == 0
    assert refresh_margin(-10) == 0


def test_one_hour_token_is_refreshed_twelve_minutes_early() -> None:
    issued = NOW
    at = next_refresh_at(issued, issued + timedelta(hours=1), rng=random.Random(1))
    early = (issued + timedelta(hours=1) - at).total_seconds()
    assert 720 <= early <= 720 * 1.1


# --- next_refresh_at: jitter -------------------------------------------------------------


@pytest.mark.parametrize("lifetime", [4, 5, 60, 3600, 86400, 30 * DAY])
def test_jitter_stays_within_ten_percent_of_the_margin(lifetime: float) -> None:
    rng = random.Random(lifetime)
    expires = NOW + timedelta(seconds=lifetime)
    margin = refresh_margin(lifetime)
    for _ in range(500):
        early = (expires - next_refresh_at(NOW, expires, rng=rng)).total_seconds()
        assert margin - 1e-6 <= early <= margin * 1.1 + 1e-6
        assert early <= lifetime / 2 * 1.1 + 1e-6  # never refreshed right away


def test_jitter_spreads_a_batch_made_together() -> None:
    rng = random.Random(42)
    expires = NOW + timedelta(hours=1)
    times = [next_refresh_at(NOW, expires, rng=rng) for _ in range(200)]
    assert len(set(times)) == 200
    spread = (max(times) - min(times)).total_seconds()
    assert spread > 0.8 * 0.1 * 720  # most of the 72 s jitter window is used
    # Roughly even: no one-second bucket holds a large share of the batch.
    buckets: dict[int, int] = {}
    for t in times:
        key = int((expires - t).total_seconds())
        buckets[key] = buckets.get(key, 0) + 1
    assert max(buckets.values()) <= 20


def test_next_refresh_at_is_reproducible_with_a_seeded_rng() -> None:
    expires = NOW + timedelta(minutes=10)
    a = [next_refresh_at(NOW, expires, rng=random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1
    assert next_refresh_at(NOW, expires) <= expires  # module-level random works as well


# --- needs_refresh -----------------------------------------------------------------------


def test_needs_refresh() -> None:
    assert needs_refresh(None, NOW, min_validity=60) is False  # no expiry: nothing to do
    assert needs_refresh(NOW + timedelta(seconds=61), NOW, min_validity=60) is False
    assert needs_refresh(NOW + timedelta(seconds=60), NOW, min_validity=60) is False
    assert needs_refresh(NOW + timedelta(seconds=59.9), NOW, min_validity=60) is True
    assert needs_refresh(NOW, NOW, min_validity=0) is False
    assert needs_refresh(NOW - timedelta(seconds=1), NOW, min_validity=0) is True
    assert needs_refresh(NOW - timedelta(days=3), NOW, min_validity=60) is True


def test_a_short_token_is_stale_only_in_its_second_half() -> None:
    """min_validity_seconds (60) exceeds a 4 s lifetime: half the lifetime is used instead,
    so a fresh short-lived token is handed out instead of being refreshed on every call."""
    expires = NOW + timedelta(seconds=4)
    token = {"expires_at": int(expires.timestamp()), "lifetime": 4}
    assert not is_stale(token, NOW, 60)
    assert not is_stale(token, NOW + timedelta(seconds=2), 60)
    assert is_stale(token, NOW + timedelta(seconds=2.5), 60)
    assert is_stale({"expires_at": int(NOW.timestamp()) - 1}, NOW, 0)
    assert not is_stale({"access_token": "x"}, NOW, 60)  # no expiry known


# --- backoff -----------------------------------------------------------------------------


def test_backoff_grows_then_caps() -> None:
    rng = random.Random(3)
    previous_upper = 0.0
    for failures in range(1, 40):
        upper = min(BACKOFF_CAP, 2.0 ** (failures - 1))
        delay = backoff(failures, rng=rng)
        assert upper / 2 <= delay <= upper
        assert upper >= previous_upper
        previous_upper = upper
    assert previous_upper == BACKOFF_CAP == 300


def test_backoff_means_grow() -> None:
    def mean(failures: int) -> float:
        rng = random.Random(failures)
        return sum(backoff(failures, rng=rng) for _ in range(200)) / 200

    means = [mean(n) for n in range(1, 10)]
    assert means == sorted(means)
    assert means[-1] <= 300


@pytest.mark.parametrize("failures", [-5, 0, 1, 2, 1023, 1024, 1025, 10**6, 10**12])
def test_backoff_is_defined_for_any_failure_count(failures: int) -> None:
    """failure_count keeps growing while a provider stays broken (a bad client secret for
    days): the delay must stay at the cap, not overflow."""
    for seed in range(20):
        delay = backoff(failures, rng=random.Random(seed))
        assert 0 < delay <= BACKOFF_CAP
        assert math.isfinite(delay)


def test_backoff_honours_retry_after() -> None:
    for seed in range(50):
        rng = random.Random(seed)
        assert backoff(1, retry_after=120, rng=rng) >= 120
        assert backoff(30, retry_after=900, rng=rng) >= 900  # beyond the cap when told so
        assert backoff(3, retry_after=0, rng=rng) >= 2  # 0 does not shorten the backoff
        assert backoff(3, retry_after=-10, rng=rng) >= 2
        assert backoff(1, retry_after=10**9, rng=rng) <= 24 * 3600  # bounded
        assert backoff(1, retry_after=float("inf"), rng=rng) <= 24 * 3600
        assert backoff(1, retry_after=float("nan"), rng=rng) > 0


# --- keep_alive_at -----------------------------------------------------------------------


def test_keep_alive_at() -> None:
    soon = NOW + timedelta(hours=1)
    late = NOW + timedelta(days=30)
    assert keep_alive_at(soon, NOW, None) == soon
    assert keep_alive_at(None, NOW, None) is None
    assert keep_alive_at(None, NOW, 7) == NOW + timedelta(days=7)
    assert keep_alive_at(late, NOW, 7) == NOW + timedelta(days=7)
    assert keep_alive_at(soon, NOW, 7) == soon
    assert keep_alive_at(late, NOW, 0.5) == NOW + timedelta(hours=12)


# --- classify ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "outcome"),
    [
        (400, "invalid_grant", Outcome.reauth),
        (401, "invalid_grant", Outcome.reauth),
        (200, "invalid_grant", Outcome.reauth),  # Slack-style errors in a 200
        (401, "invalid_client", Outcome.operator),
        (400, "invalid_client", Outcome.operator),
        (400, "unauthorized_client", Outcome.operator),
        (401, None, Outcome.operator),
        (500, None, Outcome.transient),
        (502, None, Outcome.transient),
        (503, None, Outcome.transient),
        (503, "temporarily_unavailable", Outcome.transient),
        (400, "slow_down", Outcome.transient),
        (500, "server_error", Outcome.transient),
        (429, None, Outcome.transient),
        (408, None, Outcome.transient),
        (None, None, Outcome.transient),  # timeout / no answer at all
        (400, "invalid_scope", Outcome.rejected),
        (400, "invalid_request", Outcome.rejected),
        (400, None, Outcome.rejected),
        (403, None, Outcome.rejected),
        (404, None, Outcome.rejected),
    ],
)
def test_classify(status: int | None, error: str | None, outcome: Outcome) -> None:
    assert classify(status, error) is outcome


def test_safe_error_code_refuses_provider_text() -> None:
    assert safe_error_code("invalid_grant") == "invalid_grant"
    assert safe_error_code("Token rt_abc123 is not valid") is None
    assert safe_error_code("x" * 200) is None
    assert safe_error_code(None) is None
    assert safe_error_code(42) is None


# --- lifetime_seconds --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [
        (None, 3600),
        (0, 3600),
        (-1, 3600),
        (-3600, 3600),
        ("3600", 3600),
        ("120.5", 120),
        (3600, 3600),
        (4, 5),  # raised to MIN_LIFETIME
        (0.001, 5),
        ("abc", 3600),
        ("", 3600),
        ([], 3600),
        ({}, 3600),
        (float("nan"), 3600),
        ("nan", 3600),
        (float("inf"), 3600),
        ("-inf", 3600),
        (10**12, MAX_LIFETIME),
        ("1e30", MAX_LIFETIME),
        (json.loads("1" + "0" * 400), 3600),  # a JSON integer past float range
    ],
    ids=repr,
)
def test_lifetime_seconds(expires_in: object, expected: int) -> None:
    value = lifetime_seconds(expires_in, 3600)
    assert value == expected
    assert isinstance(value, int)
    assert 5 <= value <= MAX_LIFETIME  # bounded: no zero-lifetime refresh loop


def test_every_lifetime_gives_a_refresh_time_after_issue() -> None:
    """Whatever the provider says, the next refresh is in the future: no tight loop."""
    for raw in (None, 0, -1, "abc", float("nan"), float("inf"), 10**12, 1, 5, 3600):
        lifetime = lifetime_seconds(raw, 3600)
        expires = NOW + timedelta(seconds=lifetime)
        at = next_refresh_at(NOW, expires, interval=30, min_validity=60, rng=random.Random(0))
        assert at >= NOW + timedelta(seconds=lifetime * 0.45)


# --- stored_token / node_view ------------------------------------------------------------


def test_stored_token_keeps_the_old_refresh_token_when_none_comes_back() -> None:
    token = stored_token(
        {"access_token": "at_new", "expires_in": 600, "token_type": "bearer"},
        now=NOW, default_lifetime=3600, previous_refresh_token="rt_old",
        previous_extra={"instance_url": "https://x.example"}, settings={"region": "eu"},
    )
    assert token["refresh_token"] == "rt_old"
    assert token["access_token"] == "at_new"
    assert token["expires_at"] == int(NOW.timestamp()) + 600
    assert token["lifetime"] == 600
    assert token["extra"] == {"instance_url": "https://x.example"}
    assert token["settings"] == {"region": "eu"}


def test_stored_token_takes_a_rotated_refresh_token() -> None:
    token = stored_token(
        {"access_token": "at", "refresh_token": "rt_new", "expires_in": "abc"},
        now=NOW, default_lifetime=1800, previous_refresh_token="rt_old",
    )
    assert token["refresh_token"] == "rt_new"
    assert token["expires_at"] == int(NOW.timestamp()) + 1800


def test_stored_token_without_an_access_token_names_no_value() -> None:
    with pytest.raises(ValueError) as info:
        stored_token(
            {"access_token": "", "refresh_token": "rt_secret_value"},
            now=NOW, default_lifetime=3600,
        )
    assert "rt_secret_value" not in str(info.value)
    with pytest.raises(ValueError):
        stored_token({"token_type": "bearer"}, now=NOW, default_lifetime=3600)


def test_node_view_never_contains_a_refresh_token_or_client_secret() -> None:
    stored = stored_token(
        {
            "access_token": "at_visible",
            "refresh_token": "rt_secret_1",
            "expires_in": 3600,
            "scope": "read",
            "id_token": "idt_secret",
            "instance_url": "https://na1.example",
        },
        now=NOW, default_lifetime=3600,
        extra_fields={"instance_url": "instance_url"},
        settings={"subdomain": "acme"},
    )
    stored["client"] = {"client_id": "cid", "client_secret": "cs_secret_2"}
    view = node_view(stored)
    text = json.dumps(view)
    assert "refresh_token" not in view and "client_secret" not in text
    for secret in ("rt_secret_1", "cs_secret_2", "idt_secret"):
        assert secret not in text
    assert view["access_token"] == "at_visible"
    assert view["instance_url"] == "https://na1.example"
    assert view["subdomain"] == "acme"
    assert set(view) == {
        "access_token", "token_type", "expires_at", "scope", "instance_url", "subdomain",
    }


# --- a sweep's claimed lease: use it, or renew it first --------------------------------


@pytest.mark.parametrize(
    ("left", "timeout", "covers"),
    [
        (25.0, 15.0, True),  # just claimed: a whole lease (lease_seconds) left
        (20.0, 15.0, True),  # exactly the request's timeout plus 5 s
        (19.9, 15.0, False),
        (5.0, 15.0, False),
        (0.0, 15.0, False),
        (-3.0, 15.0, False),  # ran out: someone else may hold it now
        (11.0, 3.0, True),
        (7.9, 3.0, False),
    ],
)
def test_a_claimed_lease_is_used_only_with_room_for_the_request_and_the_write(
    left: float, timeout: float, covers: bool
) -> None:
    assert lease_covers(NOW + timedelta(seconds=left), NOW, request_timeout=timeout) is covers


def test_no_lease_covers_nothing() -> None:
    assert lease_covers(None, NOW, request_timeout=1.0) is False


# --- a holder that stops mid-refresh -----------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "lease"),
    [(15.0, 25.0), (1.0, 7.0), (3.0, 11.0), (5.0, 15.0), (30.0, 40.0), (0.5, 6.0)],
)
def test_lease_length(timeout: float, lease: float) -> None:
    """The request and the write (timeout + 5 s) and a short wait for a turn in the sweep
    (up to 5 s): with the default 15 s timeout a holder that stopped blocks its connection
    25 s, within Okta's default 30 s grace period for a rotated refresh token."""
    assert lease_seconds(timeout) == lease


@pytest.mark.parametrize("timeout", [0.1, 1.0, 5.0, 15.0, 60.0, 300.0])
def test_a_fresh_lease_covers_the_request_and_the_write(timeout: float) -> None:
    """A lease just taken is never renewed before its request (the sweep claims rows a
    little ahead and renews only those that waited), and it lasts at most 10 s more."""
    lease = lease_seconds(timeout)
    assert lease_covers(NOW + timedelta(seconds=lease), NOW, request_timeout=timeout)
    assert timeout + 5 <= lease <= timeout + 10


@pytest.mark.parametrize(
    ("lapse_in", "every", "look_in"),
    [
        (None, 8.0, 8.0),  # no lease held by another: look again later
        (20.0, 8.0, 8.0),  # runs out after the next look: look then (likely released by then)
        (8.0, 8.0, 8.0),
        (3.0, 8.0, 3.0 + LAPSE_MARGIN),  # runs out before: just after it does
        (0.0, 8.0, LAPSE_MARGIN),
        (-4.0, 8.0, LAPSE_MARGIN),  # has run out already (clocks): at once, never in the past
        (0.2, 0.1, 0.1),
    ],
)
def test_when_the_lease_watch_looks_again(
    lapse_in: float | None, every: float, look_in: float
) -> None:
    assert next_look(lapse_in, every=every) == pytest.approx(look_in)


def test_the_lease_watch_sees_every_lease_before_it_runs_out() -> None:
    """Whatever moment a holder took a lease and stopped, a look falls within the lease
    (looks every third of a lease) and the next look is just after it runs out."""
    lease = lease_seconds(15.0)
    every = lease / 3
    rng = random.Random(11)
    for _ in range(2000):
        taken = rng.uniform(0.0, 100.0)
        lapse = taken + lease
        t = rng.uniform(0.0, every)  # the watch's phase
        while True:
            held = taken <= t < lapse
            wait = next_look(lapse - t if held else None, every=every)
            assert wait > 0
            if held and t + wait >= lapse:
                assert 0 < t + wait - lapse <= LAPSE_MARGIN + 1e-9
                break
            t += wait
            assert t < lapse + every, "the lapse went unseen"


@pytest.mark.parametrize(
    ("lapsed", "interrupted"),
    [
        (None, None),  # the lease was free: a refresh like any other
        ("me-1", None),  # my own lease ran out (the row waited too long): nothing was cut off
        ("4242-abcdef", "4242-abcdef"),  # another holder never released it: it stopped
    ],
)
def test_a_refresh_taken_over_from_a_holder_that_stopped(
    lapsed: str | None, interrupted: str | None
) -> None:
    assert interrupted_by(lapsed, "me-1") == interrupted


def test_the_reason_given_for_reauth() -> None:
    assert reauth_reason("invalid_grant", "4242-abcdef") == INTERRUPTED
    assert INTERRUPTED == (
        "a refresh was interrupted (the process holding it stopped); "
        "the provider had rotated the refresh token"
    )
    assert reauth_reason("invalid_grant", None) is None  # the user or provider revoked it
    assert reauth_reason("unauthorized_client", "4242-abcdef") is None  # not a spent token
