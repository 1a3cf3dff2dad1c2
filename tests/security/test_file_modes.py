"""Issue #11, item 9: the SQLite database and the files SQLite keeps beside it are 0600.

They were created 0644 (SQLite's default less a 022 umask): readable by every local user,
while the key file beside them was 0600. Ciphertext and hashes are not plaintext, but
the database is the broker's, like its key. Checked on real first starts, under umask 022:
``broker serve`` (which runs the migrations itself, through Alembic) while it is running,
so the ``-wal`` and ``-shm`` files exist, and ``broker db upgrade``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.serve_support import served_broker


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def test_first_start_of_broker_serve_creates_every_file_0600(tmp_path: Path) -> None:
    with served_broker(tmp_path, "log_level: info\n") as served:
        files = sorted(
            p.name for p in tmp_path.iterdir() if p.name not in ("config.yaml", "serve.log")
        )
        # The database, its WAL and shared-memory files, the key and the service token.
        assert files == ["broker.db", "broker.db-shm", "broker.db-wal", "broker.key",
                         "broker.token"], files
        modes = {name: mode(tmp_path / name) for name in files}
        assert modes == dict.fromkeys(files, "0o600"), modes
        assert "database migrated" in served.log()
    # config.yaml was written by the test under the same umask: that is what 0644 means here.
    assert mode(tmp_path / "config.yaml") == "0o644"


def test_broker_db_upgrade_on_a_new_database_creates_it_0600(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("database_url: sqlite+aiosqlite:///data/store.db\n")
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "db", "upgrade", "--config", "config.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert result.returncode == 0, result.stderr
    assert mode(tmp_path / "data" / "store.db") == "0o600"
    assert mode(tmp_path / "data" / "store.key") == "0o600"


def test_an_existing_database_keeps_the_mode_its_operator_gave_it(tmp_path: Path) -> None:
    # Only a file the broker creates is made 0600; an operator's choice is left alone.
    with served_broker(tmp_path, "log_level: info\n"):
        pass
    os.chmod(tmp_path / "broker.db", 0o640)
    with served_broker(tmp_path, "log_level: info\n"):
        assert mode(tmp_path / "broker.db") == "0o640"
