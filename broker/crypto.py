"""Encryption at rest: Fernet tokens under a MultiFernet keyring.

Every credential is sealed together with the group and integration it belongs to, so a
ciphertext copied from one row into another does not open as the other row's credential.

The first key in ``encryption_keys`` encrypts; every key decrypts. Each key has a public
*key id* (an HMAC of a fixed label under the key: it reveals nothing about the key) stored
beside each ciphertext, so rotation can find the rows still sealed under an old key and
startup can tell that a key is missing without trying to decrypt anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import CredentialCorrupt, EncryptionKeyError

__all__ = ["Keyring", "Secret", "generate_key", "load_or_create_key_file", "parse_key"]


class Secret(str):
    """A string that hides itself from ``repr()``, ``str()`` formatting in logs and tracebacks.

    It is still a ``str``: comparisons and ``.value`` give the real text.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __format__(self, spec: str) -> str:
        return "**********"


def generate_key() -> str:
    """A new random Fernet key (32 bytes, url-safe base64)."""
    return Fernet.generate_key().decode("ascii")


def parse_key(text: str, *, where: str) -> bytes:
    """Check that ``text`` is a Fernet key; raise EncryptionKeyError naming ``where`` if not.

    The message never contains the key itself.
    """
    raw = text.strip().encode("ascii", errors="replace")
    try:
        decoded = base64.urlsafe_b64decode(raw)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 32:
        raise EncryptionKeyError(
            f"{where}: not a Fernet key (expected 32 bytes in url-safe base64, 44 characters; "
            "make one with `broker keys generate`)"
        )
    return raw


def key_id(key: bytes) -> str:
    """The public identifier of a key: 8 bytes of HMAC-SHA256(key, label), in hex."""
    signing = base64.urlsafe_b64decode(key)[:16]
    return hmac.new(signing, b"broker key id v1", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Sealed:
    token: str
    key_id: str


class Keyring:
    """Encrypts with the first key, decrypts with any; binds each secret to its row."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise EncryptionKeyError("no encryption key configured")
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self.key_ids = [key_id(k) for k in keys]
        self.primary_key_id = self.key_ids[0]

    def __repr__(self) -> str:
        return f"Keyring(key_ids={self.key_ids!r})"

    def seal(self, group_id: str, integration: str, data: dict[str, Any]) -> Sealed:
        payload = json.dumps(
            {"g": group_id, "i": integration, "d": data}, separators=(",", ":")
        ).encode()
        token = self._fernet.encrypt(payload).decode("ascii")
        return Sealed(token=token, key_id=self.primary_key_id)

    def open(self, group_id: str, integration: str, token: str) -> dict[str, Any]:
        """Decrypt ``token`` and check it was sealed for this group and integration."""
        where = f"connection {integration!r} of group {group_id!r}"
        try:
            payload = json.loads(self._fernet.decrypt(token.encode("ascii")))
        except (InvalidToken, ValueError, UnicodeError) as exc:
            raise CredentialCorrupt(f"{where}: stored credential does not decrypt") from exc
        if (
            not isinstance(payload, dict)
            or payload.get("g") != group_id
            or payload.get("i") != integration
            or not isinstance(payload.get("d"), dict)
        ):
            raise CredentialCorrupt(f"{where}: stored credential belongs to another connection")
        data: dict[str, Any] = payload["d"]
        return data

    def rotate(self, token: str) -> Sealed:
        """Re-encrypt ``token`` under the primary key, keeping its contents and binding."""
        try:
            new = self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken as exc:
            raise CredentialCorrupt("stored credential does not decrypt") from exc
        return Sealed(token=new, key_id=self.primary_key_id)

    def can_open(self, key_ids: Sequence[str]) -> list[str]:
        """The ids in ``key_ids`` that no configured key has."""
        return [k for k in key_ids if k not in self.key_ids]


def load_or_create_key_file(path: Path, *, may_create: bool) -> tuple[bytes, bool]:
    """Read the key in ``path``; create it (mode 0600) when absent and ``may_create``.

    Returns ``(key, created)``.
    """
    if path.exists():
        return parse_key(path.read_text(), where=str(path)), False
    if not may_create:
        raise EncryptionKeyError(
            f"no encryption key: `encryption_keys` is not set and {path} does not exist, "
            "but the database already holds data. Configure the key the data was written "
            "with; the broker will not start with a new key."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key.encode("ascii"), True
