"""scripts/gpu_kit.sh: lint, the preserved-package rule, the size limit and the pulp stub (fast; the
emulated install and run is `make gpu-kit-check`, docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_kit.sh"


def kit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, **kwargs)


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout


def test_no_kit_package_is_in_the_gpu_image_unless_pinned_there():
    result = kit("check-preserved")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in kit("packages").stdout.splitlines())
    image = set(lines["image"].split())
    assert {"torch", "numpy", "pyarrow", "peft", "tensorstore"} <= image
    kit_names = {spec.split("==")[0].lower().replace("_", "-") for spec in lines["kit"].split()}
    assert {"nemo-toolkit", "megatron-core", "transformers", "hydra-core", "fiddle"} <= kit_names
    assert "torch" not in kit_names and "numpy" not in kit_names
    assert kit_names & image == set(lines["carried despite image"].split())


def test_size_limit(tmp_path):
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"\0" * (1 << 20))
    ok = kit("check-size", str(tmp_path))
    assert ok.returncode == 0 and "1.0 MiB" in ok.stdout
    with open(tmp_path / "b-1-py3-none-any.whl", "wb") as handle:
        handle.truncate(56 << 20)  # sparse: 57 MiB in all
    over = kit("check-size", str(tmp_path))
    assert over.returncode == 1 and "over the 56 MiB limit" in over.stderr


def test_pulp_stub_imports_and_refuses_use(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_kit_pulp_stub", REPO / "scripts" / "gpu_kit_pulp_stub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    wheel = module.build(tmp_path)
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(tmp_path / "site")
    code = ("import pulp\nx: list[pulp.LpVariable] = []\ntry:\n    pulp.LpProblem(name='p')\n"
            "except ImportError as e:\n    print('refused', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            env={"PYTHONPATH": str(tmp_path / "site")})
    assert result.stdout.startswith("refused pulp.LpProblem"), result.stderr
