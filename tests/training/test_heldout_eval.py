"""The held-out ranking accuracy counts every held-out row exactly once, at micro-batch 1, 2, 4 and
8, data- and pipeline-parallel (1 x DP 2, 4 x PP 2), before and after training and across a resume.

13 held-out rows (not a multiple of any batch size here); rows 5-9 are rigged to score 0 (their
first negative is the positive itself, a tie, which never ranks above).  The expected share is
computed independently: each evaluated checkpoint is exported to HF and every row is scored with
a plain transformers forward pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_child, script_command

pytestmark = pytest.mark.slow

TASK = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task"
ROWS, RIGGED = 13, range(5, 10)
COMMON = ["trainer.progress_bar=false", "data.num_epochs=1", "model.global_batch_size=8", "dft.ref_free=true",
          "dft.tau=0.3", "dft.gamma=0.9", "optim.warmup_ratio=0", "trainer.val_check_interval=1"]
# name: (micro-batch, DP, PP)
LAYOUTS = {"mb1_dp2": (1, 2, 1), "mb4_pp2": (4, 1, 2)}


def launch(run_dir: Path, *overrides: str, nproc: int = 1) -> None:
    result = run_child(script_command("scripts/train_dft.py", f"run.dir={run_dir}", *COMMON, *overrides, nproc=nproc))
    assert result.returncode == 0, f"{run_dir.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def last_checkpoint(run_dir: Path) -> Path:
    """The newest "-last" checkpoint (a resumed run keeps the one it resumed from, too)."""
    lasts = (run_dir / "checkpoints").glob("*-last")
    return max(lasts, key=lambda p: torch.load(p / "weights" / "common.pt", weights_only=False)["global_step"])


def write_heldout(path: Path) -> None:
    rows = [json.loads(line) for line in (TASK / "heldout.jsonl").read_text().splitlines()[:ROWS]]
    for i in RIGGED:
        rows[i]["generated_0"] = rows[i]["real"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def hf_share(checkpoint: Path, heldout: Path, out: Path) -> float:
    """Share of held-out rows whose positive's length-averaged log-prob beats every negative's,
    by a transformers forward pass over the checkpoint's HF export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dft.convert import export_hf
    from nemo_dft.data.dataset import DFTGroupDataset, GroupSettings
    from nemo_dft.data.io import read_rows

    hf_dir = export_hf(checkpoint, out)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64).eval()
    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, shuffle=False,
                             per_epoch_negatives=False)
    groups = DFTGroupDataset(read_rows(heldout), AutoTokenizer.from_pretrained(hf_dir), settings, str(heldout))
    correct = []
    for item in range(len(groups)):
        averages = []
        for pair in groups.group(item)["pairs"]:
            ids = torch.tensor([pair.prompt + pair.response])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
            response = logps.gather(-1, ids[0, 1:, None])[len(pair.prompt) - 1:]
            averages.append(response.sum().item() / (len(response) + 1e-8))
        correct.append(all(averages[0] > a for a in averages[1:]))
    assert not any(correct[i] for i in RIGGED)
    return sum(correct) / len(correct)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, initial_heldout, initial_run, initial_checkpoint):
    root = tmp_path_factory.mktemp("heldout")
    heldout = initial_heldout  # write_heldout's rows
    data = f"data.eval_path={heldout}"
    # lr = 0: the initial weights, evaluated before and after its one step at micro-batch 8: the shared
    # initial run (tests/conftest.py: DFT2 with these tau and gamma, checkpoints every step)
    (root / "mb8").symlink_to(initial_run, target_is_directory=True)
    init = initial_checkpoint
    for name, (mb, dp, pp) in LAYOUTS.items():
        launch(root / name, data, f"model.init_from={init}", "trainer.max_steps=1", f"model.micro_batch_size={mb}",
               f"trainer.devices={dp * pp}", f"model.pipeline_model_parallel_size={pp}", nproc=dp * pp)
    # micro-batch 2, two steps, then as if it had died after step 1's checkpoint (a finished run is not
    # resumed: a rerun of it is a no-op), and resumed to step 2
    resumed = [data, f"model.init_from={init}", "trainer.max_steps=2", "model.micro_batch_size=2",
               "checkpoint.every_n_steps=1"]
    launch(root / "resumed", *resumed)
    checkpoints = root / "resumed" / "checkpoints"
    for name in ("step=2", "step=2-last"):
        shutil.rmtree(checkpoints / name, ignore_errors=True)
    if not (checkpoints / "step=1-last").exists():  # the -last save of step 1, rotated away by step 2's
        (checkpoints / "step=1").rename(checkpoints / "step=1-last")
    first_start = [r for r in records(root / "resumed") if r["step"] <= 1]
    launch(root / "resumed", *resumed)
    expected = {"init": hf_share(init, heldout, root / "hf-init")}
    for name in [*LAYOUTS, "resumed"]:
        expected[name] = hf_share(last_checkpoint(root / name), heldout, root / f"hf-{name}")
    return {"root": root, "expected": expected, "first_start": first_start}


def test_share_is_not_trivial(runs):
    """The rigged rows make a skipped or repeated row visible: the shares are neither 0 nor 1."""
    assert 0 < runs["expected"]["init"] < 1


@pytest.mark.parametrize("name", ["mb8", *LAYOUTS])
def test_every_row_scored_once_before_and_after(runs, name):
    got = records(runs["root"] / name)
    assert [(r["step"], r["when"]) for r in got] == [(0, "before"), (1, "after")]
    assert all(r["examples"] == ROWS and r["rank_acc"] == r["rank_correct"] / ROWS for r in got)
    after = "init" if name == "mb8" else name
    assert got[0]["rank_acc"] == runs["expected"]["init"]
    assert got[1]["rank_acc"] == runs["expected"][after]


def test_resume_keeps_the_first_before(runs):
    got = records(runs["root"] / "resumed")
    assert got[:2] == runs["first_start"]  # the first start's before and step-1 results are kept
    assert [(r["step"], r["when"]) for r in got] == [(0, "before"), (1, "periodic"), (2, "after")]
    assert got[0]["rank_acc"] == runs["expected"]["init"]
    assert got[2]["rank_acc"] == runs["expected"]["resumed"]
    assert all(r["examples"] == ROWS for r in got)
