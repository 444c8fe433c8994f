"""Checkpoints and resume: a SIGKILLed run resumes bit-exactly; a half-written save is skipped;
a signal to one rank of a data-parallel run stops every rank after the same step with a
checkpoint, and the resumed run matches the uninterrupted one.

Dropout is on, so exactness also needs the random generators restored from the checkpoint."""

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

from tests.conftest import REPO, run_child, script_command, subprocess_env

pytestmark = pytest.mark.slow

ARGS = ["trainer.progress_bar=false", "trainer.max_steps=10", "checkpoint.every_n_steps=2", "data.eval_path=null",
        "model.global_batch_size=8", "data.num_epochs=1", "model.config.hidden_dropout=0.1",
        "model.config.attention_dropout=0.1"]
COMPARED = ("loss", "u_mean", "weight_mean", "pos_logps", "neg_logps", "rank_acc", "lr", "grad_norm")


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
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 11))
    assert_same_run(run_dir, uninterrupted)


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    resumed, reference = metrics(run_dir), metrics(reference_dir)
    assert [m["step"] for m in resumed] == [m["step"] for m in reference]
    for ours, ref in zip(resumed, reference, strict=True):
        for key in COMPARED:
            assert ours[key] == ref[key], f"step {ours['step']}: {key} {ours[key]} != {ref[key]}"
    assert torch.equal(final_u(run_dir), final_u(reference_dir))


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


def data_parallel_command(run_dir: Path) -> list[str]:
    return script_command("scripts/train_dft.py", f"run.dir={run_dir}", *ARGS, "trainer.devices=2", nproc=2)


def test_signal_to_one_rank_stops_all_ranks_with_a_checkpoint(tmp_path):
    """SIGUSR1 to data-parallel rank 1 only: both ranks stop after the same step and save; the rerun
    continues exactly like an uninterrupted 2-rank run."""
    import psutil

    uninterrupted_dp = tmp_path / "uninterrupted"
    result = run_child(data_parallel_command(uninterrupted_dp))
    assert result.returncode == 0, result.stderr[-6000:]

    run_dir = tmp_path / "signalled"
    process = subprocess.Popen(data_parallel_command(run_dir), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True, env=subprocess_env())
    deadline = time.time() + 600
    while not ((run_dir / "metrics.jsonl").exists() and metrics(run_dir)):
        assert process.poll() is None, "the run ended before its first step"
        assert time.time() < deadline, "no step was logged"
        time.sleep(0.05)
    workers = psutil.Process(process.pid).children()
    rank1 = [w for w in workers if "LOCAL_RANK" in w.environ() and w.environ()["LOCAL_RANK"] == "1"]
    assert len(rank1) == 1, [w.environ().get("LOCAL_RANK") for w in workers]
    rank1[0].send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=600)
    stopped_at = len(metrics(run_dir))
    assert stopped_at < 10, "the signal came too late to test a stop"
    # torchrun reports the workers' code 75 ("preempted, checkpoint saved") as a failure of its own
    assert process.returncode != 0 and "exitcode  : 75" in output, output[-4000:]
    [last] = complete_last_checkpoints(run_dir)
    assert torch.load(last / "weights" / "common.pt", weights_only=False)["global_step"] == stopped_at

    result = run_child(data_parallel_command(run_dir))
    assert result.returncode == 0, result.stderr[-6000:]
    assert_same_run(run_dir, uninterrupted_dp)
