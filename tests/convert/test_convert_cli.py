"""``scripts/convert_hf.py`` end to end, as a user runs it (separate processes, with --verify)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "convert_hf.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO,
    )


def test_script_import_then_export_with_verification(tiny_hf, tmp_path: Path) -> None:
    source = tiny_hf("llama", False)
    nemo, hf = tmp_path / "nemo", tmp_path / "hf"

    done = _run(
        "import", "--hf", str(source), "--out", str(nemo), "--arch", "llama", "--verify", "--atol", "1e-5"
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "OK: max abs logit diff" in done.stdout
    assert "[convert] importing llama checkpoint" in done.stderr  # progress is shown

    done = _run(
        "export", "--nemo", str(nemo), "--out", str(hf), "--dtype", "fp32", "--verify", "--atol", "1e-5"
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "OK: max abs logit diff" in done.stdout
    original = load_file(str(source / "model.safetensors"))
    exported = load_file(str(hf / "model.safetensors"))
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())
    assert (hf / "chat_template.jinja").is_file()

    done = _run("export", "--nemo", str(nemo), "--out", str(hf))
    assert done.returncode == 2 and "already exists; pass --overwrite" in done.stderr
