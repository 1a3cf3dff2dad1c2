"""100 MB through the proxy route, both ways, in bounded memory.

Everything here runs in one process (the broker, its uvicorn server, the API server and
the client), so the peak of Python's traced allocations during a transfer bounds what the
broker held: were any side to buffer the body, the peak would be at least its 100 MB.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests import oauth_support
from tests.apiserver import ApiServer, expected_sha256, iter_pattern
from tests.test_proxy import PROXY, proxied

live_factory = oauth_support.live_factory

SIZE = 100 * 1024 * 1024
PEAK_LIMIT = 16 * 1024 * 1024


async def test_100_mb_down_and_up_through_the_proxy_in_bounded_memory(
    live_factory: Callable[..., Any], apiserver: ApiServer, store_url: str
) -> None:
    if "postgresql" in store_url:
        pytest.skip("the store plays no part in a transfer: it runs once, on SQLite")
    async with proxied(live_factory, apiserver) as live:
        url = PROXY.format(name="keyh")
        tracemalloc.start()
        try:
            digest = hashlib.sha256()
            size = 0
            async with live.service.stream("GET", url + f"bytes/{SIZE}") as r:
                assert r.status_code == 200
                assert r.headers["content-length"] == str(SIZE)
                async for chunk in r.aiter_raw():
                    digest.update(chunk)
                    size += len(chunk)
            _, down_peak = tracemalloc.get_traced_memory()
            assert size == SIZE and digest.hexdigest() == expected_sha256(SIZE)

            tracemalloc.reset_peak()

            async def body() -> AsyncIterator[bytes]:
                for chunk in iter_pattern(SIZE):
                    yield chunk

            r = await live.service.post(
                url + "upload", content=body(), headers={"Content-Length": str(SIZE)},
                timeout=120,
            )
            _, up_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 200, r.text
        assert r.json() == {"size": SIZE, "sha256": expected_sha256(SIZE)}
        assert down_peak < PEAK_LIMIT, down_peak
        assert up_peak < PEAK_LIMIT, up_peak
