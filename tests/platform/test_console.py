"""The console policy: what reaches the terminal, what only the run's log file, and that the
scripts' --help and --print-config answer without importing NeMo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, subprocess_env

HEAVY = ("nemo", "megatron", "lightning", "pytorch_lightning")

PROBE = textwrap.dedent("""
    import json, runpy, sys
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit:
        code = exit.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    print("MODULES " + json.dumps({"heavy": heavy, "code": code}))
""")


def probe(script: str, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    code = PROBE.replace("HEAVY", repr(HEAVY))
    # the interpreter's own exit, so that the script's end comes back here (nemo_dft/platform/exit.py)
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts" / script), *args], cwd=REPO,
                            env={**subprocess_env(), "NEMO_DFT_FULL_EXIT": "1"}, capture_output=True, text=True,
                            timeout=300)
    [line] = [x for x in result.stdout.splitlines() if x.startswith("MODULES ")]
    return json.loads(line.removeprefix("MODULES ")), result


@pytest.mark.parametrize("script", ["train_dft.py", "precompute_ref_logps.py"])
@pytest.mark.parametrize("flag", ["--help", "--print-config"])
def test_help_and_print_config_do_not_import_nemo(script, flag):
    args = [flag] + (["model.init_from=/nonexistent"] if script.startswith("precompute") else [])
    state, result = probe(script, *args)
    if script.startswith("precompute") and flag == "--print-config":
        # the config check (checkpoint must be set, data must exist) runs first: still no NeMo
        assert state["code"] in (0, 2)
    else:
        assert state["code"] == 0, result.stderr
    assert state["heavy"] == [], f"{script} {flag} imported {state['heavy']}"
    if flag == "--print-config" and state["code"] == 0:
        assert result.stderr == "", result.stderr  # library warnings (pynvml, ...) are not printed
        assert "run:" in result.stdout


CHILD = textwrap.dedent("""
    import logging, sys, warnings
    from nemo_dft.platform import console
    console.configure(None, verbose={verbose})
    warnings.warn("The pynvml package is deprecated. Please install nvidia-ml-py", FutureWarning)
    console.configure(sys.argv[1], verbose={verbose})
    logging.getLogger("megatron.core.utils").info("Params for bucket 1")
    logging.getLogger("megatron.core.utils").warning("fused_indices_to_multihot has reached end of life")
    logging.getLogger("lightning.pytorch.trainer").warning("a warning that matters")
    logging.getLogger("nemo_logger").info("megatron_init: Rank 0 has data parallel group")
    logging.getLogger("nemo_dft.training.train").info("DFT: 3 steps")
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_console_shows_what_matters_and_the_file_keeps_everything(tmp_path, verbose):
    env = subprocess_env()
    env.pop("PYTHONWARNINGS", None)  # an in-process run of a script earlier in the session sets it for children
    result = subprocess.run([sys.executable, "-c", CHILD.format(verbose=verbose), str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kept = (tmp_path / "logs" / "console" / "rank0.log").read_text()
    every = ["pynvml package is deprecated", "Params for bucket", "reached end of life", "a warning that matters",
             "megatron_init", "DFT: 3 steps"]
    for text in every:
        assert text in kept, text
    shown = [text for text in every if text in result.stderr]
    if verbose:
        assert shown == every
    else:
        assert shown == ["a warning that matters", "DFT: 3 steps"]


def test_other_ranks_print_only_errors():
    import logging

    from nemo_dft.platform.console import ConsoleFilter

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "a message", None, None)

    rank1 = ConsoleFilter(verbose=False, rank=1)
    assert not rank1.filter(record("nemo_dft.training", logging.WARNING))
    assert rank1.filter(record("megatron.core", logging.ERROR))
    assert ConsoleFilter(verbose=False, rank=0).filter(record("nemo_dft.training", logging.INFO))
