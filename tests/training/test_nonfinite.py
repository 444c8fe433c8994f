"""NaN guard: an offline reference file with NaN log-probs for one example stops training at the
step that trains it (exit 3, naming the step and the micro-batch's example ids) with every saved
checkpoint finite; with trainer.nonfinite=skip the step is skipped, counted, and training ends."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_child, script_command

pytestmark = pytest.mark.slow

COMMON = ["trainer.progress_bar=false", "data.num_epochs=1", "data.eval_path=null", "model.global_batch_size=8",
          "model.micro_batch_size=4"]
BAD_POSITION = 13  # the example trained at step 2 (positions 8..15), in the second micro-batch (12..15)


def run(*args: str) -> subprocess.CompletedProcess:
    return run_child(script_command("scripts/train_dft.py", *COMMON, *args))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def order_of_epoch_0() -> list:
    """Example ids in the order epoch 0 trains them (the dataset's own shuffle, seed 1234)."""
    from transformers import AutoTokenizer

    from nemo_dft.data.dataset import DFTGroupDataset, GroupSettings
    from nemo_dft.data.io import read_rows

    rows = read_rows(REPO / "nemo_dft" / "demo" / "assets" / "tiny_task" / "train.jsonl")
    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    groups = DFTGroupDataset(rows, tokenizer, GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32),
                             "train")
    return [groups.example_ids[groups.locate(j)[1]] for j in range(16)]


def poison(scores: Path, out: Path, example_id) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(scores)
    rows = table.to_pylist()
    for row in rows:
        if row["id"] == json.dumps(example_id):
            row["logp"] = float("nan")
    assert any(math.isnan(r["logp"]) for r in rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)


def weights_finite(checkpoint: Path, out: Path) -> bool:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint / "weights"), str(out))
    state = torch.load(out, weights_only=False)
    tensors = [v for k, v in state.items() if k.startswith("module.") and torch.is_tensor(v) and v.is_floating_point()]
    common = torch.load(checkpoint / "weights" / "common.pt", weights_only=False)
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors) and bool(
        torch.isfinite(common["dft_u_table"]["values"]).all())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, initial_checkpoint, initial_reference_scores):
    root = tmp_path_factory.mktemp("nonfinite")
    # the untrained model and its reference scores for one epoch at these batch sizes (COMMON's),
    # shared with other files (tests/conftest.py); the poisoned copy is this module's own
    init = initial_checkpoint
    order = order_of_epoch_0()
    poisoned = root / "poisoned.parquet"
    poison(initial_reference_scores, poisoned, order[BAD_POSITION])
    args = [f"model.init_from={init}", "dft.reference=offline", f"dft.ref_logps={poisoned}", "trainer.max_steps=3",
            "checkpoint.every_n_steps=1"]
    return {"root": root, "args": args, "micro_batch": order[12:16]}


def test_nan_stops_after_naming_step_and_examples(setup):
    run_dir = setup["root"] / "stop"
    result = run(f"run.dir={run_dir}", *setup["args"])
    assert result.returncode == 3, result.stderr[-6000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "step 2" in line and "non-finite loss" in line, line
    assert str(setup["micro_batch"]) in line, (line, setup["micro_batch"])
    assert "Traceback" not in result.stderr
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    checkpoints = [p for p in (run_dir / "checkpoints").iterdir() if (p / "weights" / "common.pt").exists()]
    assert checkpoints, "the step before the bad one was checkpointed"
    for checkpoint in checkpoints:
        common = torch.load(checkpoint / "weights" / "common.pt", weights_only=False)
        assert common["global_step"] == 1
        assert weights_finite(checkpoint, setup["root"] / f"{checkpoint.name}.pt")


def test_nan_step_skipped_when_asked(setup):
    run_dir = setup["root"] / "skip"
    ok(run(f"run.dir={run_dir}", *setup["args"], "trainer.nonfinite=skip"))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[2]["loss"])
    last = max((run_dir / "checkpoints").glob("*-last"),
               key=lambda p: torch.load(p / "weights" / "common.pt", weights_only=False)["global_step"])
    assert weights_finite(last, setup["root"] / "skip.pt")
