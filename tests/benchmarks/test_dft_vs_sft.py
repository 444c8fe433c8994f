"""benchmarks/dft_vs_sft.py --quick (the paper regime): the whole pipeline through the project's
commands gives a well-formed report, chooses learning rates before scoring the held-out split, keeps
only incorrect negatives for dft_filtered, and resumes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from nemo_dft.data.io import read_rows
from nemo_dft.demo import arithmetic_task
from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow


def _run(out) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "dft_vs_sft.py"), "--quick", "--out", str(out),
               "--threads", "1"]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dft_vs_sft")
    return out, _run(out)


def test_results_are_well_formed(quick_run) -> None:
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    assert set(results["methods"]) == {"sft", "dft", "dft2", "dft_filtered"}
    assert 0.0 <= results["base"]["heldout_accuracy"] <= 1.0
    regime = results["regime"]
    assert regime["name"] == protocol["regime"] == "paper" and regime["template"] == "alpaca"
    assert regime["base_heldout_accuracy"] == results["base"]["heldout_accuracy"]
    assert regime["negatives_correct_share"] == results["negatives"]["finetune"]["correct_share"]
    assert results["lr_grid"] == results["lr_choice"]["validation_accuracy"]
    assert results["dft_filtered"]["lr"] == results["methods"]["dft_filtered"]["lr"]
    for method, entry in results["methods"].items():
        assert entry["seeds"] == protocol["seeds"], method
        assert len(entry["heldout_accuracy"]) == len(entry["rank_acc"]) == len(protocol["seeds"])
        assert all(0.0 <= a <= 1.0 for a in entry["heldout_accuracy"] + entry["rank_acc"]), entry
        assert entry["lr"] == results["lr_choice"]["lr"][method]
        assert entry["lr"] in protocol["lr_grid"]
        assert entry["curve"][-1] == [protocol["finetune_steps"], entry["heldout_accuracy"][0]]
        assert entry["training"][0]["steps"] == protocol["finetune_steps"]
    # The DFT runs log their u weights; SFT has no negatives.
    assert results["methods"]["dft"]["training"][0]["u_mean"] is not None
    assert results["methods"]["sft"]["training"][0]["neg_logps"] is None
    table = (out / "results.md").read_text()
    for label in ("SFT", "DFT (tau 1.0", "DFT2 (tau 0.3", "DFT, verifier-filtered", "base (pre-trained"):
        assert f"| {label}" in table, label
    png = (out / "heldout_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_every_evaluation_scores_its_whole_split(quick_run) -> None:
    out, _ = quick_run
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    evaluations = sorted((out / "eval").glob("*.json"))
    assert evaluations
    for path in evaluations:
        split = "heldout" if path.stem.endswith("heldout") else "validation"
        result = json.loads(path.read_text())
        assert result["n"] == protocol[split], path.name
        if result["n_extracted"] == 0:  # no answer found in any generation: accuracy is not reported
            assert result["accuracy"] is None, path.name
        else:
            assert result["accuracy"] == sum(e["correct"] for e in result["examples"]) / result["n"]


def test_negatives_come_from_the_base_and_their_quality_is_counted_independently(quick_run) -> None:
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    per_prompt = {"finetune": protocol["num_negatives"] * protocol["epochs"], "heldout": protocol["num_negatives"]}
    prompts = (out / "generation-prompt.yaml").read_text()
    assert "### Question: {query}" in prompts and "### Response: " in prompts
    for split, samples in per_prompt.items():
        rows = read_rows(out / f"neg-{split}" / "negatives.parquet")
        assert len(rows) == protocol[split]
        texts = [(r["real"][-1]["content"], r[f"generated_{k}"][-1]["content"]) for r in rows for k in range(samples)]
        assert not any(f"generated_{samples}" in r for r in rows)
        right = sum(arithmetic_task.extract_answer(neg) == arithmetic_task.extract_answer(ref)
                    and arithmetic_task.extract_answer(ref) is not None for ref, neg in texts)
        anywhere = sum(arithmetic_task.extract_answer(ref) in re.findall(r"\d+", neg) for ref, neg in texts)
        quality = results["negatives"][split]
        assert quality["samples"] == len(texts)
        assert quality["correct_share"] == pytest.approx(right / len(texts))
        assert quality["contains_answer_share"] == pytest.approx(anywhere / len(texts))


def test_learning_rates_are_chosen_before_the_heldout_split_is_scored(quick_run) -> None:
    out, _ = quick_run
    chosen = (out / "lr_choice.json").stat().st_mtime
    finetuned = [p for p in (out / "eval").glob("*heldout.json") if not p.name.startswith("base")]
    assert finetuned
    assert all(p.stat().st_mtime >= chosen for p in finetuned)
    assert all(p.stat().st_mtime <= chosen for p in (out / "eval").glob("*validation.json"))


def test_filtered_negatives_are_incorrect_unless_their_prompt_ran_short(quick_run) -> None:
    from nemo_dft.evaluation.extraction import is_correct

    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    samples = protocol["num_negatives"] * protocol["epochs"]
    rows = read_rows(out / "neg-filtered" / "negatives.parquet")
    assert len(rows) == protocol["finetune"]  # on_short=keep: no prompt is dropped
    correct_rows = 0
    for row in rows:
        reference = row["real"][-1]["content"]
        correct = [is_correct(row[f"generated_{k}"][-1]["content"], reference, "number") for k in range(samples)]
        # incorrect samples first; correct ones only fill the slots of a prompt short of incorrect ones
        assert correct == sorted(correct), row["id"]
        correct_rows += any(correct)
    counts = results["negatives"]["finetune_filtered"]["filter"]
    assert correct_rows <= counts["prompts_short"]
    # the training run of dft_filtered read that file
    config = (out / "runs" / f"dft_filtered-lr{results['methods']['dft_filtered']['lr']:g}-seed0" / "config.yaml")
    assert "neg-filtered" in config.read_text()


def test_a_rerun_resumes_without_training_again(quick_run) -> None:
    out, _ = quick_run
    before = json.loads((out / "results.json").read_text())
    logs = {p: p.stat().st_mtime for p in (out / "logs").glob("*.log")}
    _run(out)
    after = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in after.items() if k != "seconds"} == {k: v for k, v in before.items() if k != "seconds"}
    assert {p: p.stat().st_mtime for p in (out / "logs").glob("*.log")} == logs, "a finished stage ran again"
