"""Every Megatron layout of the same global batch trains the same model.

One initial checkpoint, then 3 optimizer steps of DFT2 at (TP, PP, DP) = (1,1,1), (2,1,1),
(1,2,1), (1,1,2) and with a smaller micro-batch.  Losses per step, the u table and all
parameters (read back from the distributed checkpoints as full tensors) must agree.  The memory
features ride on the same initial checkpoint: the distributed optimizer (with overlapped gradient
reduction and parameter gathering) at DP = 2, full activation recomputation, and reference-based
DFT with the frozen reference at PP = 2 against PP = 1.  The SFT baseline (``dft.objective=sft``, a
token mean over the global batch) runs at TP = 2, PP = 2 and DP = 2 with two micro-batches of
unequal token counts per rank against one process, and without negatives against with them.

Adam divides each update by sqrt(v) + eps, so a weight whose gradient is ~1e-9 moves by about
+-lr whatever the last bits of that gradient are; summation order differs between layouts, so
the test uses eps = 1e-4 to compare what the layouts compute rather than that amplification.

The u table of reference-based DFT is held to a tolerance derived from the scores' own, not to
1e-5 of itself.  Each layout rounds the summed scores s and s_ref (about -20 to -100 here) a little
differently: a matrix product of another shape, a sum over stages or micro-batches in another
order, a CPU's own kernels.  The scores are held to ``rtol`` relative, so d = s/tau - s_ref moves by
up to rtol * |s| * (1/tau + 1) (s_ref is about s: the policy starts at its reference).  u_i =
logaddexp(log(1 - gamma) + u_i, log(gamma) + logmeanexp_j d_ij) is 1-Lipschitz in the largest
change of its inputs, so after any number of updates u moves by at most as much.  Near the
reference u itself is small (about 0.1), so 1e-5 of u asks of u a hundred times more than of the
scores it came from: measured on an AVX-512 Xeon, LoRA at PP = 2 gave 4.2e-6 (2.8e-5 of u) and
failed that.  ``reference_u_atol`` takes |s| as the largest per-step *mean* |negative score|, below
the largest single one, so the bound is stricter than the derivation.  In DFT2 u is about
s̄/tau, a relative tolerance on it is the scores' own, and it stays relative.
"""

from __future__ import annotations

import json
import subprocess
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
    "tp1_pp1_dp2_mb4_distopt": (1, 1, 2, 4),
    "tp1_pp1_dp1_mb4_recompute": (1, 1, 1, 4),
    "frozen_tp1_pp1_dp1_mb4": (1, 1, 1, 4),
    "frozen_tp1_pp2_dp1_mb4": (1, 2, 1, 4),
    # LoRA-DFT, its reference the same model with the adapters off (scored on the fly, or in the PP pass)
    "frozen_lora_tp1_pp1_dp1_mb4": (1, 1, 1, 4),
    "frozen_lora_tp1_pp2_dp1_mb4": (1, 2, 1, 4),
    # LoRA under TP compared in DFT2, as the layouts above: with a reference, the loss is a small
    # difference of terms ~75 times larger, so TP's summation order moves it by more than 1e-5
    "lora_tp1_pp1_dp1_mb4": (1, 1, 1, 4),
    "lora_tp2_pp1_dp1_mb4": (2, 1, 1, 4),
    "sft_tp1_pp1_dp1_mb4": (1, 1, 1, 4),
    "sft_tp2_pp1_dp1_mb4": (2, 1, 1, 4),
    "sft_tp1_pp2_dp1_mb4": (1, 2, 1, 4),
    "sft_tp1_pp1_dp2_mb2": (1, 1, 2, 2),
    "sft_nonegatives_tp1_pp1_dp1_mb4": (1, 1, 1, 4),
}
FROZEN_TAU = 1.0
FROZEN = ["dft.ref_free=false", "dft.reference=frozen", f"dft.tau={FROZEN_TAU}", "dft.gamma=0.85"]
EXTRA = {
    "tp1_pp1_dp2_mb4_distopt": ["model.use_distributed_optimizer=true", "model.overlap_grad_reduce=true",
                                "model.overlap_param_gather=true"],
    "tp1_pp1_dp1_mb4_recompute": ["model.recompute_granularity=full", "model.recompute_method=uniform",
                                  "model.recompute_num_layers=1"],
    # reference-based DFT: the frozen reference scored on the fly (PP = 1) or in its own pipeline pass
    "frozen_tp1_pp1_dp1_mb4": FROZEN,
    "frozen_tp1_pp2_dp1_mb4": FROZEN,
}
# full checkpoints: test_lora_layout_matches_single_process checks the base weights they hold
LORA = [*FROZEN, "peft.scheme=lora", "peft.dim=4", "peft.checkpoint=full"]
EXTRA.update({name: LORA for name in LAYOUTS if name.startswith("frozen_lora_")})
EXTRA.update({name: ["peft.scheme=lora", "peft.dim=4", "peft.checkpoint=full"] for name in LAYOUTS
              if name.startswith("lora_")})
EXTRA.update({name: ["dft.objective=sft"] for name in LAYOUTS if name.startswith("sft_")})
EXTRA["sft_nonegatives_tp1_pp1_dp1_mb4"].append("dft.num_negatives=0")
DFT2_LAYOUTS = [n for n in LAYOUTS if not n.startswith(("frozen_", "lora_", "sft_"))]
SFT_LAYOUTS = [n for n in LAYOUTS if n.startswith("sft_tp")]
METRICS = ("loss", "pos_logps", "neg_logps", "u_mean", "weight_mean", "rank_acc", "grad_norm")


def launch(run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    result = run_child(script_command("scripts/train_dft.py", f"run.dir={run_dir}", *COMMON, *overrides, nproc=nproc))
    assert result.returncode == 0, f"{run_dir.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def last_checkpoint(run_dir: Path) -> Path:
    [last] = sorted((run_dir / "checkpoints").glob("*-last"))
    return last / "weights"


def full_parameters(weights: Path, out: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(weights), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if k.startswith("module.") and torch.is_tensor(v)}


# the initial checkpoint every run starts from (tests/conftest.py's initial_checkpoint, shared with other files)
INIT = ("optim.lr=0", "optim.min_lr=0", "trainer.max_steps=1")


def layout_overrides(tp: int, pp: int, dp: int, mb: int, init_ckpt: Path, *extra: str) -> tuple[str, ...]:
    return (f"trainer.devices={tp * pp * dp}", f"model.tensor_model_parallel_size={tp}",
            f"model.pipeline_model_parallel_size={pp}", f"model.micro_batch_size={mb}",
            f"model.init_from={init_ckpt}", *extra)


def layout_key(init_ckpt: Path, name: str) -> tuple[int, tuple[str, ...]]:
    """``LAYOUTS[name]`` as the process count and overrides of its shared run."""
    tp, pp, dp, mb = LAYOUTS[name]
    return tp * pp * dp, layout_overrides(tp, pp, dp, mb, init_ckpt, *EXTRA.get(name, []))


def layout_run(shared_runs, init_ckpt: Path, name: str) -> Path:
    """The run directory of ``LAYOUTS[name]``, trained on first use; shared with
    test_packing_equivalence.py where it runs the same layout, with test_train_e2e.py, which checks
    what the runs of DFT and DFT2 on one process write, and with tests/convert's
    test_convert_dft_checkpoint.py and test_convert_lora.py, which export three of them."""
    nproc, overrides = layout_key(init_ckpt, name)
    return shared_runs.get(nproc, *overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_runs, initial_checkpoint):
    root = tmp_path_factory.mktemp("layouts")
    init_ckpt = initial_checkpoint
    results = {}
    shared_runs.prefetch([layout_key(init_ckpt, name) for name in LAYOUTS])  # the one-process runs, two at a time
    for name in LAYOUTS:
        run_dir = layout_run(shared_runs, init_ckpt, name)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        weights = last_checkpoint(run_dir)
        results[name] = {
            "metrics": metrics,
            "u": torch.load(weights / "common.pt", weights_only=False)["dft_u_table"]["values"],
            "params": full_parameters(weights, root / f"{name}.pt"),
            "memory": json.loads((run_dir / "memory.json").read_text()),
            "checkpoint": weights.parent,
        }
    results["init"] = {"params": full_parameters(init_ckpt / "weights", root / "init.pt")}
    return results


def reference_u_atol(metrics: list[dict], tau: float, score_rtol: float) -> float:
    """Absolute tolerance on u of reference-based DFT from the scores' relative one (module docstring)."""
    score_scale = max(abs(m["neg_logps"]) for m in metrics)
    return score_rtol * score_scale * (1.0 / tau + 1.0)


def assert_same_training(base: dict, other: dict, label: str, rtol: float, atol: float, params: bool = True,
                         metrics: tuple[str, ...] = METRICS, u_atol: float | None = None) -> None:
    """Metrics per step, the u table and every parameter agree; ``u_atol`` (reference-based DFT,
    see :func:`reference_u_atol`) replaces ``atol`` for u."""
    for key in metrics:
        ours = torch.tensor([m[key] for m in other["metrics"]], dtype=torch.float64)
        ref = torch.tensor([m[key] for m in base["metrics"]], dtype=torch.float64)
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=f"{label}: {key} differs")
    u_atol = atol if u_atol is None else u_atol
    largest = (other["u"].double() - base["u"].double()).abs().max().item()
    print(f"{label}: largest u difference {largest:.3g} (atol {u_atol:.3g}, rtol {rtol:g})")
    torch.testing.assert_close(other["u"], base["u"], rtol=rtol, atol=u_atol, msg=f"{label}: u differs")
    if not params:
        return
    assert base["params"].keys() == other["params"].keys()
    for name, value in base["params"].items():
        torch.testing.assert_close(other["params"][name], value, rtol=rtol, atol=atol, msg=f"{label}: {name}")


@pytest.mark.parametrize("layout", [n for n in DFT2_LAYOUTS if n != "tp1_pp1_dp1_mb4"])
def test_layout_matches_single_process(runs, layout):
    assert_same_training(runs["tp1_pp1_dp1_mb4"], runs[layout], layout, rtol=1e-5, atol=1e-6)


def test_distributed_optimizer_matches_the_replicated_one(runs):
    """Same DP = 2 run with the optimizer state sharded (and reductions overlapped): parameters within 1e-6."""
    assert_same_training(runs["tp1_pp1_dp2_mb4"], runs["tp1_pp1_dp2_mb4_distopt"], "distopt", rtol=1e-6, atol=1e-7)


def test_distributed_optimizer_shards_the_optimizer_state(runs):
    """Each of 2 data-parallel ranks holds at most 0.55x the Adam state of a single rank."""
    single = runs["tp1_pp1_dp1_mb4"]["memory"]
    sharded = runs["tp1_pp1_dp2_mb4_distopt"]["memory"]
    replicated = runs["tp1_pp1_dp2_mb4"]["memory"]
    assert sharded["use_distributed_optimizer"] and not replicated["use_distributed_optimizer"]
    [whole] = single["optimizer_state_bytes_per_rank"]
    ratios = [b / whole for b in sharded["optimizer_state_bytes_per_rank"]]
    print(f"optimizer state per rank, DP=2 distributed / DP=1: {ratios}")
    assert len(ratios) == 2 and max(ratios) <= 0.55, ratios
    assert replicated["optimizer_state_bytes_per_rank"] == [whole, whole]  # without it each rank holds it all


def test_recomputation_changes_nothing_but_memory(runs):
    from nemo_dft.modeling.gpt_config import checkpoint_gpt_config

    assert checkpoint_gpt_config(str(runs["tp1_pp1_dp1_mb4_recompute"]["checkpoint"])).recompute_granularity == "full"
    assert_same_training(runs["tp1_pp1_dp1_mb4"], runs["tp1_pp1_dp1_mb4_recompute"], "recompute", rtol=1e-6, atol=1e-7)


def test_frozen_reference_under_pipeline_parallelism(runs):
    """The reference's own forward-only pipeline pass gives the PP = 1 losses, u and grad norms."""
    pp1, pp2 = runs["frozen_tp1_pp1_dp1_mb4"], runs["frozen_tp1_pp2_dp1_mb4"]
    assert_same_training(pp1, pp2, "frozen reference PP=2", rtol=1e-5, atol=1e-6,
                         u_atol=reference_u_atol(pp1["metrics"], FROZEN_TAU, 1e-5))
    # the reference changes the objective: DFT with it is not DFT2 on the same batches
    assert [m["loss"] for m in pp1["metrics"]] != [m["loss"] for m in runs["tp1_pp1_dp1_mb4"]["metrics"]]


@pytest.mark.parametrize("single,layout", [("lora_tp1_pp1_dp1_mb4", "lora_tp2_pp1_dp1_mb4"),
                                           ("frozen_lora_tp1_pp1_dp1_mb4", "frozen_lora_tp1_pp2_dp1_mb4")])
def test_lora_layout_matches_single_process(runs, single, layout):
    """LoRA at TP = 2 (A and B split over the ranks) and PP = 2 (the adapter-free reference in its own
    pipeline pass) train the adapters like one process; the base weights stay those of the checkpoint."""
    single = runs[single]
    with_reference = layout.startswith("frozen_")  # DFT with the adapter-free reference; the TP pair is DFT2
    u_atol = reference_u_atol(single["metrics"], FROZEN_TAU, 1e-5) if with_reference else None
    assert_same_training(single, runs[layout], layout, rtol=1e-5, atol=1e-6, u_atol=u_atol)
    adapters = [k for k in single["params"] if ".adapter." in k]
    assert adapters and all(torch.equal(v, runs["init"]["params"][k]) for k, v in single["params"].items()
                            if k not in adapters)


def test_training_moved_the_parameters(runs):
    moved = [not torch.equal(runs["init"]["params"][k], v) for k, v in runs["tp1_pp1_dp1_mb4"]["params"].items()]
    assert sum(moved) >= len(moved) - 1  # every weight (the untouched padding aside) was updated


@pytest.mark.parametrize("layout", [n for n in SFT_LAYOUTS if n != "sft_tp1_pp1_dp1_mb4"])
def test_sft_layout_matches_single_process(runs, layout):
    """The SFT token mean over the global batch, whatever TP, PP, DP and micro-batch split."""
    assert_same_training(runs["sft_tp1_pp1_dp1_mb4"], runs[layout], f"sft {layout}", rtol=1e-5, atol=1e-6)


def test_sft_ignores_negatives_and_u(runs):
    """Negatives change nothing but the ranking metrics; u stays at u_init; SFT is not DFT2."""
    sft = runs["sft_tp1_pp1_dp1_mb4"]
    bare = runs["sft_nonegatives_tp1_pp1_dp1_mb4"]
    assert_same_training(sft, bare, "sft without negatives", rtol=1e-6, atol=1e-7,
                         metrics=("loss", "pos_logps", "grad_norm"))
    assert all(m["rank_acc"] is None and m["neg_logps"] is None for m in bare["metrics"])
    assert torch.count_nonzero(sft["u"]) == 0
    assert [m["loss"] for m in sft["metrics"]] != [m["loss"] for m in runs["tp1_pp1_dp1_mb4"]["metrics"]]
