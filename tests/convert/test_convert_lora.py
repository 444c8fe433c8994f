"""Export of a LoRA-DFT run (trained at TP=2, so the fused adapters are resharded on load): merged
full weights, and an HF PEFT adapter that ``peft`` applies to the exported base; both give the NeMo
model's logits within 1e-5."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_child, script_command, subprocess_env

pytestmark = pytest.mark.slow

COMMON = ["trainer.progress_bar=false", "model.global_batch_size=8", "data.eval_path=null", "data.num_epochs=1",
          "log.tensorboard=false"]


LORA_RUN = ["trainer.max_steps=2", "trainer.devices=2", "model.tensor_model_parallel_size=2", "peft.scheme=lora",
            "peft.dim=4", "peft.alpha=8", "optim.lr=5e-2", "optim.min_lr=5e-2", "optim.warmup_ratio=0"]


def train(run_dir: Path, nproc: int, *overrides: str) -> Path:
    result = run_child(script_command("scripts/train_dft.py", f"run.dir={run_dir}", *COMMON, *overrides, nproc=nproc))
    assert result.returncode == 0, result.stderr[-6000:]
    [last] = sorted((run_dir / "checkpoints").glob("*-last"))
    return last


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from nemo_dft.convert import export_hf

    root = tmp_path_factory.mktemp("lora_export")
    base = train(root / "base", 1, "optim.lr=0", "optim.min_lr=0", "trainer.max_steps=1")
    lora = train(root / "lora", 2, *LORA_RUN, f"model.init_from={base}")  # adapter-only checkpoints (default)
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
    assert without.max_abs_diff > 1e-3, without.summary()


def test_merged_export_gives_the_nemo_logits(exported):
    from nemo_dft.convert import verify

    comparison = verify(exported["hf_merged"], exported["lora"])
    assert comparison.max_abs_diff < 1e-5, comparison.summary()


def test_exports_of_adapter_only_and_full_checkpoints_are_equal(exported, tmp_path):
    """The fixture's run saves adapter-only checkpoints (the base is loaded from its model.init_from on
    export); the same run with peft.checkpoint=full holds every weight.  Both exports, merged and PEFT
    adapter, are equal tensor for tensor."""
    from safetensors.torch import load_file

    from nemo_dft.convert import export_hf
    from nemo_dft.convert.peft_export import export_adapter
    from nemo_dft.modeling.adapter_checkpoint import recorded_base

    assert recorded_base(exported["lora"]) is not None  # the fixture's checkpoint is adapter-only
    full = train(tmp_path / "lora_full", 2, *LORA_RUN, f"model.init_from={exported['base']}", "peft.checkpoint=full")
    assert recorded_base(full) is None
    pairs = {"merged": (exported["hf_merged"], export_hf(full, tmp_path / "hf_merged")),
             "adapter": (exported["adapter"], export_adapter(full, tmp_path / "adapter",
                                                             base_model=str(exported["hf_base"])))}
    for label, (ours, theirs) in pairs.items():
        files = sorted(p.name for p in Path(ours).glob("*.safetensors"))
        assert files and files == sorted(p.name for p in Path(theirs).glob("*.safetensors")), label
        for name in files:
            a, b = load_file(str(Path(ours) / name)), load_file(str(Path(theirs) / name))
            assert a.keys() == b.keys() and a, (label, name)
            for key in a:
                assert torch.equal(a[key], b[key]), (label, name, key)
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (exported["adapter"], tmp_path / "adapter")]
    for config in configs:  # peft keeps target_modules as a set: its order in the file varies by process
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


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
