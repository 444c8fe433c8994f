"""Every Megatron layout of the same global batch trains the same model.

One initial checkpoint, then 3 optimizer steps of DFT2 at (TP, PP, DP) = (1,1,1), (2,1,1),
(1,2,1), (1,1,2) and with a smaller micro-batch.  Losses per step, the u table and all
parameters (read back from the distributed checkpoints as full tensors) must agree.

Adam divides each update by sqrt(v) + eps, so a weight whose gradient is ~1e-9 moves by about
+-lr whatever the last bits of that gradient are; summation order differs between layouts, so
the test uses eps = 1e-4 to compare what the layouts compute rather than that amplification.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_child, script_command

pytestmark = pytest.mark.slow

COMMON = [
    "trainer.progress_bar=false", "trainer.max_steps=3", "data.num_epochs=1", "data.eval_path=null",
    "model.global_batch_size=8", "dft.ref_free=true", "dft.tau=0.3", "dft.gamma=0.9", "optim.warmup_ratio=0",
    "optim.adam_eps=1e-4",
    # a checkpoint after every step: each save also checks that all ranks hold the same u table
    "checkpoint.every_n_steps=1",
]
LAYOUTS = {
    "tp1_pp1_dp1_mb4": (1, 1, 1, 4),
    "tp2_pp1_dp1_mb4": (2, 1, 1, 4),
    "tp1_pp2_dp1_mb4": (1, 2, 1, 4),
    "tp1_pp1_dp2_mb4": (1, 1, 2, 4),
    "tp1_pp1_dp1_mb2": (1, 1, 1, 2),
}


def launch(run_dir: Path, nproc: int, *overrides: str) -> None:
    result = run_child(script_command("scripts/train_dft.py", f"run.dir={run_dir}", *COMMON, *overrides, nproc=nproc))
    assert result.returncode == 0, f"{run_dir.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def last_checkpoint(run_dir: Path) -> Path:
    [last] = sorted((run_dir / "checkpoints").glob("*-last"))
    return last / "weights"


def full_parameters(weights: Path, out: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(weights), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if k.startswith("module.") and torch.is_tensor(v)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    init = root / "init"
    launch(init, 1, "optim.lr=0", "optim.min_lr=0", "trainer.max_steps=1")
    init_ckpt = last_checkpoint(init).parent
    results = {}
    for name, (tp, pp, dp, mb) in LAYOUTS.items():
        run_dir = root / name
        launch(run_dir, tp * pp * dp, f"trainer.devices={tp * pp * dp}", f"model.tensor_model_parallel_size={tp}",
               f"model.pipeline_model_parallel_size={pp}", f"model.micro_batch_size={mb}",
               f"model.init_from={init_ckpt}")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        weights = last_checkpoint(run_dir)
        results[name] = {
            "metrics": metrics,
            "u": torch.load(weights / "common.pt", weights_only=False)["dft_u_table"]["values"],
            "params": full_parameters(weights, root / f"{name}.pt"),
        }
    results["init"] = {"params": full_parameters(last_checkpoint(init), root / "init.pt")}
    return results


@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n != "tp1_pp1_dp1_mb4"])
def test_layout_matches_single_process(runs, layout):
    base, other = runs["tp1_pp1_dp1_mb4"], runs[layout]
    for key in ("loss", "pos_logps", "neg_logps", "u_mean", "weight_mean", "rank_acc", "grad_norm"):
        ours = torch.tensor([m[key] for m in other["metrics"]], dtype=torch.float64)
        ref = torch.tensor([m[key] for m in base["metrics"]], dtype=torch.float64)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=f"{layout}: {key} differs")
    torch.testing.assert_close(other["u"], base["u"], rtol=1e-5, atol=1e-6)
    assert base["params"].keys() == other["params"].keys()
    for name, value in base["params"].items():
        torch.testing.assert_close(other["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"{layout}: {name}")


def test_training_moved_the_parameters(runs):
    moved = [not torch.equal(runs["init"]["params"][k], v) for k, v in runs["tp1_pp1_dp1_mb4"]["params"].items()]
    assert sum(moved) >= len(moved) - 1  # every weight (the untouched padding aside) was updated
