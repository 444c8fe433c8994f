"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm, tied embeddings) train the same model at
TP = 2, and Qwen3 packed at PP = 2, as one process on the same global batch.

Each family's tiny checkpoint (``tiny_qwen`` in tests/conftest.py: built by transformers' own
classes, Qwen's ChatML tokenizer, imported with scripts/convert_hf.py's code) starts every run:
2 optimizer steps of DFT2 on 8 prompts per step, from ``model.preset=checkpoint``.  One
single-process padded run per family is the reference of every comparison.  What TP = 2 splits:
Qwen2's q/k/v biases with the fused QKV rows of each rank's query groups, Qwen3's heads (its q/k
norm is per head, so each rank normalizes its own heads with the shared weight).  PP = 2 splits the
layers and puts the tied embedding on both stages (megatron all-reduces its gradient between them);
with ``data.packing=true`` and rows of ``data.pack_length`` a step has a varying number of
micro-batches.  Tolerances are test_parallel_layouts.py's (losses, u, grad norms and parameters
within 1e-5 relative, 1e-6 absolute; Adam's eps 1e-4 as there) and test_packing_equivalence.py's
for DFT2 (the same, plus the mean sequence scores within 1e-5 relative).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_child, script_command
from tests.training.test_parallel_layouts import assert_same_training, full_parameters, last_checkpoint

pytestmark = pytest.mark.slow

COMMON = [
    "trainer.progress_bar=false", "trainer.max_steps=2", "data.num_epochs=1", "data.eval_path=null",
    "model.global_batch_size=8", "model.micro_batch_size=4", "dft.ref_free=true", "dft.tau=0.3", "dft.gamma=0.9",
    "optim.warmup_ratio=0", "optim.adam_eps=1e-4", "log.tensorboard=false", "model.preset=checkpoint",
]
# name -> (family, TP, PP, extra overrides)
RUNS = {
    "qwen2_tp1": ("qwen2", 1, 1, []),
    "qwen2_tp2": ("qwen2", 2, 1, []),
    "qwen3_tp1": ("qwen3", 1, 1, []),
    "qwen3_tp2": ("qwen3", 2, 1, []),
    "qwen3_pp2_packed": ("qwen3", 1, 2, ["data.packing=true", "data.pack_length=384"]),
}
# parameters that exist only in each family, which the comparisons must cover
FAMILY_PARAMETERS = {"qwen2": "self_attention.linear_qkv.bias", "qwen3": "self_attention.q_layernorm.weight"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen):
    root = tmp_path_factory.mktemp("new_family_layouts")
    results = {}
    for name, (family, tp, pp, extra) in RUNS.items():
        hf_dir, nemo_dir = tiny_qwen(family)
        run_dir = root / name
        nproc = tp * pp
        command = script_command("scripts/train_dft.py", f"run.dir={run_dir}", *COMMON, f"trainer.devices={nproc}",
                                 f"model.tensor_model_parallel_size={tp}", f"model.pipeline_model_parallel_size={pp}",
                                 f"model.init_from={nemo_dir}", f"tokenizer.path={hf_dir}", *extra, nproc=nproc)
        result = run_child(command)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        weights = last_checkpoint(run_dir)
        results[name] = {
            "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "u": torch.load(weights / "common.pt", weights_only=False)["dft_u_table"]["values"],
            "params": full_parameters(weights, root / f"{name}.pt"),
        }
    return results


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tensor_parallel_matches_single_process(runs, family):
    single, split = runs[f"{family}_tp1"], runs[f"{family}_tp2"]
    assert len(single["metrics"]) == 2
    assert any(FAMILY_PARAMETERS[family] in name for name in single["params"])
    assert_same_training(single, split, f"{family} TP=2", rtol=1e-5, atol=1e-6)


def test_packed_pipeline_matches_padded_single_process(runs):
    """Qwen3 (tied embeddings across the two stages) packed at PP = 2 against one padded process."""
    padded, packed = runs["qwen3_tp1"], runs["qwen3_pp2_packed"]
    for key in ("pos_logps", "neg_logps"):
        torch.testing.assert_close(torch.tensor([m[key] for m in packed["metrics"]], dtype=torch.float64),
                                   torch.tensor([m[key] for m in padded["metrics"]], dtype=torch.float64),
                                   rtol=1e-5, atol=0.0, msg=f"qwen3 PP=2 packed: {key}")
    assert not any("output_layer" in name for name in padded["params"])  # tied: one embedding matrix
    assert_same_training(padded, packed, "qwen3 PP=2 packed", rtol=1e-5, atol=1e-6)


def test_family_weights_moved(runs, tiny_qwen, tmp_path):
    """The biases and q/k norms trained (so the comparisons above hold them to something)."""
    for family in ("qwen2", "qwen3"):
        _, nemo_dir = tiny_qwen(family)
        initial = full_parameters(nemo_dir / "weights", tmp_path / f"{family}-initial.pt")
        trained = runs[f"{family}_tp1"]["params"]
        names = [name for name in trained if FAMILY_PARAMETERS[family] in name]
        assert names and all(name in initial for name in names), sorted(initial)[:8]
        assert all(not torch.equal(initial[name], trained[name]) for name in names), names
