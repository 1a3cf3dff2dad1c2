"""What a token endpoint's answer means. Pure: no I/O, tested without a network.

    classify(status, error) -> Outcome

- ``transient``: try again later (no answer, timeout, 5xx, 408, 429). The credential is
  not at fault; a still-valid access token stays usable.
- ``reauth``: the grant is gone (``invalid_grant``): the user must connect again.
- ``operator``: the operator's client registration is wrong (``invalid_client``,
  ``unauthorized_client``): not the user's fault, so connections are not marked.
- ``rejected``: any other error the provider names (``invalid_scope``,
  ``invalid_request``, ...): this request will not succeed as it is.
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = ["Outcome", "classify", "safe_error_code"]


class Outcome(StrEnum):
    transient = "transient"
    reauth = "reauth"
    operator = "operator"
    rejected = "rejected"


OPERATOR_ERRORS = frozenset({"invalid_client", "unauthorized_client"})
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


def safe_error_code(error: object) -> str | None:
    """An RFC 6749 error code fit to show and log, or None (codes are [a-z_]; anything
    else could be provider text echoing the request)."""
    if isinstance(error, str) and re.fullmatch(r"[a-z][a-z0-9_.-]{0,63}", error):
        return error
    return None


def classify(status: int | None, error: str | None) -> Outcome:
    """Classify a failed token request. ``status`` None means no HTTP answer at all."""
    if error == "invalid_grant":
        return Outcome.reauth
    if error in OPERATOR_ERRORS:
        return Outcome.operator
    if error in TRANSIENT_ERRORS:
        return Outcome.transient
    if status is None or status >= 500 or status in (408, 429):
        return Outcome.transient
    if status == 401 and error is None:
        return Outcome.operator
    return Outcome.rejected
