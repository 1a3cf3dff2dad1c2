"""The deterministic byte pattern ``/bytes/{n}`` streams, and its digest for tests.

Byte ``i`` of every payload is ``i % 256``. Chunks are 64 KiB, a multiple of 256, so every
full chunk is the same object and nothing larger than one chunk is ever built.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

CHUNK_SIZE = 64 * 1024
_CHUNK = bytes(range(256)) * (CHUNK_SIZE // 256)


def iter_pattern(n: int) -> Iterator[bytes]:
    """Yield the first ``n`` bytes of the pattern in chunks of at most :data:`CHUNK_SIZE`."""
    if n < 0:
        raise ValueError("n must be >= 0")
    full, rest = divmod(n, CHUNK_SIZE)
    for _ in range(full):
        yield _CHUNK
    if rest:
        yield _CHUNK[:rest]


def expected_sha256(n: int) -> str:
    """Hex SHA-256 of the first ``n`` bytes of the pattern (what ``/bytes/{n}`` sends)."""
    digest = hashlib.sha256()
    for chunk in iter_pattern(n):
        digest.update(chunk)
    return digest.hexdigest()


def noise(n: int) -> bytes:
    """``n`` bytes of a fixed pseudo-random sequence (``/gzip/{n}`` compresses them)."""
    return random.Random(n).randbytes(n)
