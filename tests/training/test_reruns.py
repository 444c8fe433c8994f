"""What a new user runs into through scripts/train_dft.py: a one-step run with a checkpoint interval
longer than the run, a fine-tuning learning rate, the rerun of a finished run, and a second process
(or the record of a killed one) on the same run.dir.  One short training run is shared."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_child, subprocess_env

pytestmark = pytest.mark.slow

# One step with an interval of 1000 steps and a fine-tuning learning rate (optim.min_lr left to its default).
ARGS = ["trainer.progress_bar=false", "trainer.max_steps=1", "checkpoint.every_n_steps=1000", "optim.lr=1e-5",
        "data.num_epochs=1", "model.global_batch_size=8"]


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/train_dft.py", f"run.dir={run_dir}", *ARGS, *extra]


def summary(stdout: str) -> dict:
    return json.loads(stdout.split("DFT summary: ", 1)[1])


def checksums(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def leave_lock_of_a_killed_process(run_dir: Path) -> int:
    """Take the run.dir lock in a child process and SIGKILL it: its record stays, its flock goes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nemo_dft.training.run_lock import RunDirLock; "
         "RunDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run_dir)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert str(holder.pid) in (run_dir / ".lock").read_text()
    return holder.pid


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, int]:
    """The shared run, started over the lock record of a killed process."""
    run_dir = tmp_path_factory.mktemp("reruns") / "run"
    killed_pid = leave_lock_of_a_killed_process(run_dir)
    result = run_child(command(run_dir))
    assert result.returncode == 0, result.stderr[-6000:]
    return run_dir, result, killed_pid


def test_stale_lock_of_a_killed_process_is_taken_over(finished):
    run_dir, result, killed_pid = finished
    [warning] = [line for line in result.stderr.splitlines() if "took over" in line]
    assert f"pid {killed_pid}" in warning and "no longer exists" in warning, warning
    assert not (run_dir / ".lock").exists()  # released at the end


def test_fine_tuning_lr_trains_and_one_step_leaves_a_resumable_last_checkpoint(finished):
    from torch.distributed.checkpoint import FileSystemReader

    from nemo_dft.training.recovery import checkpoint_problem

    run_dir, result, _ = finished
    assert summary(result.stdout)["steps"] == 1
    [lr] = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 1e-6 <= lr <= 1e-5  # on the cosine from optim.lr to the derived optim.min_lr = lr / 10
    [last] = list((run_dir / "checkpoints").iterdir())
    assert last.name == "step=1-last"
    assert checkpoint_problem(last) == (None, 1)
    saved = FileSystemReader(str(last / "weights")).read_metadata().state_dict_metadata
    assert any(key.startswith("optimizer.") for key in saved), "the final checkpoint lacks the optimizer state"


def test_min_lr_above_lr_exits_2_naming_both_keys(tmp_path):
    result = subprocess.run(command(tmp_path / "run", "optim.min_lr=1e-4"), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-4000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "optim.min_lr" in line and "optim.lr=1e-05" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_rerun_of_a_finished_run_is_a_noop(finished):
    run_dir = finished[0]
    before = checksums(run_dir)
    started = time.perf_counter()
    result = subprocess.run(command(run_dir), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == f"run.dir {run_dir} finished at step 1; nothing to do"
    assert seconds < 30, seconds
    assert checksums(run_dir) == before


def test_more_training_of_a_finished_run_is_refused(finished):
    run_dir = finished[0]
    before = checksums(run_dir)
    result = subprocess.run(command(run_dir, "trainer.max_steps=2"), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-4000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "finished at step 1" in line and f"model.init_from={run_dir}/checkpoints/step=1-last" in line, line
    assert "Traceback" not in result.stderr
    assert checksums(run_dir) == before


def test_second_launch_on_a_live_run_dir_exits_2_naming_the_holder(finished, tmp_path):
    run_dir = tmp_path / "live"
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(command(run_dir), cwd=REPO, env=subprocess_env(), stdout=out, stderr=err)
    deadline = time.time() + 120
    while not (run_dir / ".lock").exists() or not (run_dir / ".lock").read_text().strip():
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.err").read_text()[-4000:]
        time.sleep(0.05)
    second = subprocess.run(command(run_dir), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert first.poll() is None, "the first run ended before the second reached the lock"
    assert second.returncode == 2, second.stderr[-4000:]
    [line] = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert f"in use by pid {first.pid} on host " in line, line
    assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()[-6000:]
    assert summary((tmp_path / "first.out").read_text())["final_loss"] == summary(finished[1].stdout)["final_loss"]
    assert not (run_dir / ".lock").exists()


def test_evaluate_on_the_run_dir_reproduces_its_heldout_rank_acc(finished, tmp_path):
    """With no settings, evaluate.py ranks against the run's dft.num_negatives as eval.jsonl does, and
    on the demo task (no "The answer is:") reports that it extracted no answer instead of accuracy 0."""
    run_dir = finished[0]
    [after] = [r for r in map(json.loads, (run_dir / "eval.jsonl").read_text().splitlines()) if r["when"] == "after"]
    heldout = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task" / "heldout.jsonl"
    out = tmp_path / "results.json"
    result = run_child([sys.executable, "scripts/evaluate.py", "--model", str(run_dir), "--data", str(heldout),
                        "--out", str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "negatives=2 (the run's dft.num_negatives" in result.stdout, result.stdout
    assert "found no answer in any of the 128 generations (n_extracted 0)" in result.stdout, result.stdout
    evaluated = json.loads(out.read_text())
    assert evaluated["rank_acc"] == pytest.approx(after["rank_acc"])
    assert evaluated["n_extracted"] == 0 and evaluated["accuracy"] is None
