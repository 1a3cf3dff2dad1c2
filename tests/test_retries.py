"""The retry rules (``broker.retries``): pure decisions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from broker.apispec import ApiSpec, WaitHeader
from broker.catalog import parse_provider
from broker.retries import IDEMPOTENT, Step, backoff, next_step, told_wait

NOW = 1_800_000_000.0


def placement(**api: object):  # type: ignore[no-untyped-def]
    spec = parse_provider({
        "name": "acme", "display_name": "Acme", "auth_type": "apikey",
        "fields": {"api_key": {"title": "Key"}},
        "apply": {"headers": {"X-Key": "{api_key}"}},
        "api": {"base_url": "https://api.acme.test/v1", **api},
    })
    found = spec.placement()
    assert found is not None
    return found


def step(status: int, method: str = "GET", *, headers: dict[str, str] | None = None,
         retried: int = 0, refreshed: bool = False, replayable: bool = True,
         can_refresh: bool = True, opt_in: bool = False, rand: float = 0.5,
         **api: object) -> Step | None:
    return next_step(
        method=method, status=status, headers=headers or {}, placement=placement(**api),
        retried=retried, refreshed=refreshed, replayable=replayable,
        can_refresh=can_refresh, retry_non_idempotent=opt_in, now=NOW, rand=lambda: rand,
    )


def test_refresh_once_on_401_for_any_method() -> None:
    assert step(401) == Step("refresh")
    assert step(401, "POST") == Step("refresh")
    assert step(401, refreshed=True) is None
    assert step(401, can_refresh=False) is None  # an API key: the 401 goes back


def test_refresh_on_is_data() -> None:
    assert step(403) is None
    assert step(403, refresh_on=[401, 403]) == Step("refresh")


def test_429_retried_for_idempotent_methods_only() -> None:
    for method in IDEMPOTENT:
        assert step(429, method, headers={"Retry-After": "2"}) is not None
    for method in ("POST", "PATCH"):
        assert step(429, method, headers={"Retry-After": "2"}) is None
        assert step(429, method, headers={"Retry-After": "2"}, opt_in=True) is not None


def test_retries_are_counted() -> None:
    assert step(503, retried=1) is not None
    assert step(503, retried=2) is None
    assert step(503, retried=0, retries=0) is None


def test_nothing_is_sent_twice_that_cannot_be_replayed() -> None:
    assert step(401, replayable=False) is None
    assert step(429, replayable=False) is None


def test_wait_is_what_the_provider_said_plus_bounded_jitter() -> None:
    low = step(429, headers={"Retry-After": "4"}, rand=0.0)
    high = step(429, headers={"Retry-After": "4"}, rand=1.0)
    assert low == Step("retry", 4.0)
    assert high is not None and 4.0 < high.wait <= 5.0


def test_a_wait_longer_than_the_cap_goes_back_at_once() -> None:
    assert step(429, headers={"Retry-After": "31"}) is None
    assert step(429, headers={"Retry-After": "31"}, max_retry_wait_seconds=60) is not None


def test_no_header_backs_off_exponentially_with_full_jitter() -> None:
    assert step(502, rand=1.0) == Step("retry", 0.5)
    assert step(502, rand=1.0, retried=1) == Step("retry", 1.0)
    assert step(502, rand=0.0) == Step("retry", 0.0)
    assert backoff(20, 30.0, lambda: 1.0) == 30.0


def test_other_statuses_go_back() -> None:
    for status in (200, 204, 301, 400, 404, 409, 500):
        assert step(status) is None


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        ("7", "retry_after", 7.0),
        ("7", "seconds", 7.0),
        (str(NOW + 12), "epoch", 12.0),
        (str(int((NOW + 3) * 1000)), "epoch_ms", 3.0),
        (format_datetime(datetime.fromtimestamp(NOW + 20, UTC), usegmt=True), "retry_after", 20.0),
        ("-5", "seconds", 0.0),
        (str(NOW - 100), "epoch", 0.0),
        ("soon", "retry_after", None),
        ("Wed, 99 Foo", "retry_after", None),
        ("nan", "seconds", None),
        ("inf", "seconds", None),
    ],
)
def test_told_wait_formats(value: str, fmt: str, expected: float | None) -> None:
    header = WaitHeader(name="X-Wait", format=fmt)  # type: ignore[arg-type]
    assert told_wait({"X-Wait": value}, [header], NOW) == expected


def test_first_usable_wait_header_wins() -> None:
    headers = [WaitHeader(name="Retry-After"), WaitHeader(name="X-RateLimit-Reset",
                                                          format="epoch")]
    assert told_wait({"X-RateLimit-Reset": str(NOW + 9)}, headers, NOW) == 9.0
    assert told_wait({"Retry-After": "junk", "X-RateLimit-Reset": str(NOW + 9)},
                     headers, NOW) == 9.0
    assert told_wait({}, headers, NOW) is None


def test_defaults() -> None:
    api = ApiSpec(base_url="https://x.test")
    assert (api.refresh_on, api.retry_on, api.retries, api.max_retry_wait_seconds) == (
        [401], [429, 502, 503, 504], 2, 30.0
    )
    assert [h.name for h in api.wait_headers] == ["Retry-After"]


def test_rate_limit_reset_headers_mean_nothing_on_a_502() -> None:
    reset = [{"name": "X-RateLimit-Reset", "format": "epoch"}]
    headers = {"X-RateLimit-Reset": str(NOW + 3000)}
    # On a 429 the reset an hour away is more than the cap: back to the caller at once.
    assert step(429, headers=headers, wait_headers=reset) is None
    # On a 502 it is not about this answer: a plain backoff.
    assert step(502, headers=headers, wait_headers=reset, rand=1.0) == Step("retry", 0.5)
