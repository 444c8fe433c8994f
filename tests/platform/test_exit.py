"""exit_after_cleanup: a finished command keeps everything the interpreter's exit does for it
(atexit handlers, non-daemon threads, logging, buffered stdout, its exit code) and skips only
the teardown of its modules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

CHILD = textwrap.dedent("""
    import atexit, logging, sys, threading, time
    from pathlib import Path

    out = Path(sys.argv[1])
    if sys.argv[2] == "vllm":
        sys.modules["vllm"] = type(sys)("vllm")  # stands for a loaded vLLM

    class WrittenAtTeardown:  # alive until the interpreter clears this module
        def __del__(self):
            (out / "teardown").write_text("ran")

    keeper = WrittenAtTeardown()
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("ran"))).start()
    handler = logging.FileHandler(out / "log.txt")
    logging.getLogger().addHandler(handler)
    logging.getLogger().warning("logged")
    print("printed without a flush")

    from nemo_dft.platform.exit import exit_after_cleanup

    exit_after_cleanup(3)
""")


def _run(tmp_path: Path, mode: str = "plain", **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    environment = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **env}
    return subprocess.run([sys.executable, str(script), str(tmp_path), mode], capture_output=True, text=True,
                          env=environment, timeout=120)


def _assert_cleanup_ran(tmp_path: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 3, result.stderr
    assert result.stdout == "printed without a flush\n"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "ran"  # the non-daemon thread was waited for
    assert (tmp_path / "log.txt").read_text() == "logged\n"


def test_cleanup_runs_and_the_module_teardown_is_skipped(tmp_path: Path) -> None:
    result = _run(tmp_path)
    _assert_cleanup_ran(tmp_path, result)
    assert not (tmp_path / "teardown").exists()


@pytest.mark.parametrize("mode,env", [("plain", {"NEMO_DFT_FULL_EXIT": "1"}), ("vllm", {})])
def test_full_exit_when_asked_or_when_vllm_is_loaded(tmp_path: Path, mode: str, env: dict[str, str]) -> None:
    result = _run(tmp_path, mode, **env)
    _assert_cleanup_ran(tmp_path, result)
    assert (tmp_path / "teardown").read_text() == "ran"
