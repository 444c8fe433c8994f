"""The report of benchmarks/dft_vs_sft.py: results.json, a Markdown table and the accuracy curve."""

from __future__ import annotations

import json
from pathlib import Path

from nemo_dft.data.io import write_text_atomic

LABELS = {"sft": "SFT", "dft": "DFT (tau 1.0, gamma 0.85)", "dft2": "DFT2 (tau 0.3, gamma 0.9)"}


def _pm(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(results: dict) -> str:
    """The Markdown report: held-out accuracy per method, negative quality and training statistics."""
    p = results["protocol"]
    lines = [
        f"Held-out split: {p['heldout']} problems; fine-tuning: {p['finetune']} problems, {p['finetune_steps']} "
        f"steps x {p['batch']} prompts, m = {p['num_negatives']} negatives per prompt per epoch, {p['epochs']} "
        f"epoch(s); seeds {p['seeds']}; learning rate per method from {p['lr_grid']} on the validation split "
        f"({p['validation']} problems).",
        "",
        "| model | lr | held-out accuracy (mean ± std) | per seed | ranking accuracy (mean ± std) |",
        "|---|---|---|---|---|",
        f"| base (SFT on the pre-training split, {p['base_steps']} steps) | {p['base_lr']:g} | "
        f"{_fmt(results['base']['heldout_accuracy'])} | | {_fmt(results['base'].get('rank_acc'))} |",
    ]
    for method, entry in results["methods"].items():
        seeds = ", ".join(_fmt(a) for a in entry["heldout_accuracy"])
        lines.append(f"| {LABELS.get(method, method)} | {entry['lr']:g} | "
                     f"{_pm(entry['heldout_accuracy_mean'], entry['heldout_accuracy_std'])} | {seeds} | "
                     f"{_pm(entry['rank_acc_mean'], entry['rank_acc_std'])} |")
    lines += ["", "Negatives sampled from the base model (temperature 0.7, top-k 50):", "",
              "| split | samples | correct final answer | identical to the reference | no answer |",
              "|---|---|---|---|---|"]
    for split, q in results["negatives"].items():
        lines.append(f"| {split} | {q['samples']} | {_fmt(q['correct_share'])} | {_fmt(q['identical_share'])} | "
                     f"{_fmt(q['unanswered_share'])} |")
    lines += ["", "Training statistics over the last quarter of the steps (mean over seeds):", "",
              "| method | loss | u mean | weight mean | pos log-p | neg log-p | training rank_acc |",
              "|---|---|---|---|---|---|---|"]
    for method, entry in results["methods"].items():
        cols = []
        for key in ("loss", "u_mean", "weight_mean", "pos_logps", "neg_logps", "rank_acc"):
            values = [t[key] for t in entry["training"] if t.get(key) is not None]
            cols.append(_fmt(sum(values) / len(values)) if values else "n/a")
        lines.append(f"| {method} | " + " | ".join(cols) + " |")
    validation = results["lr_choice"]["validation_accuracy"]
    lines += ["", "Validation accuracy of the learning-rate grid (seed "
              f"{results['lr_choice']['seed']}; chosen before the held-out split was scored):", "",
              "| method | " + " | ".join(f"lr {lr}" for lr in next(iter(validation.values()))) + " |",
              "|---|" + "---|" * len(next(iter(validation.values())))]
    for method, scores in validation.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(v) for v in scores.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Held-out accuracy against fine-tuning step: the first seed's checkpoints from the base at step 0,
    and the mean ± std over seeds at the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["base"]["heldout_accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, entry in results["methods"].items():
        points = [[0, base], *entry["curve"]]
        line, = ax.plot([s for s, _ in points], [a for _, a in points], marker="o",
                        label=f"{LABELS.get(method, method)}, lr {entry['lr']:g}")
        last = results["protocol"]["finetune_steps"]
        ax.errorbar([last], [entry["heldout_accuracy_mean"]], yerr=[entry["heldout_accuracy_std"]],
                    color=line.get_color(), capsize=4, marker="s", alpha=0.6)
    highest = max([base, *(a for e in results["methods"].values() for _, a in e["curve"])])
    ax.set_ylim(0, max(0.1, 1.15 * highest))
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"Arithmetic word problems ({results['protocol']['heldout']} held-out)\n"
                 f"lines: seed {results['protocol']['seeds'][0]}; squares: mean ± std over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: Path, results: dict) -> None:
    results = json.loads(json.dumps(results))  # the table and the plot read what results.json holds
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", table(results))
    plot(results, out / "heldout_accuracy.png")
