"""scripts/real_demo.py (make real-demo) without running the pipeline: its help, stage plan and
argument checks (the pipeline itself takes about 15 minutes; its measured run is in the README)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def real_demo():
    spec = importlib.util.spec_from_file_location("real_demo_script", REPO / "scripts" / "real_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_help_plan_and_argument_checks(real_demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        real_demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "eval-before" in capsys.readouterr().out

    assert real_demo.main(["--plan", "--quick", "--out", str(tmp_path / "run"), "peft.scheme=null"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0] == f"out {tmp_path / 'run'}"
    assert json.loads(plan[2].removeprefix("sizes ")) == real_demo.asdict(real_demo.QUICK)
    assert plan[-1].split()[1:] == list(real_demo.STAGES)
    assert not (tmp_path / "run").exists()  # --plan writes nothing

    with pytest.raises(SystemExit) as exit_info:  # a training override must be key=value
        real_demo.main(["--out", str(tmp_path / "run"), "lora"])
    assert exit_info.value.code == 2
    assert "not key=value: lora" in capsys.readouterr().err

    # a directory holding a run with other settings is refused before any stage runs
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"sizes": {}, "train_args": []}))
    assert real_demo.main(["--out", str(tmp_path / "run"), "--backend", "hf"]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err
