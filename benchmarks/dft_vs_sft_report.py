"""The report of benchmarks/dft_vs_sft.py: results.json, a Markdown table and the accuracy curve."""

from __future__ import annotations

import json
from pathlib import Path

from nemo_dft.data.io import write_text_atomic

LABELS = {"sft": "SFT", "dft": "DFT (tau 1.0, gamma 0.85)", "dft2": "DFT2 (tau 0.3, gamma 0.9)",
          "dft_filtered": "DFT, verifier-filtered negatives (tau 1.0, gamma 0.85)"}
REGIME_TITLES = {
    "paper": "Paper regime: a pre-trained-only base, the paper's raw MetaMath generation prompt, the alpaca template",
    "sft-base": "Ablation: a base trained with SFT on the task's own format (the first version of this benchmark)",
}


def _pm(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(results: dict) -> str:
    """The Markdown report: held-out accuracy per method, negative quality and training statistics."""
    p = results["protocol"]
    regime = results.get("regime", {"name": "sft-base"})
    base_label = (f"base (pre-trained on the generic corpus, {results['base']['steps']} steps)"
                  if regime["name"] == "paper" else f"base (SFT on the pre-training split, {p['base_steps']} steps)")
    lines = [
        f"## {REGIME_TITLES.get(regime['name'], regime['name'])}",
        "",
        f"Held-out split: {p['heldout']} problems; fine-tuning: {p['finetune']} problems, {p['finetune_steps']} "
        f"steps x {p['batch']} prompts, m = {p['num_negatives']} negatives per prompt per epoch, {p['epochs']} "
        f"epoch(s); seeds {p['seeds']}; learning rate per method from the grid {p['lr_grid']} (extended past an "
        f"edge up to {p.get('max_extensions', 0)} times) on the validation split ({p['validation']} problems).",
        "",
        "| model | lr | held-out accuracy (mean ± std) | per seed | ranking accuracy (mean ± std) |",
        "|---|---|---|---|---|",
        f"| {base_label} | {p['base_lr']:g} | "
        f"{_fmt(results['base']['heldout_accuracy'])} | | {_fmt(results['base'].get('rank_acc'))} |",
    ]
    for method, entry in results["methods"].items():
        seeds = ", ".join(_fmt(a) for a in entry["heldout_accuracy"])
        lines.append(f"| {LABELS.get(method, method)} | {entry['lr']:g} | "
                     f"{_pm(entry['heldout_accuracy_mean'], entry['heldout_accuracy_std'])} | {seeds} | "
                     f"{_pm(entry['rank_acc_mean'], entry['rank_acc_std'])} |")
    lines += ["", "Negatives sampled from the base model (temperature 0.7, top-k 50, top-p 1.0):", "",
              "| split | prompts | samples | correct final answer | last number correct | correct number anywhere "
              "| identical to the reference | no answer phrase |",
              "|---|---|---|---|---|---|---|---|"]
    for split, q in results["negatives"].items():
        lines.append(f"| {split} | {q.get('prompts', 'n/a')} | {q['samples']} | {_fmt(q['correct_share'])} | "
                     f"{_fmt(q.get('number_correct_share'))} | {_fmt(q.get('contains_answer_share'))} | "
                     f"{_fmt(q['identical_share'])} | {_fmt(q['unanswered_share'])} |")
    probe = regime.get("base_arithmetic_probe")
    if probe:
        lines += ["", "The base's arithmetic in its own (corpus) form, each held-out setup + \"Now NAME has\", greedy: "
                  + ", ".join(f"{kind.replace('_', '-')} problems {_fmt(v['accuracy'])} (n = {v['n']})"
                              for kind, v in probe.items()) + "."]
    counts = results["negatives"].get("finetune_filtered", {}).get("filter")
    if counts:
        lines += ["", f"finetune_filtered: filter {results['dft_filtered']['filter']}; {counts['samples']} samples "
                  f"drawn in {counts['filter_rounds']} round(s), {counts['filtered_correct']} filtered out as correct, "
                  f"{counts['prompts_short']} prompts short of incorrect samples, {counts['prompts_dropped']} dropped."]
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
    rates = sorted({float(r) for scores in validation.values() for r in scores})
    lines += ["", "Validation accuracy per learning rate (seed "
              f"{results['lr_choice']['seed']}; chosen before the held-out split was scored; chosen rate in bold):",
              "", "| method | " + " | ".join(f"lr {r:g}" for r in rates) + " |", "|---|" + "---|" * len(rates)]
    for method, scores in validation.items():
        chosen = results["lr_choice"]["lr"][method]
        cells = []
        for r in rates:
            value = scores.get(f"{r:g}", "-")
            text = value if value == "-" else _fmt(value)
            cells.append(f"**{text}**" if r == chosen else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method, grown in results["lr_choice"].get("extensions", {}).items():
        if grown:
            lines.append(f"\n{method}: grid extended ({'; '.join(grown)}).")
    trajectories = {m: e["trajectory"] for m, e in results["methods"].items() if e.get("trajectory")}
    if trajectories:
        lines += ["", f"Over training (seed {p['seeds'][0]}; u, weights and log-probabilities of the negatives under "
                  "the policy, summed over tokens):", "",
                  "| method | step | loss | u mean | weight mean | pos log-p | neg log-p |",
                  "|---|---|---|---|---|---|---|"]
        for method, points in trajectories.items():
            shown = points[:: max(len(points) // 6, 1)]
            if shown[-1] != points[-1]:
                shown.append(points[-1])
            for point in shown:
                lines.append(f"| {method} | {point['step']} | " + " | ".join(
                    _fmt(point.get(k)) for k in ("loss", "u_mean", "weight_mean", "pos_logps", "neg_logps")) + " |")
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
