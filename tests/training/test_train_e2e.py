"""End to end: scripts/train_dft.py on the embedded task, checking metrics.jsonl and the checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_child

pytestmark = pytest.mark.slow

REQUIRED = {"step", "loss", "lr", "grad_norm", "u_mean", "weight_mean", "pos_logps", "neg_logps", "rank_acc",
            "tokens_per_s"}


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/train_dft.py", f"run.dir={run_dir}", "trainer.progress_bar=false", *overrides]
    return run_child(command)


def checkpoint_common_state(run_dir: Path) -> dict:
    [last] = sorted((run_dir / "checkpoints").glob("*-last"))
    assert (last / "context" / "io.json").exists() and (last / "context" / "model.yaml").exists()
    return torch.load(last / "weights" / "common.pt", weights_only=False)


# The single-process runs of DFT (its frozen reference, the default objective) and DFT2 of
# test_parallel_layouts.py: 3 steps of 8 prompts, micro-batch 4, one epoch, from the shared initial
# checkpoint (tests/conftest.py), made once per session for both files.
VARIANTS = {"dft": "frozen_tp1_pp1_dp1_mb4", "dft2": "tp1_pp1_dp1_mb4"}


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_training_script_writes_metrics_and_checkpoint(shared_runs, initial_checkpoint, variant):
    from tests.training.test_parallel_layouts import COMMON, EXTRA, FROZEN, LAYOUTS, layout_run

    steps, gbs = 3, 8
    # the settings the counts below rely on: 3 steps of 8 prompts, DFT2's or the default DFT's
    assert LAYOUTS[VARIANTS[variant]] == (1, 1, 1, 4)
    assert {"trainer.max_steps=3", "model.global_batch_size=8", "data.num_epochs=1", "dft.tau=0.3",
            "dft.gamma=0.9"} <= set(COMMON)
    assert "dft.ref_free=true" in COMMON and EXTRA.get(VARIANTS[variant]) == (FROZEN if variant == "dft" else None)
    run_dir = layout_run(shared_runs, initial_checkpoint, VARIANTS[variant])
    assert "DFT summary" in shared_runs.stdout[run_dir]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert REQUIRED <= set(record)
        assert all(math.isfinite(record[k]) for k in REQUIRED)
        assert 0.0 <= record["rank_acc"] <= 1.0 and record["tokens_per_s"] > 0
    common = checkpoint_common_state(run_dir)
    u = common["dft_u_table"]["values"]
    assert u.numel() == 512
    # Each step trains gbs distinct examples of epoch 0 and only those entries leave u_init = 0.
    # With DFT the reference is the initial policy, so at step 1 d = 0 and the update gives
    # u = log((1 - gamma) e^0 + gamma e^0) = 0 exactly: only later steps move u.
    touched_steps = steps if variant == "dft2" else steps - 1
    assert int((u != 0).sum()) == touched_steps * gbs
    if variant == "dft":
        assert records[0]["u_mean"] == 0.0 and records[0]["weight_mean"] == pytest.approx(1.0)
    assert (run_dir / "reference").exists() == (variant == "dft")


def test_invalid_config_fails_before_training(tmp_path):
    result = train(tmp_path, "dft.gamma=1.5")
    assert result.returncode == 2 and "dft.gamma" in result.stderr
    result = train(tmp_path, "model.no_such_key=1")
    assert result.returncode == 2 and "no_such_key" in result.stderr
    result = train(tmp_path, "model.global_batch_size=10", "model.micro_batch_size=4")
    assert result.returncode == 2 and "model.global_batch_size" in result.stderr
    result = train(tmp_path, "trainer.max_steps=100000")
    assert result.returncode == 2 and "trainer.max_steps" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_preset_checkpoint_takes_the_architecture_from_init_from(tmp_path):
    from nemo_dft.modeling.gpt_config import checkpoint_gpt_config

    common = ["trainer.max_steps=1", "data.num_epochs=1", "data.eval_path=null", "model.global_batch_size=8"]
    result = train(tmp_path / "three_layers", *common, "model.config.num_layers=3")
    assert result.returncode == 0, result.stderr[-6000:]
    [init] = sorted((tmp_path / "three_layers" / "checkpoints").glob("*-last"))
    # the default (tiny, 2 layers) does not describe that checkpoint; the checkpoint's own config does
    mismatched = train(tmp_path / "tiny", *common, f"model.init_from={init}")
    assert mismatched.returncode != 0
    result = train(tmp_path / "from_checkpoint", *common, "model.preset=checkpoint", f"model.init_from={init}")
    assert result.returncode == 0, result.stderr[-6000:]
    [last] = sorted((tmp_path / "from_checkpoint" / "checkpoints").glob("*-last"))
    assert checkpoint_gpt_config(str(last)).num_layers == 3
