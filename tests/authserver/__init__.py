"""A real OAuth2 authorization server (Authlib + Starlette + uvicorn) for the test suite.

See :mod:`tests.authserver.fixture` for the pytest fixtures and :class:`AuthServer` for
the Python API (client registration, consent driving, fault injection, counters).
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
