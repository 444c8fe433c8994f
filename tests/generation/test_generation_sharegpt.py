"""A ShareGPT-style file (conversations of from/value, a per-row system prompt) through generation
with the HF backend, the shard merge, and a few steps of DFT training on the merged file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from generation_testutils import task_rows, write_jsonl

from nemo_dft.data.io import read_rows
from nemo_dft.generation.config import load_config
from nemo_dft.generation.merge import merge_shards
from nemo_dft.generation.runner import run_generation
from tests.conftest import REPO, run_child, script_command

SYSTEM = "Answer with the letters only."


def sharegpt_input(path: Path, count: int) -> Path:
    rows = [
        {
            "id": r["id"],
            "system": SYSTEM if i % 2 == 0 else None,
            "conversations": [{"from": "human", "value": r["q"]}, {"from": "gpt", "value": r["a"]}],
        }
        for i, r in enumerate(task_rows(count))
    ]
    return write_jsonl(path, rows)


@pytest.mark.slow
def test_sharegpt_file_goes_through_generation_merge_and_training(tmp_path, tiny_model) -> None:
    data = sharegpt_input(tmp_path / "reasoning.jsonl", 8)
    out = tmp_path / "neg"
    for index in (0, 1):  # two shards, as two array tasks would, then the merge
        cfg = load_config(REPO / "conf/generate_negatives_reasoning.yaml", [
            "backend=hf", f"model.path={tiny_model}", f"data.input={data}", "data.format.id_field=id",
            f"output.dir={out}", "sampling.max_new_tokens=10", "shard.count=2", f"shard.index={index}",
            "hf.num_threads=1",
        ])  # fmt: skip
        run_generation(cfg)
    merged = merge_shards(out, 2)
    rows = read_rows(merged.path)
    assert [r["id"] for r in rows] == [t["id"] for t in task_rows(8)] and merged.num_negatives == 4
    for i, (row, task) in enumerate(zip(rows, task_rows(8), strict=True)):
        prompt = [{"role": "user", "content": task["q"]}]
        if i % 2 == 0:
            prompt = [{"role": "system", "content": SYSTEM}, *prompt]
        assert row["real"] == [*prompt, {"role": "assistant", "content": task["a"]}]
        assert all(row[f"generated_{k}"][:-1] == prompt for k in range(4))

    run_dir = tmp_path / "run"
    result = run_child(script_command(
        "scripts/train_dft.py", f"run.dir={run_dir}", f"data.path={merged.path}", "data.eval_path=null",
        "data.num_epochs=2", "dft.num_negatives=2", "model.micro_batch_size=4", "model.global_batch_size=8",
        "trainer.max_steps=2", "trainer.progress_bar=false",
    ))  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
