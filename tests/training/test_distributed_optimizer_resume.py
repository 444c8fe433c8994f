"""The distributed optimizer's sharded state survives a crash: a SIGKILLed DP = 2 run resumes
bit-exactly, and its checkpoint (saved fully reshardable) also continues at DP = 1.

Dropout is off here so that the DP = 1 continuation, which cannot take the DP = 2 ranks' random
generators, computes the same losses as the DP = 2 one."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, kill_process_tree, run_child, script_command, subprocess_env
from tests.training.test_resume import COMPARED, complete_last_checkpoints, final_u, metrics

pytestmark = pytest.mark.slow

STEPS = 6
ARGS = ["trainer.progress_bar=false", f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=2",
        "data.eval_path=null", "model.global_batch_size=8", "data.num_epochs=1", "dft.ref_free=true",
        "model.use_distributed_optimizer=true"]


def command(run_dir: Path, devices: int) -> list[str]:
    return script_command("scripts/train_dft.py", f"run.dir={run_dir}", *ARGS, f"trainer.devices={devices}",
                          nproc=devices)


def run(run_dir: Path, devices: int) -> None:
    result = run_child(command(run_dir, devices))
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.fixture(scope="module")
def killed_and_uninterrupted(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("distopt")
    uninterrupted = root / "uninterrupted"
    run(uninterrupted, 2)
    killed = root / "killed"
    process = subprocess.Popen(command(killed, 2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=subprocess_env())
    deadline = time.time() + 600
    while not ((killed / "checkpoints").exists() and complete_last_checkpoints(killed)):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    kill_process_tree(process)
    assert len(metrics(killed)) < STEPS, "the kill came too late to test a resume"
    at_dp1 = root / "killed_dp1"
    shutil.copytree(killed, at_dp1)
    return killed, uninterrupted, at_dp1


def test_killed_dp2_run_resumes_bit_exactly(killed_and_uninterrupted):
    killed, uninterrupted, _ = killed_and_uninterrupted
    run(killed, 2)
    resumed, reference = metrics(killed), metrics(uninterrupted)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for ours, ref in zip(resumed, reference, strict=True):
        for key in COMPARED:
            assert ours[key] == ref[key], f"step {ours['step']}: {key} {ours[key]} != {ref[key]}"
    assert torch.equal(final_u(killed), final_u(uninterrupted))


def test_dp2_checkpoint_continues_at_dp1(killed_and_uninterrupted):
    _, uninterrupted, at_dp1 = killed_and_uninterrupted
    [checkpoint] = complete_last_checkpoints(at_dp1)
    saved_step = torch.load(checkpoint / "weights" / "common.pt", weights_only=False)["global_step"]
    run(at_dp1, 1)
    continued = {m["step"]: m for m in metrics(at_dp1)}
    reference = {m["step"]: m for m in metrics(uninterrupted)}
    assert sorted(continued) == list(range(1, STEPS + 1))
    for step in range(saved_step + 1, STEPS + 1):
        for key in ("loss", "u_mean", "pos_logps", "neg_logps", "grad_norm"):
            torch.testing.assert_close(continued[step][key], reference[step][key], rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: {key}")
