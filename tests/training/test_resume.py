"""Checkpoints and resume: a SIGKILLed run resumes bit-exactly; a half-written save is skipped;
a signal to one rank of a data-parallel run stops every rank after the same step with a
checkpoint, and the resumed run matches the uninterrupted one.

Dropout is on, so exactness also needs the random generators restored from the checkpoint."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, kill_process_tree, run_child, script_command, subprocess_env

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


def kill_after_first_checkpoint(run_dir: Path, launch: list[str]) -> None:
    process = subprocess.Popen(launch, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=subprocess_env())
    deadline = time.time() + 600
    while not ((run_dir / "checkpoints").exists() and complete_last_checkpoints(run_dir)):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    kill_process_tree(process)
    trained_before_kill = len(metrics(run_dir))
    assert trained_before_kill < 10, "the kill came too late to test a resume"


def test_killed_run_resumes_bit_exactly(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    kill_after_first_checkpoint(run_dir, command(run_dir))
    run(run_dir)
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 11))
    assert_same_run(run_dir, uninterrupted)


PACKED_ROWS_PP2 = ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.micro_batch_size=4",
                   "data.packing=true", "data.pack_length=384", "dft.ref_free=false", "dft.reference=frozen",
                   "dft.tau=1.0", "dft.gamma=0.85"]


def test_killed_packed_pipeline_run_resumes_bit_exactly(tmp_path):
    """Rows of data.pack_length at PP = 2 with the pipelined frozen reference: the resumed run
    plans the same rows (and so the same number of micro-batches per step) and matches bit for bit."""
    def launch(run_dir: Path) -> list[str]:
        return script_command("scripts/train_dft.py", f"run.dir={run_dir}", *ARGS, *PACKED_ROWS_PP2, nproc=2)

    reference = tmp_path / "uninterrupted"
    result = run_child(launch(reference))
    assert result.returncode == 0, result.stderr[-6000:]
    run_dir = tmp_path / "killed"
    kill_after_first_checkpoint(run_dir, launch(run_dir))
    result = run_child(launch(run_dir))
    assert result.returncode == 0, result.stderr[-6000:]
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 11))
    assert_same_run(run_dir, reference)


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    resumed, reference = metrics(run_dir), metrics(reference_dir)
    assert [m["step"] for m in resumed] == [m["step"] for m in reference]
    for ours, ref in zip(resumed, reference, strict=True):
        for key in COMPARED:
            assert ours[key] == ref[key], f"step {ours['step']}: {key} {ours[key]} != {ref[key]}"
    assert torch.equal(final_u(run_dir), final_u(reference_dir))


def data_parallel_command(run_dir: Path) -> list[str]:
    return script_command("scripts/train_dft.py", f"run.dir={run_dir}", *ARGS, "trainer.devices=2", nproc=2)


# Extended tier (`make test-all`): tests/cluster/test_slurm_end_to_end.py signals rank 1 alone of a
# 2-rank run and checks that every rank stops after the same step with a checkpoint and resumes;
# test_distributed_optimizer_resume.py checks that a 2-rank resume is bit-exact.
@pytest.mark.extended
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


def start_and_wait_for_a_step(run_dir: Path, log: Path) -> subprocess.Popen:
    """Start a run (output to ``log``, which a full pipe cannot block) and wait for its first step."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command(run_dir), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=subprocess_env())
    deadline = time.time() + 600
    while not ((run_dir / "metrics.jsonl").exists() and metrics(run_dir)):
        assert process.poll() is None, "the run ended before its first step"
        assert time.time() < deadline, "no step was logged"
        time.sleep(0.05)
    return process


def test_ctrl_c_checkpoints_and_resumes_exactly(uninterrupted, tmp_path):
    """SIGINT (Ctrl-C) by default: finish the step, checkpoint, exit 75 with a line saying how to
    resume; the resumed run equals the uninterrupted one."""
    run_dir = tmp_path / "interrupted"
    process = start_and_wait_for_a_step(run_dir, tmp_path / "log")
    process.send_signal(signal.SIGINT)
    process.wait(timeout=600)
    stderr = (tmp_path / "log").read_text()
    assert process.returncode == 75, stderr[-4000:]
    assert "run again with the same run.dir to resume" in stderr
    stopped_at = len(metrics(run_dir))
    assert stopped_at < 10, "the signal came too late to test a stop"
    [last] = complete_last_checkpoints(run_dir)
    assert torch.load(last / "weights" / "common.pt", weights_only=False)["global_step"] == stopped_at
    assert last.name == f"step={stopped_at}-last" and f"after step {stopped_at} " in stderr
    run(run_dir)
    assert_same_run(run_dir, uninterrupted)


def test_second_ctrl_c_exits_at_once(tmp_path):
    process = start_and_wait_for_a_step(tmp_path / "twice", tmp_path / "log")
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    stderr = (tmp_path / "log").read_text()
    assert process.returncode == 130, stderr[-4000:]
    assert "second SIGINT" in stderr


def checkpoints_by_step(run_dir: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for path in (run_dir / "checkpoints").iterdir():
        if path.is_dir():
            step = torch.load(path / "weights" / "common.pt", weights_only=False)["global_step"]
            found.setdefault(step, []).append(path)
    return found


def damage_checkpoint(checkpoint: Path, damage: str) -> str | None:
    """Damage ``checkpoint`` as a save that died (or a disk) would; the file that the warning names."""
    if damage == "truncated_distcp":
        shard = sorted((checkpoint / "weights").glob("*.distcp"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return shard.name
    if damage == "missing_common":
        (checkpoint / "weights" / "common.pt").unlink()
        return "common.pt"
    if damage == "unfinished":
        checkpoint.with_name(checkpoint.name + "-unfinished").touch()
        return "unfinished"
    if damage == "half_written":  # the save died before writing its metadata
        (checkpoint / "weights" / "metadata.json").unlink()
        checkpoint.with_name(checkpoint.name + "-unfinished").touch()
        return "unfinished"
    assert damage == "deleted"
    shutil.rmtree(checkpoint)
    return None


@pytest.mark.parametrize("damage", ["truncated_distcp", "missing_common", "unfinished", "half_written", "deleted"])
def test_damaged_latest_checkpoint_is_named_moved_aside_and_passed_over(uninterrupted, tmp_path, damage, capsys):
    """The newest checkpoints (step 10) damaged: the choice of a rerun names the damaged file in one
    line, moves the checkpoint to run.dir/damaged/ and takes step 8.  (In this process; that a rerun
    then ends exactly like the uninterrupted run, past every kind of damage at once, is
    test_run_resumes_past_damaged_checkpoints_exactly.)"""
    from nemo_dft.training.recovery import choose_resume_checkpoint

    run_dir = tmp_path / damage
    shutil.copytree(uninterrupted, run_dir)
    by_step = checkpoints_by_step(run_dir)
    assert sorted(by_step) == [8, 10]
    [last] = [p for p in by_step[10] if p.name.endswith("-last")]
    for other in by_step[10]:
        if other != last:
            shutil.rmtree(other)
    named = damage_checkpoint(last, damage)
    [step8] = by_step[8]
    assert choose_resume_checkpoint(run_dir) == step8
    lines = [x for x in capsys.readouterr().out.splitlines() if "cannot be resumed from" in x]
    if named:
        [line] = lines
        assert named in line and last.name in line and f"resuming from {step8.name} (step 8)" in line, line
        assert (run_dir / "damaged" / last.name).exists() and not last.exists()  # moved aside, not deleted
        assert not last.with_name(last.name + "-unfinished").exists()
    else:
        assert lines == []


def test_run_resumes_past_damaged_checkpoints_exactly(uninterrupted, tmp_path):
    """Every kind of damage at once, on checkpoints newer than step 8 (a truncated shard, a missing
    common.pt, an -unfinished marker, and a save that died before its metadata, at step 99): the
    rerun names each in one line, moves it aside, continues from step 8 (not from scratch, not from
    step 99) and ends exactly like the uninterrupted run, with one step sequence in metrics.jsonl."""
    run_dir = tmp_path / "damaged_run"
    shutil.copytree(uninterrupted, run_dir)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=10", "step=10-last", "step=8"]
    # two more complete copies of step 10's save, to damage as the newest ones
    for name in ("step=12-last", "step=99-last"):
        shutil.copytree(checkpoints / "step=10-last", checkpoints / name)
    damages = {"step=10-last": "truncated_distcp", "step=10": "missing_common", "step=12-last": "unfinished",
               "step=99-last": "half_written"}
    named = {name: damage_checkpoint(checkpoints / name, damage) for name, damage in damages.items()}
    result = run(run_dir)
    lines = [x for x in result.stdout.splitlines() if "cannot be resumed from" in x]
    assert len(lines) == len(damages), lines
    for name, what in named.items():
        [line] = [x for x in lines if f"checkpoints/{name} cannot" in x]
        assert what in line and "resuming from step=8 (step 8)" in line, line
        assert (run_dir / "damaged" / name).exists()  # moved aside, not deleted
    assert not (checkpoints / "step=12-last").exists() and not (checkpoints / "step=99-last").exists()
    assert "Traceback" not in result.stderr
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 11))
    assert_same_run(run_dir, uninterrupted)


def test_history_without_a_usable_checkpoint_is_refused(uninterrupted, tmp_path):
    run_dir = tmp_path / "no_checkpoint"
    shutil.copytree(uninterrupted, run_dir)
    for path in (run_dir / "checkpoints").iterdir():
        (path / "weights" / "common.pt").unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_child(command(run_dir))
    assert result.returncode == 2, result.stderr[-4000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "no checkpoint to resume from" in line and "new run.dir" in line, line
    assert "Traceback" not in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
