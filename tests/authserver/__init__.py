"""A real OAuth2 authorization server (Authlib + Starlette + uvicorn) for the test suite.

Fixtures (``tests/authserver/fixture.py``): ``authserver`` (fresh server per test) and
``authserver_factory(**AuthServerConfig fields)``. Typical use::

    client = authserver.register_client(
        redirect_uris=["http://127.0.0.1:8000/oauth/callback"],
        scopes=["read"], token_endpoint_auth_method="client_secret_post",
    )
    # broker builds the authorize URL; the test acts as the user:
    redirect = authserver.consent(authorize_url, "alice")   # or approve=False
    authserver.fail_next(2, grant_type="refresh_token")       # 500, 500, then normal
    authserver.rate_limit_next(retry_after=3)                 # 429 + Retry-After
    authserver.timeout_next(seconds=5, process=True)          # reply lost after rotation
    authserver.revoke_user_grants("alice")
    assert authserver.token_requests["refresh_token"] == 1
    assert authserver.refresh_requests_for(refresh_token) == 1

``authserver.config`` (:class:`AuthServerConfig`) is read per request and may be changed
at runtime (lifetimes, rotation, auto-approve, iss, JSON bodies, Slack shape, extra fields).
"""

from .consent import ConsentError
from .faults import Fault
from .models import Client, RequestRecord
from .pkce import pkce_pair
from .server import AuthServer, AuthServerConfig

__all__ = [
    "AuthServer",
    "AuthServerConfig",
    "Client",
    "ConsentError",
    "Fault",
    "RequestRecord",
    "pkce_pair",
]
