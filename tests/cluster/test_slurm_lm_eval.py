"""slurm/lm_eval.sh: lint, and the srun line it builds under a stand-in srun (no Slurm needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .test_slurm import collect, job_env, sbatch_headers, split_srun, stub_dir  # noqa: F401  (fixture)
from .tools import REPO, bash_syntax_and_shellcheck

TEMPLATE = REPO / "slurm" / "lm_eval.sh"


def run(stub: Path, *args: str, **env: str):
    proc = subprocess.run(["bash", str(TEMPLATE), *args], cwd=stub, capture_output=True, text=True, timeout=60,
                          env=job_env(stub, SLURM_JOB_NAME="dft-lm-eval", **env))
    return collect(stub, proc.returncode, proc.stdout + proc.stderr)


def test_bash_syntax_and_shellcheck() -> None:
    bash_syntax_and_shellcheck(TEMPLATE)


def test_sbatch_headers() -> None:
    headers = sbatch_headers(TEMPLATE)
    assert headers["--nodes"] == "1" and headers["--gpus-per-node"] == "1"
    assert headers["--output"].startswith("slurm-logs/")


def test_srun_runs_lm_eval_in_the_training_container(stub_dir: Path) -> None:  # noqa: F811
    result = run(stub_dir, "/runs/dft-mistral/hf", "limit=5", "model=vllm")
    assert result.returncode == 0, result.output
    options, command = split_srun(result.srun_argv)
    assert options["--container-image"] == "/images/nemo_dft.sqsh"
    assert options["--container-workdir"] == "/opt/nemo_dft"
    assert "/site/runs:/runs" in options["--container-mounts"]
    assert command[-8:] == ["python", "scripts/lm_eval.py", "--config", "conf/lm_eval_paper.yaml",
                            "--model", "/runs/dft-mistral/hf", "limit=5", "model=vllm"]
    assert result.srun_env["SETUP"] == "pip install --quiet lm-eval==0.4.13"


def test_setup_and_config_come_from_the_environment(stub_dir: Path) -> None:  # noqa: F811
    result = run(stub_dir, "/runs/x/hf", SETUP="", LM_EVAL_CONFIG="conf/other.yaml")
    assert result.returncode == 0, result.output
    assert result.srun_env["SETUP"] == ""
    assert "conf/other.yaml" in result.srun_argv


def test_missing_model_dir_is_a_usage_error(stub_dir: Path) -> None:  # noqa: F811
    result = run(stub_dir)
    assert result.returncode != 0 and "usage: sbatch slurm/lm_eval.sh HF_DIR" in result.output
    assert result.srun_argv == []
