"""Training curves of one or more runs in one figure, read from their run directories.

Per run: ``metrics.jsonl`` (one record per optimizer step) and the held-out evaluations, from
``eval.jsonl`` where the run has one, else from its TensorBoard scalars ``heldout/*``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class RunReadError(ValueError):
    """A run directory that cannot be plotted; the message names the file (and line)."""


@dataclass
class Run:
    name: str
    steps: list[dict] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)  # {"step", "rank_acc", ...}


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunReadError(f"{path}:{number}: not a JSON line ({err.msg})") from err
        if not isinstance(record, dict) or "step" not in record:
            raise RunReadError(f"{path}:{number}: a record needs a 'step' key")
        records.append(record)
    return records


def _tensorboard_heldout(run_dir: Path) -> list[dict]:
    log_dir = run_dir / "tensorboard"
    if not any(log_dir.glob("events.out.tfevents.*")):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    by_step: dict[int, dict] = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("heldout/"):
            for event in events.Scalars(tag):
                by_step.setdefault(event.step, {"step": event.step})[tag.removeprefix("heldout/")] = event.value
    return [by_step[step] for step in sorted(by_step)]


def read_run(spec: str) -> Run:
    """``RUN_DIR`` or ``NAME=RUN_DIR`` (the name defaults to the directory's name)."""
    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise RunReadError(f"{metrics}: not found (is {run_dir} a training run directory?)")
    evaluations = run_dir / "eval.jsonl"
    heldout = read_jsonl(evaluations) if evaluations.is_file() else _tensorboard_heldout(run_dir)
    return Run(name=name or run_dir.resolve().name, steps=read_jsonl(metrics), heldout=heldout)


# (panel title, y label, [(record key, curve label, source)]); source "train" or "heldout";
# the key "margin" is pos_logps - neg_logps.
PANELS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("DFT loss", "loss", [("loss", "", "train")]),
    ("log-probabilities", "summed log-prob", [("pos_logps", "positive", "train"), ("neg_logps", "negative", "train"),
                                              ("margin", "margin", "train")]),
    ("u (moving average)", "mean u", [("u_mean", "", "train")]),
    ("negative weights", "mean weight", [("weight_mean", "", "train")]),
    ("ranking accuracy", "accuracy", [("rank_acc", "train", "train"), ("rank_acc", "held-out", "heldout")]),
    ("learning rate", "lr", [("lr", "", "train")]),
    ("gradient norm", "norm", [("grad_norm", "", "train")]),
    ("throughput", "tokens/s", [("tokens_per_s", "real", "train"), ("processed_tokens_per_s", "processed", "train")]),
]
LINE_STYLES = ("-", "--", ":")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = (record.get("pos_logps", 0) - record.get("neg_logps", 0)
                 if key == "margin" and "pos_logps" in record and "neg_logps" in record else record.get(key))
        if value is not None:
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_runs(runs: list[Run]):
    """One figure, a panel per signal (see PANELS), every run overlaid in its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 4, figsize=(18, 8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, ylabel, curves) in zip(axes.flat, PANELS, strict=True):
        for index, run in enumerate(runs):
            colour = colours[index % len(colours)]
            for number, (key, label, source) in enumerate(curves):
                steps, values = _series(run.steps if source == "train" else run.heldout, key)
                if not steps:
                    continue
                name = f"{run.name} {label}".strip() if label else run.name
                axis.plot(steps, values, LINE_STYLES[number % len(LINE_STYLES)], color=colour, label=name,
                          marker="o" if source == "heldout" else None, markersize=4)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.lines and (len(runs) > 1 or len(curves) > 1):
            axis.legend(fontsize=7)
    return figure
