"""The sbatch templates in slurm/, run with bash under the environment sbatch would give them, with
stand-in srun and scontrol that record their arguments and environment and exit as a test chooses.
No Slurm, container runtime or GPU is needed."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .tools import REPO, bash_syntax_and_shellcheck

EXIT_PREEMPTED = 75  # the training script's "checkpoint saved, resume me"


@dataclass(frozen=True)
class Template:
    path: Path
    script: str  # the Python script each task runs
    recipe: str  # default --config
    fixed: tuple[str, ...]  # overrides the template adds before the user's (apart from the layout)


TEMPLATES = {
    "dft_mistral": Template(REPO / "slurm/dft_mistral.sh", "scripts/train_dft.py", "conf/dft_mistral.yaml",
                            ("run.dir=/runs/dft-mistral",)),
    "dft2_mistral": Template(REPO / "slurm/dft2_mistral.sh", "scripts/train_dft.py", "conf/dft2_mistral.yaml",
                             ("run.dir=/runs/dft2-mistral",)),
    "dft_mistral_lora": Template(REPO / "slurm/dft_mistral_lora.sh", "scripts/train_dft.py",
                                 "conf/dft_mistral_lora.yaml", ("run.dir=/runs/dft-mistral-lora",)),
    "precompute_ref": Template(REPO / "slurm/precompute_ref.sh", "scripts/precompute_ref_logps.py",
                               "conf/dft_mistral.yaml", ("output=/runs/ref-logps/dft-mistral.parquet",)),
}  # fmt: skip
SHELL_FILES = [t.path for t in TEMPLATES.values()] + [REPO / "slurm/lib/launch.sh", REPO / "slurm/site.sh"]
IMAGE_WORKDIR = "/opt/nemo_dft"  # WORKDIR of the training image (Dockerfile)

# srun: records its arguments (NUL-separated) and environment, then exits with $SRUN_EXIT; with
# $SRUN_WAIT_FOR it first announces itself and waits (at most 30 s) for that file to appear.
SRUN = r"""#!/usr/bin/env bash
n=$(find "$STUB_DIR" -maxdepth 1 -name 'srun.*.args' | wc -l)
printf '%s\0' "$@" > "$STUB_DIR/srun.$n.args"
env -0 > "$STUB_DIR/srun.$n.env"
if [[ -n "${SRUN_WAIT_FOR:-}" ]]; then
    touch "$STUB_DIR/srun.started"
    for _ in $(seq 300); do [[ -e "$SRUN_WAIT_FOR" ]] && break; sleep 0.1; done
fi
exit "${SRUN_EXIT:-0}"
"""
# scontrol: `show hostnames LIST` prints $FAKE_HOSTS one per line; every call is recorded as a line;
# `requeue` exits with $REQUEUE_EXIT.
SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol.calls"
if [[ "$1 $2" == "show hostnames" ]]; then
    for h in $FAKE_HOSTS; do echo "$h"; done
    exit 0
fi
if [[ "$1" == "requeue" ]]; then exit "${REQUEUE_EXIT:-0}"; fi
exit 0
"""
HOSTS = ["gpu017", "gpu018"]


@dataclass
class Run:
    returncode: int
    output: str
    srun_argv: list[str]
    srun_env: dict[str, str]
    scontrol_calls: list[str]


@pytest.fixture
def stub_dir(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def job_env(stub_dir: Path, **extra: str) -> dict[str, str]:
    """What sbatch gives the batch script of a 2-node job with 8 tasks per node (and nothing else)."""
    env = {
        "PATH": f"{stub_dir / 'bin'}:/usr/bin:/bin",
        "HOME": str(stub_dir),
        "USER": "alice",
        "STUB_DIR": str(stub_dir),
        "FAKE_HOSTS": " ".join(HOSTS),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOBID": "4242",
        "SLURM_JOB_NAME": "dft-mistral",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_NODELIST": "gpu[017-018]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "16",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_GPUS_PER_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_RESTART_COUNT": "0",
        "CONTAINER_IMAGE": "/images/nemo_dft.sqsh",
        "SITE_ROOT": "/site",
    }
    env.update(extra)
    return env


def collect(stub_dir: Path, returncode: int, output: str) -> Run:
    runs = sorted(stub_dir.glob("srun.*.args"), key=lambda path: int(path.name.split(".")[1]))
    argv = runs[-1].read_text().split("\0")[:-1] if runs else []
    env_file = runs[-1].with_suffix(".env") if runs else None
    env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item) if env_file else {}
    calls_file = stub_dir / "scontrol.calls"
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    return Run(returncode, output, argv, env, calls)


def run_template(name: str, stub_dir: Path, args: Sequence[str] = (), srun_exit: int = 0, **env: str) -> Run:
    proc = subprocess.run(["bash", str(TEMPLATES[name].path), *args], cwd=stub_dir, capture_output=True, text=True,
                          timeout=60, env=job_env(stub_dir, SRUN_EXIT=str(srun_exit), **env))  # fmt: skip
    return collect(stub_dir, proc.returncode, proc.stdout + proc.stderr)


def split_srun(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """srun's own options (--key=value) and the command after them."""
    options = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            return options, argv[i:]
        key, _, value = arg.partition("=")
        options[key] = value
    return options, []


def sbatch_headers(path: Path) -> dict[str, str]:
    headers = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#SBATCH\s+(--[\w-]+)(?:=(\S+))?", line)
        if match:
            headers[match.group(1)] = match.group(2) or ""
    return headers


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(path: Path) -> None:
    bash_syntax_and_shellcheck(path)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_sbatch_headers(name: str) -> None:
    """One task per GPU, requeue, a warning signal before the time limit, one log file per job."""
    headers = sbatch_headers(TEMPLATES[name].path)
    assert headers["--ntasks-per-node"] == headers["--gpus-per-node"] == "8"
    assert "--requeue" in headers
    signal_name, _, seconds = headers["--signal"].partition("@")
    assert signal_name == "USR1" and 120 <= int(seconds) <= 1800
    assert "%j" in headers["--output"] and headers["--open-mode"] == "append"
    assert int(headers["--nodes"]) >= 1 and headers["--time"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_srun_launch(name: str, stub_dir: Path) -> None:
    template = TEMPLATES[name]
    user = ["optim.lr=1e-6", "run.seed=7", "tokenizer.chat_template={{ messages[0]['content'] }}"]
    run = run_template(name, stub_dir, user)
    assert run.returncode == 0, run.output
    options, command = split_srun(run.srun_argv)
    assert options["--container-image"] == "/images/nemo_dft.sqsh"
    assert options["--container-mounts"] == "/site/data:/data,/site/checkpoints:/checkpoints,/site/runs:/runs"
    assert options["--container-workdir"] == IMAGE_WORKDIR
    assert options["--nodes"] == "2" and options["--ntasks-per-node"] == "8"
    assert command == ["python", template.script, "--config", template.recipe, *template.fixed,
                       "trainer.devices=8", "trainer.num_nodes=2", *user]  # fmt: skip
    assert (REPO / template.recipe).is_file()
    assert run.srun_env["MASTER_ADDR"] == HOSTS[0]
    assert 1024 <= int(run.srun_env["MASTER_PORT"]) <= 65535
    assert not any(call.startswith("requeue") for call in run.scontrol_calls)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_layout_follows_the_allocation(name: str, stub_dir: Path) -> None:
    """sbatch --nodes=4 --ntasks-per-node=4: four tasks on each of four nodes, and the config says so."""
    run = run_template(name, stub_dir, SLURM_JOB_NUM_NODES="4", SLURM_NNODES="4", SLURM_NTASKS_PER_NODE="4",
                       SLURM_NTASKS="16", SLURM_JOB_NODELIST="n[1-4]", FAKE_HOSTS="n1 n2 n3 n4")  # fmt: skip
    options, command = split_srun(run.srun_argv)
    assert options["--nodes"] == "4" and options["--ntasks-per-node"] == "4"
    assert command[-2:] == ["trainer.devices=4", "trainer.num_nodes=4"]
    assert run.srun_env["MASTER_ADDR"] == "n1"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_site_settings_come_from_the_environment(name: str, stub_dir: Path) -> None:
    run = run_template(name, stub_dir, CONTAINER_MOUNTS="/a:/data,/b:/runs", CODE_DIR="/src", RECIPE="conf/x.yaml")
    options, command = split_srun(run.srun_argv)
    assert options["--container-mounts"] == "/a:/data,/b:/runs"
    assert options["--container-workdir"] == "/src"
    assert command[2:4] == ["--config", "conf/x.yaml"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_preempted_run_requeues_the_job(name: str, stub_dir: Path) -> None:
    run = run_template(name, stub_dir, ["optim.lr=1e-6"], srun_exit=EXIT_PREEMPTED)
    assert run.returncode == 0, run.output
    assert run.scontrol_calls[-1] == "requeue 4242"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_requeued_job_resumes_the_same_run(name: str, stub_dir: Path) -> None:
    """The second start of the job (same id, same arguments) runs the same command on the same port."""
    first = run_template(name, stub_dir, ["optim.lr=1e-6"], srun_exit=EXIT_PREEMPTED)
    second = run_template(name, stub_dir, ["optim.lr=1e-6"], SLURM_RESTART_COUNT="1")
    assert second.returncode == 0, second.output
    assert first.srun_argv == second.srun_argv
    assert first.srun_env["MASTER_PORT"] == second.srun_env["MASTER_PORT"]
    assert [c for c in second.scontrol_calls if c.startswith("requeue")] == ["requeue 4242"]  # only the first


def test_port_differs_between_jobs(stub_dir: Path) -> None:
    ports = set()
    for job in ("4242", "4243"):
        ports.add(run_template("dft_mistral", stub_dir, SLURM_JOB_ID=job, SLURM_JOBID=job).srun_env["MASTER_PORT"])
    assert len(ports) == 2


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("code", [1, 2, 137])
def test_failure_is_not_requeued(name: str, stub_dir: Path, code: int) -> None:
    run = run_template(name, stub_dir, srun_exit=code)
    assert run.returncode == code
    assert not any(call.startswith("requeue") for call in run.scontrol_calls)


def test_failed_requeue_is_reported(stub_dir: Path) -> None:
    run = run_template("dft_mistral", stub_dir, srun_exit=EXIT_PREEMPTED, REQUEUE_EXIT="1")
    assert run.returncode != 0
    assert "requeue" in run.output


def test_sigterm_to_the_batch_shell_waits_for_the_tasks(stub_dir: Path) -> None:
    """Slurm signals the batch shell too on preemption; it must outlive srun to requeue the job."""
    release = stub_dir / "release"
    env = job_env(stub_dir, SRUN_EXIT=str(EXIT_PREEMPTED), SRUN_WAIT_FOR=str(release))
    proc = subprocess.Popen(["bash", str(TEMPLATES["dft_mistral"].path)], cwd=stub_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (stub_dir / "srun.started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "srun was not started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the batch shell died on SIGTERM before srun returned"
        release.touch()
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert collect(stub_dir, 0, "").scontrol_calls[-1] == "requeue 4242"


@pytest.mark.parametrize("name", ["dft_mistral", "dft2_mistral", "dft_mistral_lora"])
def test_recipe_paths_lie_in_the_mounts(name: str, stub_dir: Path) -> None:
    """The recipe's container paths are under the template's default mount points."""
    run = run_template(name, stub_dir)
    options, command = split_srun(run.srun_argv)
    targets = [pair.split(":")[1] for pair in options["--container-mounts"].split(",")]
    recipe = OmegaConf.load(REPO / TEMPLATES[name].recipe)
    run_dir = next(arg.split("=", 1)[1] for arg in command if arg.startswith("run.dir="))
    for path in (recipe.data.path, recipe.model.init_from, recipe.tokenizer.path, run_dir):
        assert any(path.startswith(target + "/") for target in targets), f"{path} is outside {targets}"


def test_templates_run_in_the_training_image_workdir() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(IMAGE_WORKDIR)}$", dockerfile, re.MULTILINE)
