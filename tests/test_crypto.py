"""The keyring on its own: no database, no files, no network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from cryptography.fernet import Fernet

from broker.crypto import Keyring, Secret, generate_key, key_id, parse_key
from broker.errors import CredentialCorrupt, EncryptionKeyError

SECRET = "sk-live-CANARY-7f3a9c1e5b2d4a6f"
DATA = {"api_key": SECRET, "region": "eu"}


def _key() -> bytes:
    return generate_key().encode("ascii")


# --- seal / open ----------------------------------------------------------------------


def test_seal_then_open_returns_the_same_data_under_the_primary_key_id() -> None:
    ring = Keyring([_key()])
    sealed = ring.seal("g1", "openweathermap", DATA)
    assert sealed.key_id == ring.primary_key_id
    assert SECRET not in sealed.token
    assert sealed.token.startswith("gAAAAA")  # a Fernet token, version 0x80
    assert ring.open("g1", "openweathermap", sealed.token) == DATA


def test_sealing_twice_gives_different_tokens_that_both_open() -> None:
    ring = Keyring([_key()])
    a = ring.seal("g1", "x", DATA).token
    b = ring.seal("g1", "x", DATA).token
    assert a != b  # random IV per token
    assert ring.open("g1", "x", a) == ring.open("g1", "x", b) == DATA


@pytest.mark.parametrize(
    ("group", "integration"),
    [("g2", "openweathermap"), ("g1", "github"), ("g2", "github")],
    ids=["other-group", "other-integration", "both-other"],
)
def test_token_opened_as_another_connection_is_corrupt_and_names_it_without_the_secret(
    group: str, integration: str
) -> None:
    ring = Keyring([_key()])
    token = ring.seal("g1", "openweathermap", DATA).token
    with pytest.raises(CredentialCorrupt) as info:
        ring.open(group, integration, token)
    message = str(info.value)
    assert f"connection {integration!r} of group {group!r}" in message
    assert "another connection" in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)
    assert info.value.to_dict()["error"]["code"] == "credential_corrupt"


def _flip(token: str, byte: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[byte] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode("ascii")


# Fernet layout: version(1) | timestamp(8) | IV(16) | ciphertext(n) | HMAC(32).
@pytest.mark.parametrize("byte", [0, 4, 12, 30, -40, -1], ids=lambda b: f"byte{b}")
def test_a_flipped_bit_anywhere_in_the_token_is_corrupt(byte: int) -> None:
    ring = Keyring([_key()])
    token = ring.seal("g1", "openweathermap", DATA).token
    tampered = _flip(token, byte)
    assert tampered != token
    with pytest.raises(CredentialCorrupt) as info:
        ring.open("g1", "openweathermap", tampered)
    assert "does not decrypt" in str(info.value)
    assert "'openweathermap' of group 'g1'" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("token", ["", "not a token", "gAAAAA-truncated", "ключ"])
def test_garbage_tokens_are_corrupt_not_a_crash(token: str) -> None:
    with pytest.raises(CredentialCorrupt):
        Keyring([_key()]).open("g1", "x", token)


def test_token_under_a_key_the_ring_does_not_have_is_corrupt() -> None:
    token = Keyring([_key()]).seal("g1", "x", DATA).token
    with pytest.raises(CredentialCorrupt, match="does not decrypt"):
        Keyring([_key()]).open("g1", "x", token)


def test_valid_fernet_token_without_the_binding_envelope_is_corrupt() -> None:
    key = _key()
    bare = Fernet(key).encrypt(json.dumps(DATA).encode()).decode()  # no "g"/"i"/"d"
    with pytest.raises(CredentialCorrupt, match="another connection"):
        Keyring([key]).open("g1", "x", bare)


# --- parse_key --------------------------------------------------------------------------


def test_parse_key_accepts_a_generated_key_with_surrounding_whitespace() -> None:
    key = generate_key()
    assert parse_key(f"  {key}\n", where="somewhere") == key.encode("ascii")


@pytest.mark.parametrize(
    "bad",
    [
        base64.urlsafe_b64encode(b"S" * 16).decode(),  # 16 bytes
        base64.urlsafe_b64encode(b"S" * 31).decode(),  # 31 bytes
        base64.urlsafe_b64encode(b"S" * 33).decode(),  # 33 bytes
        base64.urlsafe_b64encode(b"S" * 64).decode(),  # 64 bytes
        "hunter2-is-my-password",  # not base64 of 32 bytes
        generate_key()[:43],  # padding cut off
        "",
    ],
    ids=["16-bytes", "31-bytes", "33-bytes", "64-bytes", "password", "unpadded", "empty"],
)
def test_parse_key_rejects_a_non_fernet_key_naming_where_and_not_echoing_it(bad: str) -> None:
    with pytest.raises(EncryptionKeyError) as info:
        parse_key(bad, where="encryption_keys[3]")
    message = str(info.value)
    assert message.startswith("encryption_keys[3]: not a Fernet key")
    assert "broker keys generate" in message
    if bad:
        assert bad not in message


# --- several keys -----------------------------------------------------------------------


def test_token_sealed_with_the_old_key_opens_with_new_then_old() -> None:
    old, new = _key(), _key()
    token = Keyring([old]).seal("g1", "x", DATA).token
    ring = Keyring([new, old])
    assert ring.primary_key_id == key_id(new)
    assert ring.key_ids == [key_id(new), key_id(old)]
    assert ring.open("g1", "x", token) == DATA
    # New tokens go under the new key: the old key alone cannot read them.
    fresh = ring.seal("g1", "x", DATA)
    assert fresh.key_id == key_id(new)
    with pytest.raises(CredentialCorrupt):
        Keyring([old]).open("g1", "x", fresh.token)


def test_rotate_reseals_under_the_primary_key_keeping_contents_and_binding() -> None:
    old, new = _key(), _key()
    token = Keyring([old]).seal("g1", "x", DATA).token
    rotated = Keyring([new, old]).rotate(token)
    assert rotated.key_id == key_id(new)
    assert rotated.token != token
    only_new = Keyring([new])
    assert only_new.open("g1", "x", rotated.token) == DATA
    with pytest.raises(CredentialCorrupt, match="another connection"):
        only_new.open("g2", "x", rotated.token)
    with pytest.raises(CredentialCorrupt):
        Keyring([old]).open("g1", "x", rotated.token)


def test_rotate_of_a_token_no_key_opens_is_corrupt() -> None:
    token = Keyring([_key()]).seal("g1", "x", DATA).token
    with pytest.raises(CredentialCorrupt):
        Keyring([_key(), _key()]).rotate(token)


def test_can_open_lists_the_key_ids_no_configured_key_has() -> None:
    a, b, c = _key(), _key(), _key()
    ring = Keyring([a, b])
    assert ring.can_open([key_id(a), key_id(b)]) == []
    assert ring.can_open([key_id(b), key_id(c)]) == [key_id(c)]


def test_an_empty_keyring_is_refused() -> None:
    with pytest.raises(EncryptionKeyError, match="no encryption key"):
        Keyring([])


# --- key ids ------------------------------------------------------------------------------


def test_key_id_is_stable_documented_and_differs_per_key() -> None:
    key = b"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 ASCII bytes, fixed
    signing = base64.urlsafe_b64decode(key)[:16]
    expected = hmac.new(signing, b"broker key id v1", hashlib.sha256).hexdigest()[:16]
    assert key_id(key) == expected
    assert key_id(key) == key_id(bytes(key))  # deterministic
    assert Keyring([key]).primary_key_id == expected
    assert len(expected) == 16 and int(expected, 16) >= 0
    ids = {key_id(_key()) for _ in range(50)}
    assert len(ids) == 50
    assert expected not in ids


def test_key_id_does_not_reveal_the_key() -> None:
    key = _key()
    kid = key_id(key)
    assert kid not in key.decode()
    assert kid not in base64.urlsafe_b64decode(key).hex()
    assert key.decode() not in repr(Keyring([key]))
    assert kid in repr(Keyring([key]))


# --- Secret -------------------------------------------------------------------------------


def test_secret_hides_its_value_from_repr_str_and_format() -> None:
    s = Secret(SECRET)
    shown = [
        repr(s),
        str(s),
        f"{s}",
        f"{s!r}",
        f"{s!s}",
        f"{s:>40}",
        "{}".format(s),  # noqa: UP032
        "%s" % s,  # noqa: UP031
        "%r" % s,  # noqa: UP031
        repr([s]),
        repr({"k": s}),
    ]
    for text in shown:
        assert SECRET not in text, text
        assert "*" in text
    assert s.value == SECRET
    assert type(s.value) is str
    assert s == SECRET  # still a str for comparisons
    assert isinstance(s, str)
