"""What `make demo` shows a user: a few lines of settings, the progress bar, the summary; the
libraries' messages in the run directory, and nothing written to the directory it ran from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow

MAX_LINES = 30


def printed_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar redraws one line with carriage returns."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")[:-1]]


def test_demo_command_is_quiet_and_writes_only_under_run_dir(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # `make demo`'s command (default config), fewer steps: the line count does not depend on them.
    command = [sys.executable, str(REPO / "scripts" / "train_dft.py"), "run.dir=run", "trainer.max_steps=2"]
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    lines = printed_lines(result.stdout) + printed_lines(result.stderr)
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    summary = json.loads(result.stdout.split("DFT summary: ", 1)[1])
    assert summary["steps"] == 2 and result.stdout.rstrip().endswith("}")
    metrics = [json.loads(line) for line in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
    # what the console left out is kept in the run's log file
    kept = (cwd / "run" / "logs" / "console" / "rank0.log").read_text()
    assert "has data parallel group" in kept and "Params for bucket" in kept
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]  # nothing in the directory it ran from
    for record in metrics:  # throughput: padding is processed too; no known peak on CPU
        assert record["processed_tokens_per_s"] >= record["tokens_per_s"] > 0
        assert record["tflops_per_device"] > 0 and record["mfu"] is None
    # TensorBoard (on by default): the same scalars as metrics.jsonl, in run.dir/tensorboard/
    scalars = tensorboard_scalars(cwd / "run" / "tensorboard")
    assert [e.step for e in scalars["train/loss"]] == [r["step"] for r in metrics]
    assert [e.value for e in scalars["train/loss"]] == pytest.approx([r["loss"] for r in metrics])
    assert [e.step for e in scalars["heldout/rank_acc"]] == [0, 2]
    assert scalars["heldout/rank_acc"][-1].value == pytest.approx(summary["heldout_rank_acc_after"])
    # the curves of a real run (held-out accuracy from its TensorBoard scalars)
    plot = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_metrics.py"), "run"], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0, plot.stderr
    assert (cwd / "run" / "metrics.png").stat().st_size > 0


def tensorboard_scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(log_dir.glob("events.out.tfevents.*")), f"no event file in {log_dir}"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_wandb_offline_writes_under_run_dir(tmp_path):
    # wandb is in the dev extras: not skipped when absent
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    command = [sys.executable, str(REPO / "scripts" / "train_dft.py"), "run.dir=run", "trainer.max_steps=2",
               "data.eval_path=null", "log.tensorboard=false", "log.wandb_project=nemo-dft-test",
               "log.wandb_mode=offline", "trainer.progress_bar=false"]
    env = {**subprocess_env(), "WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}  # no network
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    [offline] = (cwd / "run" / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))
    metrics = [json.loads(line) for line in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
    # the run's transaction log (protobuf records) holds every logged loss, as JSON text
    log = next(offline.glob("*.wandb")).read_bytes()
    assert b"train/loss" in log and b"train/tflops_per_device" in log
    for record in metrics:
        assert json.dumps(record["loss"]).encode() in log
    assert not (cwd / "run" / "tensorboard").exists()
