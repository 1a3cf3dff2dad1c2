"""Private keys for the auth types that sign (JWT bearer assertions, app JWTs)."""

from __future__ import annotations

from typing import Any

__all__ = ["signing_key"]


def signing_key(pem: str, algorithm: str) -> Any:
    """``pem`` as the joserfc key that signs ``algorithm`` (ES*: EC, else RSA). Raises
    ValueError or joserfc's errors (they never hold the key) when it cannot be read."""
    from joserfc import jwk

    if algorithm.startswith("ES"):
        return jwk.import_key(pem, "EC")
    return jwk.import_key(pem, "RSA")
