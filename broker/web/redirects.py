"""Where the broker may send a browser back to. Pure.

A "return to" value is accepted only when it is one of the broker's own paths (``/x``, not
``//x`` or ``/\\x``) or an absolute URL on the broker's own origin or a configured allowed
origin. Everything else (``//evil``, ``https:/\\evil``, ``javascript:``...) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["MAX_RETURN_TO", "safe_return_to"]

# A place in an app is a short URL; a long one only makes each stored flow bigger.
MAX_RETURN_TO = 512
_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")


def safe_return_to(value: str | None, allowed_origins: Iterable[str]) -> str | None:
    """``value`` if it is a safe place to send a browser; otherwise None."""
    if not value or len(value) > MAX_RETURN_TO or _CONTROL.search(value):
        return None
    if value.startswith("/"):
        return value if not value.startswith("//") else None
    try:
        parts = urlsplit(value)
    except ValueError:
        # "http://[::1", "http://\uff0f" (NFKC-unsafe netloc): refused, not a 500.
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.username:
        return None
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    return value if origin in {o.lower() for o in allowed_origins} else None
