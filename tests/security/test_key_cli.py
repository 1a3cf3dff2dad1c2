"""Issue #6, item 11: ``broker db upgrade`` with an encryption key that is not a Fernet key
(32 bytes, url-safe base64) fails clearly: exit status non-zero, the key's position named,
the key's text never echoed, no traceback, no database created.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from broker.crypto import generate_key

SENTINEL = "QkFES0VZU0VOVElORUw"  # base64 of BADKEYSENTINEL; in every bad key, never echoed
GOOD = generate_key()
BAD_KEYS = {
    "short": SENTINEL,
    "not-base64": f"!!{SENTINEL}!!-not-a-key",
    "31-bytes": base64.urlsafe_b64encode(b"BADKEYSENTINEL" + b"\x01" * 17).decode(),
    "non-ascii": f"{SENTINEL}é" + "A" * 24,
    "damaged": GOOD[:20] + SENTINEL + "==",
}
CASES: list[tuple[str, list[str], str]] = [
    *[(f"{name}-first", [BAD_KEYS[name], GOOD], "encryption_keys[0]")
      for name in ("short", "31-bytes", "non-ascii", "damaged")],
    ("second", [GOOD, BAD_KEYS["short"]], "encryption_keys[1]"),
    ("third", [GOOD, generate_key(), BAD_KEYS["not-base64"]], "encryption_keys[2]"),
]


def db_upgrade(directory: Path, keys: list[str]) -> subprocess.CompletedProcess[str]:
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump({
        "database_url": "sqlite+aiosqlite:///broker.db",
        "encryption_keys": keys,
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", "db", "upgrade", "--config", "config.yaml"],
        cwd=directory, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_db_upgrade_with_a_malformed_key_fails_naming_its_position_without_echoing_it(
    tmp_path: Path,
) -> None:
    assert all(SENTINEL[:11] in k for k in BAD_KEYS.values())
    assert len(base64.urlsafe_b64decode(BAD_KEYS["31-bytes"])) == 31
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(
            lambda case: db_upgrade(tmp_path / case[0], case[1]), CASES
        ))
    for (name, keys, where), result in zip(CASES, results, strict=True):
        output = result.stdout + result.stderr
        assert result.returncode != 0, (name, output)
        assert result.stderr.startswith(f"broker: {where}: not a Fernet key"), (name, output)
        assert "broker keys generate" in result.stderr, name  # says how to make a good one
        assert "Traceback" not in output, (name, output)
        assert "database is up to date" not in output, name
        for key in keys:
            assert key.strip() not in output, (name, "a key was echoed")
        assert SENTINEL[:11] not in output, (name, "part of a key was echoed")
        assert not (tmp_path / name / "broker.db").exists(), name
        assert not (tmp_path / name / "broker.key").exists(), name


def test_db_upgrade_with_a_malformed_key_file_names_the_file_without_echoing_it(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "keyfile"
    directory.mkdir()
    (directory / "broker.key").write_text(f"{SENTINEL}\n")
    (directory / "config.yaml").write_text(yaml.safe_dump({
        "database_url": "sqlite+aiosqlite:///broker.db", "key_file": "broker.key",
    }))
    result = subprocess.run(
        [sys.executable, "-m", "broker", "db", "upgrade", "--config", "config.yaml"],
        cwd=directory, capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
    )
    assert result.returncode != 0
    assert result.stderr.startswith(f"broker: {directory / 'broker.key'}: not a Fernet key")
    assert SENTINEL not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
