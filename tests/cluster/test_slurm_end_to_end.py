"""The Slurm path end to end on CPU: slurm/dft2_mistral.sh runs real training ranks.

A stand-in ``srun`` starts one process per task with Slurm's rank variables (as srun does: no
torchrun), ignoring the container options; ``scontrol`` resolves the node list and records
requeues.  Rank 1 alone receives the time-limit signal (SIGUSR1): every rank must stop after the
same step with a checkpoint and exit 75, the batch script must requeue the job, and the requeued
job (same command) must resume and finish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DISTRIBUTED_VARIABLES, REPO, free_port

pytestmark = pytest.mark.slow

SRUN = f"""#!{sys.executable}
import os, re, subprocess, sys
args = sys.argv[1:]
options = {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
tasks = int(options["ntasks-per-node"])
assert int(options["nodes"]) == 1, "this stand-in runs one node"
children = []
for rank in range(tasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
               SLURM_NTASKS=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks))
    children.append(subprocess.Popen(args, env=env, cwd=os.environ["REPO_DIR"]))
with open(os.path.join(os.environ["STUB_DIR"], "pids"), "w") as handle:
    handle.write(" ".join(str(c.pid) for c in children))
codes = [c.wait() for c in children]
sys.exit(max(codes, key=abs))
"""

SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "${STUB_DIR}/scontrol.calls"
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; fi
"""

ARGS = ["trainer.progress_bar=false", "trainer.max_steps=10", "checkpoint.every_n_steps=2", "data.eval_path=null",
        "model.global_batch_size=8", "data.num_epochs=1"]


def job_id_for_free_port() -> int:
    """The templates take MASTER_PORT = 20000 + job id % 20000: pick a job id whose port is free."""
    while True:
        port = free_port()
        if 20000 <= port < 40000:
            return 100000 + port - 20000


def batch_env(stub: Path, job_id: int, restart: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES and not k.startswith("SLURM_")}
    python_dir = Path(sys.executable).parent
    return {
        **env,
        "PATH": f"{stub}:{python_dir}:{env['PATH']}", "STUB_DIR": str(stub), "REPO_DIR": str(REPO),
        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": "dft2-tiny",
        "SLURM_JOB_NODELIST": "node1", "SLURM_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_RESTART_COUNT": str(restart), "CONTAINER_IMAGE": "unused.sqsh", "RECIPE": "conf/dft2_tiny.yaml",
    }


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_signalled_job_checkpoints_requeues_and_resumes(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stub / name).write_text(body)
        (stub / name).chmod(0o755)
    run_dir = tmp_path / "run"
    job_id = job_id_for_free_port()
    command = ["bash", str(REPO / "slurm" / "dft2_mistral.sh"), f"run.dir={run_dir}", *ARGS]

    first = subprocess.Popen(command, cwd=tmp_path, env=batch_env(stub, job_id, 0), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not metrics(run_dir):
        assert first.poll() is None, f"the job ended before its first step:\n{first.stdout.read()[-4000:]}"
        assert time.time() < deadline, "no step was logged"
        time.sleep(0.05)
    rank1 = int((stub / "pids").read_text().split()[1])
    os.kill(rank1, signal.SIGUSR1)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-4000:]
    stopped_at = len(metrics(run_dir))
    assert stopped_at < 10, "the signal came too late to test a stop"
    assert f"requeue {job_id}" in (stub / "scontrol.calls").read_text()
    [last] = (run_dir / "checkpoints").glob("*-last")
    assert (last / "weights" / "metadata.json").exists()

    second = subprocess.run(command, cwd=tmp_path, env=batch_env(stub, job_id, 1), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 11))
    assert (stub / "scontrol.calls").read_text().count("requeue") == 1  # the finished job is not requeued
