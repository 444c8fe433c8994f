"""Export of a LoRA-DFT run (trained at TP=2, so the fused adapters are resharded on load): merged
full weights, and an HF PEFT adapter that ``peft`` applies to the exported base; both give the NeMo
model's logits within 1e-5."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, script_command, subprocess_env

pytestmark = pytest.mark.slow

# test_parallel_layouts.py's LoRA run at TP = 2 (DFT2, 3 steps from the shared initial checkpoint,
# rank 4, alpha 8), made once per session for both files
LORA_RUN = "lora_tp2_pp1_dp1_mb4"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_runs, initial_checkpoint):
    from nemo_dft.convert import export_hf
    from tests.training.test_parallel_layouts import EXTRA, LAYOUTS, last_checkpoint, layout_run

    root = tmp_path_factory.mktemp("lora_export")
    base = initial_checkpoint  # the untrained model (lr = 0), shared with other files (tests/conftest.py)
    assert LAYOUTS[LORA_RUN][0] == 2 and {"peft.scheme=lora", "peft.dim=4", "peft.alpha=8"} <= set(EXTRA[LORA_RUN])
    lora = last_checkpoint(layout_run(shared_runs, base, LORA_RUN)).parent
    hf_base = export_hf(base, root / "hf_base")
    adapter = root / "adapter"
    command = script_command("scripts/convert_hf.py", "export", "--nemo", str(lora), "--out", str(adapter),
                             "--adapter", "--base-model", str(hf_base))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-6000:]
    return {"base": base, "lora": lora, "hf_base": hf_base, "adapter": adapter,
            "hf_merged": export_hf(lora, root / "hf_merged")}


def nemo_comparison(hf_model, nemo_dir: Path, tokenizer_dir: Path):
    from nemo.lightning import teardown
    from transformers import AutoTokenizer

    from nemo_dft.convert.load import load_nemo_model
    from nemo_dft.convert.logits import compare_logits, verification_inputs

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    inputs = verification_inputs(tokenizer, hf_model.config.vocab_size, random=2, seed=3)
    model, trainer = load_nemo_model(nemo_dir)
    try:
        return compare_logits(hf_model, model, inputs)
    finally:
        teardown(trainer, model)


def test_peft_adapter_on_the_exported_base_gives_the_nemo_logits(exported):
    from nemo_dft.convert.logits import load_hf_model
    from nemo_dft.convert.peft_export import load_hf_with_adapter

    config = json.loads((exported["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["base_model_name_or_path"] == str(exported["hf_base"])
    with_adapter = nemo_comparison(load_hf_with_adapter(exported["hf_base"], exported["adapter"]),
                                   exported["lora"], exported["hf_base"])
    assert with_adapter.max_abs_diff < 1e-5, with_adapter.summary()
    # the adapters matter: the base alone is far from the LoRA model
    without = nemo_comparison(load_hf_model(exported["hf_base"]), exported["lora"], exported["hf_base"])
    print(f"the base alone against the LoRA model: {without.summary()}")
    assert without.max_abs_diff > 1e-3, without.summary()


def test_merged_export_gives_the_nemo_logits(exported):
    from nemo_dft.convert import verify

    comparison = verify(exported["hf_merged"], exported["lora"])
    assert comparison.max_abs_diff < 1e-5, comparison.summary()


def test_adapter_export_of_a_full_fine_tuning_checkpoint_is_refused(exported, tmp_path):
    command = script_command("scripts/convert_hf.py", "export", "--nemo", str(exported["base"]), "--out",
                             str(tmp_path / "none"), "--adapter")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert result.returncode == 2 and "not a LoRA checkpoint" in result.stderr, result.stderr[-3000:]


GEN_PY = REPO / ".venv-gen" / "bin" / "python"


# Extended tier (`make test-all`, two vLLM engine starts): the adapter's content is checked by
# test_peft_adapter_on_the_exported_base_gives_the_nemo_logits (peft on the HF base), and vLLM's
# loading of an exported model by tests/evaluation/test_evaluate_vllm.py.
@pytest.mark.extended
@pytest.mark.skipif(not GEN_PY.exists(), reason="needs .venv-gen with vLLM: run `make gen-env`")
def test_vllm_applies_the_exported_adapter_like_the_merged_export(exported, tmp_path):
    """vLLM's LoRA loading takes the PEFT layout: base + adapter scores a prompt as the merged export
    does, and unlike the base alone (so a silently ignored adapter fails)."""
    import os

    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    env.pop("PYTHONPATH", None)
    command = [str(GEN_PY), str(Path(__file__).with_name("vllm_lora_probe.py")),
               str(exported["hf_base"]), str(exported["adapter"]), str(exported["hf_merged"])]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    # the RESULT line comes after all three scorings; vLLM's teardown of three engines may abort after it
    assert lines, f"exit {done.returncode}\n" + done.stdout[-3000:] + done.stderr[-5000:]
    reported = {name: torch.tensor(values) for name, values in json.loads(lines[-1][len("RESULT "):]).items()}
    assert (reported["adapter"] - reported["merged"]).abs().max() < 1e-4
    assert (reported["adapter"] - reported["base"]).abs().max() > 1e-3
