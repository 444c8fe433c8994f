"""benchmarks/step_cost.py end to end on a small model, one round: the issue's JSON shape, every
variant (four trainer runs and the paper pattern) trains the same real tokens, and the real-token
fractions each reports equal an independent count of its layout over the same groups
(nemo_dft.data.packing.real_fraction).  Speed ratios are not asserted: on a 2-layer model they
mean nothing, and absolute times are noise on these machines."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_child

pytestmark = pytest.mark.slow


def test_step_cost_times_the_trainer_in_every_variant(tmp_path):
    out, work = tmp_path / "step_cost.json", tmp_path / "work"
    scale, steps = 0.05, 3
    result = run_child([sys.executable, str(REPO / "benchmarks/step_cost.py"), "--small", "--steps", str(steps),
                        "--rounds", "1", "--scale", str(scale), "--out", str(out), "--work-dir", str(work)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("load average") == 5
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"padded", "packed", "packed_rows", "dft2_packed", "paper"}
    assert set(report["ratios"]) >= {"packed_vs_paper", "packed_vs_padded", "packed_rows_vs_padded"}
    for variant in report["variants"].values():
        assert set(variant) >= {"real_tokens_per_s", "processed_tokens_per_s", "real_fraction", "peak_rss_mb"}
        assert variant["processed_tokens_per_s"] >= variant["real_tokens_per_s"] > 0
        assert variant["peak_rss_mb"] > 100
    real = {name: v["real_tokens"] for name, v in report["variants"].items()}
    assert len(set(real.values())) == 1, real

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import step_cost
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from nemo_dft.data.packing import real_fraction

    groups, _ = step_cost.paper_groups(work / "data.jsonl", scale, steps)
    timed = [[len(p.prompt) + len(p.response) - 1 for p in g["pairs"]]
             for g in groups[step_cost.WARMUP_STEPS * step_cost.PROMPTS_PER_STEP:]]
    assert sum(map(sum, timed)) == real["paper"]
    micro = report["micro_batch"]
    assert micro == report["paper_micro_batch"] == 4  # by default every variant takes the paper's micro-batch
    expected = {
        "padded": real_fraction(timed, micro, packing=False),
        "packed": real_fraction(timed, micro, packing=True),
        "dft2_packed": real_fraction(timed, micro, packing=True),
        "packed_rows": real_fraction(timed, step_cost.PROMPTS_PER_STEP, packing=True,
                                     pack_length=step_cost.pack_length(scale)),
        "paper": real_fraction(timed, 4, packing=False, pad_multiple=1),
    }
    for name, fraction in expected.items():
        assert report["variants"][name]["real_fraction"] == pytest.approx(fraction, rel=1e-6), name
    assert report["ratios"]["packed_vs_paper"] == pytest.approx(
        report["variants"]["packed"]["real_tokens_per_s"] / report["variants"]["paper"]["real_tokens_per_s"])
