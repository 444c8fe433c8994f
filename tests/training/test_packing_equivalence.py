"""Packed and padded micro-batches train the same model (data.packing).

From one initial checkpoint, 3 optimizer steps of the same global batch, padded and packed, for
DFT with the frozen reference and DFT2 at TP = 2, DP = 2 and PP = 2, and DFT with the offline
reference file at DP = 2 and PP = 2 (fp32, CPU).  Every step's mean sequence scores (pos_logps,
neg_logps) agree within 1e-5 relative (measured: at most 2.8e-6).  DFT2 then agrees within 1e-5
relative in losses, u, grad norms and parameters (measured 1e-7 to 9e-7).  With a reference, u
is held to the tolerance test_parallel_layouts.py derives from the scores' 1e-5.  The rest of DFT
with a reference does not agree within 1e-5 everywhere: its weights exp(s/tau - s_ref - u) act
on summed scores (about -100 here) and its loss is a small difference of such terms, so the fp32
rounding of a differently shaped matrix product (a few 1e-7 of a score) is magnified.  Measured, elementwise: the frozen
reference agrees within 2e-5 at DP = 2 and PP = 2 and within 5e-5 at TP = 2 (held to 5e-5); the
offline file, scored padded to max_length, differs by up to 1.0e-4 in the loss (held to 2e-4;
padded TP = 2 and DP = 2 runs with it already differ by 2.2e-5).  Under pipeline parallelism
(PP = 2, data.pack_length rows of a varying number of groups, so a varying number of
micro-batches per step) the packed run is compared with the padded DP = 2 run of the same global
batch, and its held-out pass with the padded one's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.training.test_parallel_layouts import (
    assert_same_training,
    full_parameters,
    last_checkpoint,
    launch,
    layout_overrides,
    reference_u_atol,
)

# (rtol, atol) on losses, u, grad norms and parameters, elementwise (measured, see the docstring)
TOLERANCE = {"dft2": (1e-5, 1e-6), "frozen": (5e-5, 5e-6), "offline": (2e-4, 2e-5)}
EVAL_PATH = REPO / "nemo_dft/demo/assets/tiny_task/heldout.jsonl"
TRAIN_PATH = REPO / "nemo_dft/demo/assets/tiny_task/train.jsonl"
REFERENCE_TAU = 1.0
OBJECTIVES = {
    "dft2": [],
    "frozen": ["dft.ref_free=false", "dft.reference=frozen", f"dft.tau={REFERENCE_TAU}", "dft.gamma=0.85"],
    "offline": ["dft.ref_free=false", "dft.reference=offline", f"dft.tau={REFERENCE_TAU}", "dft.gamma=0.85"],
}
LAYOUTS = {"tp2": ["model.tensor_model_parallel_size=2"], "dp2": []}
# The offline file enters the loss the same way at every layout; packing under TP is covered by
# DFT2 and the frozen reference, so offline runs at DP = 2 and PP = 2 only (keeps the suite short).
NOT_RUN = {("offline", "tp2")}
# Pipeline parallelism packs rows of data.pack_length (a varying number of whole groups each, so a
# step's micro-batch count varies); its padded counterpart is the DP = 2 run of the same global
# batch (the layouts agree: test_parallel_layouts.py).  The frozen-reference pair also compares
# the held-out evaluation, which under PP runs on packed rows too.
PIPELINE = ["model.pipeline_model_parallel_size=2", "model.micro_batch_size=4", "data.pack_length=384"]
WITH_EVAL = {"frozen_dp2_packing_false", "frozen_pp2_packing_true"}


def training_result(run_dir: Path, out: Path) -> dict:
    weights = last_checkpoint(run_dir)
    held_out = run_dir / "eval.jsonl"
    return {
        "eval": [json.loads(line) for line in held_out.read_text().splitlines()] if held_out.exists() else None,
        "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
        "u": torch.load(weights / "common.pt", weights_only=False)["dft_u_table"]["values"],
        "params": full_parameters(weights, out),
    }


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory, shared_runs, initial_checkpoint, initial_reference_scores):
    root = tmp_path_factory.mktemp("packing")
    init_ckpt = initial_checkpoint  # test_parallel_layouts.py's (tests/conftest.py)
    scores = initial_reference_scores  # its offline reference file (one epoch), shared with test_nonfinite.py
    results = {}
    for objective, objective_args in OBJECTIVES.items():
        extra = [*objective_args, f"dft.ref_logps={scores}"] if objective == "offline" else objective_args
        runs = [(layout, packing, args) for layout, args in LAYOUTS.items() for packing in ("false", "true")
                if (objective, layout) not in NOT_RUN]
        for layout, packing, layout_args in [*runs, ("pp2", "true", PIPELINE)]:
            name = f"{objective}_{layout}_packing_{packing}"
            if objective == "dft2" and packing == "false":  # test_parallel_layouts.py's DFT2 run of this layout
                tp, dp = (2, 1) if layout == "tp2" else (1, 2)
                run_dir = shared_runs.get(2, *layout_overrides(tp, 1, dp, 4, init_ckpt))
            else:
                held_out = [f"data.eval_path={EVAL_PATH}"] if name in WITH_EVAL else []
                run_dir = root / name
                launch(run_dir, 2, "trainer.devices=2", f"model.init_from={init_ckpt}", f"data.packing={packing}",
                       *layout_args, *extra, *held_out)
            results[name] = training_result(run_dir, root / f"{name}.pt")
    # 12 examples, 2 epochs, 8 prompts per step: step 2 holds the end of epoch 0 and the start of
    # epoch 1, so examples recur within it; its u crosses ranks once per epoch (u_table.py)
    subset = root / "twelve.jsonl"
    subset.write_text("".join(TRAIN_PATH.read_text().splitlines(keepends=True)[:12]))
    crossing = [f"model.init_from={init_ckpt}", f"data.path={subset}", "data.num_epochs=2", "data.shuffle=true",
                "data.packing=true", "data.pack_length=384"]
    for name, dp in (("crossing_dp1", 1), ("crossing_dp2", 2)):
        launch(root / name, dp, f"trainer.devices={dp}", *crossing)
        results[name] = training_result(root / name, root / f"{name}.pt")
    return results


COMPARED = [(o, lay) for o in sorted(OBJECTIVES) for lay in [*sorted(LAYOUTS), "pp2"] if (o, lay) not in NOT_RUN]


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "layout"), COMPARED)
def test_packed_matches_padded(packed_runs, objective, layout):
    padded = packed_runs[f"{objective}_{'dp2' if layout == 'pp2' else layout}_packing_false"]
    packed = packed_runs[f"{objective}_{layout}_packing_true"]
    for key in ("pos_logps", "neg_logps"):
        torch.testing.assert_close(torch.tensor([m[key] for m in packed["metrics"]], dtype=torch.float64),
                                   torch.tensor([m[key] for m in padded["metrics"]], dtype=torch.float64),
                                   rtol=1e-5, atol=0.0, msg=f"{objective} {layout}: {key}")
    rtol, atol = TOLERANCE[objective]  # see the module docstring
    # u of reference-based DFT: from the scores' 1e-5, as derived in test_parallel_layouts.py
    u_atol = None if objective == "dft2" else reference_u_atol(padded["metrics"], REFERENCE_TAU, 1e-5)
    assert_same_training(padded, packed, f"{objective} {layout} packed", rtol=rtol, atol=atol, u_atol=u_atol)


@pytest.mark.slow
def test_packed_rows_crossing_an_epoch_train_alike_on_one_and_two_ranks(packed_runs):
    """Rows of data.pack_length over a step that crosses an epoch boundary (examples recur in it):
    2 data-parallel ranks, whose micro-batches differ in number and size, take the one-rank run's
    steps (DFT2, 1e-5), u table included."""
    one, two = packed_runs["crossing_dp1"], packed_runs["crossing_dp2"]
    assert len(one["metrics"]) == 3
    assert_same_training(one, two, "crossing an epoch, DP = 2", rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_packed_held_out_evaluation_under_pipeline_parallelism(packed_runs):
    """The held-out pass on packed rows of data.pack_length at PP = 2 scores what the padded one
    scores, before and after training (every held-out prompt counted once)."""
    padded, packed = packed_runs["frozen_dp2_packing_false"]["eval"], packed_runs["frozen_pp2_packing_true"]["eval"]
    assert [r["when"] for r in packed] == [r["when"] for r in padded] == ["before", "after"]
    for before_after_padded, before_after_packed in zip(padded, packed, strict=True):
        for key in ("examples", "response_tokens", "rank_correct"):
            assert before_after_packed[key] == before_after_padded[key], key
        for key in ("pos_logps", "neg_logps"):
            assert before_after_packed[key] == pytest.approx(before_after_padded[key], rel=1e-5), key


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.packing=true", "model.pipeline_model_parallel_size=2"], "data.pack_length: packed rows under pipeline"),
    (["data.pack_length=256"], "data.pack_length: is set but data.packing=false"),
    (["data.packing=true", "data.pack_length=100"], r"data.pack_length: must be an integer of at least 189"),
    (["data.packing=true", "data.pack_length=252"], "data.pack_length: must be a multiple of 8"),
])
def test_bad_packing_settings_are_refused(overrides, message):
    from nemo_dft.config.training import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[*overrides, "trainer.devices=2"])
