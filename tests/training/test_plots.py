"""scripts/plot_metrics.py: one PNG with a panel per signal and a curve per run and signal."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from nemo_dft.training.plots import PANELS, plot_runs, read_run
from tests.conftest import REPO, subprocess_env


def write_run(run_dir, steps: int, heldout: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = [{"step": s, "loss": rng.random(), "u_mean": rng.random(), "weight_mean": rng.random(),
                "pos_logps": -rng.random() * 50, "neg_logps": -rng.random() * 80, "rank_acc": rng.random(),
                "lr": 1e-3 * rng.random(), "grad_norm": rng.random(), "tokens_per_s": 1000 * rng.random(),
                "processed_tokens_per_s": 2000 * rng.random(), "tflops_per_device": rng.random(), "mfu": None}
               for s in range(1, steps + 1)]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if heldout:
        evaluations = [{"step": 0, "rank_acc": 0.4}, {"step": steps, "rank_acc": 0.9}]
        (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluations))
    return records


def test_figure_has_a_panel_per_signal_and_a_curve_per_run(tmp_path):
    first = write_run(tmp_path / "dft", steps=5, heldout=True, seed=1)
    write_run(tmp_path / "sft", steps=3, heldout=False, seed=2)
    figure = plot_runs([read_run(str(tmp_path / "dft")), read_run(f"SFT={tmp_path / 'sft'}")])
    assert len(figure.axes) == len(PANELS) == 8
    for axis, (title, _, curves) in zip(figure.axes, PANELS, strict=True):
        # the held-out curve exists for the run with evaluations only
        expected = sum(2 - (source == "heldout") for _, _, source in curves)
        assert len(axis.lines) == expected, title
        assert {line.get_label().split()[0] for line in axis.lines} == {"dft", "SFT"}
    margin = next(line for line in figure.axes[1].lines if line.get_label() == "dft margin")
    assert list(margin.get_ydata()) == pytest.approx([r["pos_logps"] - r["neg_logps"] for r in first])
    heldout = next(line for line in figure.axes[4].lines if line.get_label() == "dft held-out")
    assert list(heldout.get_xdata()) == [0, 5] and not math.isnan(heldout.get_ydata()[1])


def test_script_writes_a_png_and_names_a_damaged_line(tmp_path):
    write_run(tmp_path / "a", steps=4, heldout=True, seed=3)
    write_run(tmp_path / "b", steps=4, heldout=False, seed=4)
    out = tmp_path / "curves.png"
    command = [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(tmp_path / "a"), f"B={tmp_path / 'b'}",
               "--out", str(out)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "b" / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"{tmp_path / 'b' / 'metrics.jsonl'}:5:" in result.stderr
    assert "Traceback" not in result.stderr
