"""DFT training from imported tiny Qwen2 (biased QKV) and Qwen3 (q/k norm) checkpoints, and the
export of the trained checkpoint back to HF, checked by logits against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_child, script_command

pytestmark = pytest.mark.slow

FAMILIES = [("qwen2", False), ("qwen3", True)]


def train(run_dir: Path, init_from: Path) -> Path:
    command = script_command("scripts/train_dft.py", f"run.dir={run_dir}", "trainer.progress_bar=false",
                             "trainer.max_steps=1", "model.global_batch_size=4", "data.eval_path=null",
                             "log.tensorboard=false", "model.preset=checkpoint", f"model.init_from={init_from}",
                             "optim.warmup_ratio=0")
    result = run_child(command)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    [last] = sorted((run_dir / "checkpoints").glob("*-last"))
    return last


@pytest.mark.parametrize(("arch", "tied"), FAMILIES, ids=[arch for arch, _ in FAMILIES])
def test_dft_step_from_an_imported_checkpoint_exports_back(tiny_hf, tmp_path: Path, arch: str, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    from nemo_dft.convert import api

    source = tiny_hf(arch, tied)
    imported = api.import_hf(source, tmp_path / "nemo")
    checkpoint = train(tmp_path / "run", imported)
    hf_dir = api.export_hf(checkpoint, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    assert model.config.model_type == arch
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    before, after = load_file(str(source / "model.safetensors")), load_file(str(hf_dir / "model.safetensors"))
    assert sorted(before) == sorted(after)
    family = "self_attn.q_proj.bias" if arch == "qwen2" else "self_attn.q_norm.weight"
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert any(family in name for name in moved), f"the {family} weights did not train: {moved}"
    comparison = api.verify(hf_dir, checkpoint)
    assert comparison.max_abs_diff < 1e-5, comparison.summary()
