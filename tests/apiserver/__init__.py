"""A provider-like HTTP API (Starlette + uvicorn on loopback) for the broker's proxy tests.

It stands in for GitHub, Zendesk and the like, and checks credentials as they do. The first
path segment picks the scheme; every prefix has the same routes::

    /bearer/...      Authorization: Bearer <token>, checked at the authserver's /api/me
    /key-header/...  X-Api-Key: <key>        (config.api_keys)
    /key-query/...   ?api_key=<key>          (config.api_keys)
    /basic/...       Authorization: Basic    (config.basic_users)
    /session/...     X-Session-Token: <token from POST /open/login>
    /open/...        no credentials

    /echo[/any/path]  /status/{code}  /flaky/{key}  /redirect?to=  /bytes/{n}
    /upload  /slow?seconds=  /set-cookie  /gzip/{n} (noise(n), Content-Encoding: gzip)
    /login  (POST {"user", "secret"}, JSON or form, checked against config.login_users:
             {"data": {"token"}, "expiresIn": config.session_lifetime}; 401 if refused)
    /sites  (config.sites: a JSON list, like Atlassian's accessible-resources)

Typical use (fixtures in ``tests/apiserver/fixture.py``)::

    apiserver.config.api_keys.add("k1")
    r = httpx.get(apiserver.url + "/key-header/echo", headers={"X-Api-Key": "k1"})
    assert r.json()["principal"] == "k1"
    url = apiserver.url + "/open/flaky/x?fail=2&retry_after=1"         # 429, 429, then 200
    assert httpx.get(url).headers["Retry-After"] == "1"
    assert apiserver.attempts("x") == 1
    assert apiserver.requests[-1].status == 429
    assert sha256(body).hexdigest() == expected_sha256(5_000_000)       # /bytes/5000000
"""

from .auth import SCHEMES
from .journal import RequestRecord
from .payload import CHUNK_SIZE, expected_sha256, iter_pattern, noise
from .server import ApiServer, ApiServerConfig

__all__ = [
    "CHUNK_SIZE",
    "SCHEMES",
    "ApiServer",
    "ApiServerConfig",
    "RequestRecord",
    "expected_sha256",
    "iter_pattern",
    "noise",
]
