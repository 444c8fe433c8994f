"""The evaluation's numbers: per-example records, the summary keys of ``results.json`` and the
printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemo_dft.data.io import write_text_atomic
from nemo_dft.evaluation.scoring import ExampleScores


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(scores: list[ExampleScores] | None, correct: list[bool] | None,
              extracted: list[bool] | None = None) -> dict[str, Any]:
    """``n``, ``accuracy`` (greedy generation; null when not generated, or when the extractor found no
    answer in any generation: 0.0 would read as a model that answers nothing right), ``n_extracted``
    (generations with an answer the extractor found), ``rank_acc`` (length-averaged) and
    ``rank_acc_sum`` (summed) over the examples with negatives (null without any),
    ``mean_pos_logp`` / ``mean_neg_logp`` (summed log-probs) and their per-token means."""
    n = len(scores) if scores is not None else len(correct or [])
    n_extracted = None if extracted is None else sum(extracted)
    accuracy = None if correct is None or n_extracted == 0 else _mean([float(c) for c in correct])
    out: dict[str, Any] = {"n": n, "accuracy": accuracy, "n_extracted": n_extracted}
    ranked = [s for s in scores or [] if s.has_negatives]
    out["n_ranked"] = len(ranked)
    out["rank_acc"] = _mean([float(s.ranked_correct(length_averaged=True)) for s in ranked])
    out["rank_acc_sum"] = _mean([float(s.ranked_correct(length_averaged=False)) for s in ranked])
    out["mean_pos_logp"] = _mean([s.pos_logp for s in scores]) if scores else None
    out["mean_pos_logp_per_token"] = (sum(s.pos_logp for s in scores) / max(sum(s.pos_tokens for s in scores), 1)
                                      if scores else None)
    out["mean_neg_logp"] = _mean([v for s in ranked for v in s.neg_logps])
    return out


def table(summary: dict[str, Any]) -> str:
    """Two aligned columns, one metric a line."""
    keys = ["n", "accuracy", "n_extracted", "rank_acc", "rank_acc_sum", "mean_pos_logp", "mean_pos_logp_per_token",
            "mean_neg_logp", "n_ranked"]
    lines = []
    for key in keys:
        value = summary.get(key)
        text = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append(f"  {key:<24} {text}")
    return "\n".join(lines)


def write_results(path: str | Path, summary: dict[str, Any], settings: dict[str, Any],
                  examples: list[dict[str, Any]]) -> None:
    """``--out`` JSON: the summary keys at the top, the settings, and one record per example."""
    body = {**summary, "settings": settings, "examples": examples}
    write_text_atomic(path, json.dumps(body, indent=2) + "\n")
