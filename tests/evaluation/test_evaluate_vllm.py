"""evaluate.py with vLLM (in .venv-gen, as a subprocess) gives the HF backend's greedy answers and
the same scores on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO

GEN_PY = REPO / ".venv-gen" / "bin" / "python"
HELDOUT = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task" / "heldout.jsonl"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GEN_PY.exists(), reason="needs .venv-gen with vLLM: run `make gen-env`"),
]


def evaluate(python: str, backend: str, out, tmp_path) -> dict:
    from nemo_dft.demo.tiny_model import tiny_hf_model_dir

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [python, str(REPO / "scripts" / "evaluate.py"), "--model", str(tiny_hf_model_dir()), "--data", str(HELDOUT),
         "--out", str(out), "limit=6", "extract=exact", "max_new_tokens=10", f"backend={backend}", "progress=false",
         "num_threads=1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())


def test_vllm_and_hf_give_the_same_greedy_answers(tmp_path):
    import sys

    vllm = evaluate(str(GEN_PY), "vllm", tmp_path / "vllm.json", tmp_path)
    hf = evaluate(sys.executable, "hf", tmp_path / "hf.json", tmp_path)
    assert vllm["settings"]["backend"] == "vllm" and hf["settings"]["backend"] == "hf"
    assert [e["prediction"] for e in vllm["examples"]] == [e["prediction"] for e in hf["examples"]]
    assert vllm["accuracy"] == hf["accuracy"]
    for key in ("mean_pos_logp", "mean_neg_logp", "rank_acc", "rank_acc_sum"):
        assert vllm[key] == pytest.approx(hf[key], abs=1e-4), key
