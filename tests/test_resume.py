"""Checkpoints and resume: a SIGKILLed run resumes bit-exactly; a half-written save is skipped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_child, subprocess_env

pytestmark = pytest.mark.slow

ARGS = ["trainer.progress_bar=false", "trainer.max_steps=10", "checkpoint.every_n_steps=2", "data.eval_path=null",
        "model.global_batch_size=8", "data.num_epochs=1"]


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/train_dft.py", f"run.dir={run_dir}", *ARGS, *extra]


def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_child(command(run_dir, *extra))
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def complete_last_checkpoints(run_dir: Path) -> list[Path]:
    found = []
    for path in (run_dir / "checkpoints").glob("*-last"):
        unfinished = path.with_name(path.name + "-unfinished")
        if (path / "weights" / "metadata.json").exists() and not unfinished.exists():
            found.append(path)
    return found


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_u(run_dir: Path) -> torch.Tensor:
    [last] = complete_last_checkpoints(run_dir)
    return torch.load(last / "weights" / "common.pt", weights_only=False)["dft_u_table"]["values"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    run(run_dir)
    return run_dir


def test_killed_run_resumes_bit_exactly(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(run_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=subprocess_env())
    deadline = time.time() + 600
    while not ((run_dir / "checkpoints").exists() and complete_last_checkpoints(run_dir)):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    trained_before_kill = len(metrics(run_dir))
    assert trained_before_kill < 10, "the kill came too late to test a resume"
    run(run_dir)
    resumed, reference = metrics(run_dir), metrics(uninterrupted)
    assert [m["step"] for m in resumed] == list(range(1, 11))
    for ours, ref in zip(resumed, reference, strict=True):
        for key in ("loss", "u_mean", "weight_mean", "pos_logps", "neg_logps", "rank_acc", "lr", "grad_norm"):
            assert ours[key] == ref[key], f"step {ours['step']}: {key} {ours[key]} != {ref[key]}"
    assert torch.equal(final_u(run_dir), final_u(uninterrupted))


def test_half_written_checkpoint_is_skipped(uninterrupted, tmp_path):
    run_dir = tmp_path / "partial"
    shutil.copytree(uninterrupted, run_dir)
    [complete] = complete_last_checkpoints(run_dir)
    partial = complete.with_name("step=99-last")
    shutil.copytree(complete, partial)
    (partial / "weights" / "metadata.json").unlink()  # the save died before writing its metadata
    partial.with_name(partial.name + "-unfinished").touch()
    run(run_dir, "trainer.max_steps=12", "data.num_epochs=2")
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == list(range(1, 13))  # continued from step 10, not from scratch and not from step 99
    assert not partial.exists()
