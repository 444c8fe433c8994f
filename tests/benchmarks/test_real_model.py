"""benchmarks/real_model.py without running it (its run takes about an hour; the measured one is in
benchmarks/results/real_model/): the protocol the issue fixed, the plan, the refusal of a directory
holding another protocol, and the report's table from a results record."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def real_model():
    spec = importlib.util.spec_from_file_location("real_model_benchmark", REPO / "benchmarks" / "real_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_protocol_is_the_issues(real_model):
    p = real_model.Protocol()
    assert (p.finetune, p.validation, p.heldout, p.num_negatives, p.epochs) == (128, 64, 200, 2, 1)
    assert len(p.lr_grid) == 3 and p.steps == 128 // p.batch
    assert set(real_model.METHODS) == {"sft", "dft", "dft2"}
    assert "dft.reference=frozen" in real_model.METHODS["dft"]


def test_plan_and_a_directory_of_another_protocol(real_model, tmp_path, capsys):
    assert real_model.main(["--plan", "--out", str(tmp_path / "run")]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0] == f"out {tmp_path / 'run'}"
    assert plan[-1].split()[1:] == [f"{m}-lr{lr:g}" for m in ("sft", "dft", "dft2") for lr in (3e-4, 1e-3, 3e-3)]
    assert not (tmp_path / "run").exists()  # --plan writes nothing

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "protocol.json").write_text(json.dumps({"finetune": 1}))
    assert real_model.main(["--out", str(tmp_path / "run")]) == 2
    assert "holds a run of another protocol" in capsys.readouterr().err


def test_report_lists_every_method_rate_and_share(real_model):
    p = real_model.Protocol()
    grid = {f"{lr:g}": 0.1 * i for i, lr in enumerate(p.lr_grid)}
    methods = {name: {"lr": 1e-3, "heldout_accuracy": 0.25 + i / 10, "rank_acc": 0.5, "format_share": 1.0,
                      "mean_pos_logp_per_token": -0.5, "validation_accuracy": grid}
               for i, name in enumerate(real_model.METHODS)}
    results = {"model": "M", "seeds": [0], "threads": 2, "seconds": 3600.0,
               "protocol": {**real_model.asdict(p), "steps": p.steps, "generation": "hf"},
               "base": {"heldout_accuracy": 0.16, "rank_acc": 0.31, "format_share": 0.25,
                        "mean_pos_logp_per_token": -0.9},
               "methods": methods,
               "negatives": {"finetune": {"samples": 256, "number_correct_share": 0.125, "contains_answer_share": 0.3,
                                          "unanswered_share": 0.99, "identical_share": 0.0}}}
    text = real_model.report(results)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1] == "| SmolLM2 (base) | - | 0.160 | 0.310 | 0.25 | -0.900 |"
    assert [r.split(" | ")[0] for r in rows[2:5]] == ["| sft", "| dft", "| dft2"]
    assert rows[3] == "| dft | 0.001 | 0.350 | 0.500 | 1.00 | -0.500 |"
    assert rows[-1] == "| dft2 | 0.000 | 0.100 | 0.200 |"
    assert "last number right 0.125" in text and "60 min" in text
