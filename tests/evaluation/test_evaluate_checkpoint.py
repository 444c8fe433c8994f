"""evaluate.py on a training run's NeMo checkpoint (exported to HF on the fly) reproduces the
trainer's own held-out numbers: the same tokenization, truncation and first m negatives give the
same mean positive log-prob and ranking accuracy as ``eval.jsonl``'s ``after`` line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_child, script_command

pytestmark = pytest.mark.slow


def test_run_dir_scores_match_training_heldout_eval(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_child(script_command(
        "scripts/train_dft.py", f"run.dir={run_dir}", "trainer.max_steps=4", "data.num_epochs=1",
        "trainer.progress_bar=false", "dft.objective=sft"))
    assert trained.returncode == 0, trained.stderr[-4000:]
    [after] = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()
               if json.loads(line)["when"] == "after"]
    out = tmp_path / "results.json"
    heldout = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task" / "heldout.jsonl"
    evaluated = run_child(script_command(
        "scripts/evaluate.py", "--model", str(run_dir), "--data", str(heldout), "--out", str(out),
        "generate=false", "negatives=2", "max_length=64", "max_prompt_length=32", "progress=false"))
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["n"] == after["examples"]
    assert result["mean_pos_logp"] == pytest.approx(after["pos_logps"], abs=1e-3)
    assert result["mean_neg_logp"] == pytest.approx(after["neg_logps"], abs=1e-3)
    assert result["rank_acc"] == pytest.approx(after["rank_acc"])
