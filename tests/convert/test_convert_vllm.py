"""Exported HF directories load in vLLM (CPU) and score a chat prompt like the source model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from nemo_dft.convert import api
from tests.conftest import REPO

GEN_PY = REPO / ".venv-gen" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GEN_PY.exists(), reason="needs .venv-gen with vLLM: run `make gen-env`"),
]


@pytest.fixture(scope="module")
def vllm_results(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """arch -> (HF source, what vLLM reported for the exported copy); one vLLM process for both."""
    root = tmp_path_factory.mktemp("vllm")
    exported = {}
    for arch in ("mistral", "llama"):
        nemo = api.import_hf(tiny_hf(arch, False), root / f"{arch}-nemo")
        exported[arch] = api.export_hf(nemo, root / f"{arch}-hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["VLLM_CACHE_ROOT"] = str(root / "vllm-cache")
    env.pop("PYTHONPATH", None)
    command = [str(GEN_PY), str(Path(__file__).with_name("vllm_probe.py")), *map(str, exported.values())]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    reported = json.loads(lines[-1].removeprefix("RESULT "))
    return {arch: (tiny_hf(arch, False), reported[str(path)]) for arch, path in exported.items()}


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_vllm_loads_export_with_chat_template_and_matching_logprobs(vllm_results, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, reported = vllm_results[arch]
    assert reported["chat_template"] == AutoTokenizer.from_pretrained(str(source)).chat_template
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    ids = torch.tensor([reported["prompt_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
    expected = logprobs[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    diff = (expected - torch.tensor(reported["prompt_logprobs"])).abs().max().item()
    print(f"{arch}: vLLM vs HF source prompt log-prob max diff {diff:.2e}")
    assert diff < 1e-3
