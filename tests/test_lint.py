"""The code base type-checks (mypy strict) and lints (ruff): part of the test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_mypy_strict_passes_on_the_package_and_benchmarks() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes_on_package_benchmarks_tests_and_examples() -> None:
    result = run("ruff", "check", "broker", "bench", "tests", "examples")
    assert result.returncode == 0, result.stdout + result.stderr
