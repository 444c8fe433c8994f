"""The lm-eval-harness command lines of the paper's benchmarks (``conf/lm_eval_paper.yaml``) for an
exported HF checkpoint.  Building them needs no lm_eval; running them needs it installed in
``python`` (``pip install '.[eval]'``, or another environment)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_dft.config.loading import ConfigError

LM_EVAL_BACKENDS = ("hf", "vllm")


@dataclass
class TaskSpec:
    name: str = "???"
    num_fewshot: int = 0


@dataclass
class LmEvalConfig:
    model: str = "hf"
    model_args: dict[str, Any] = field(default_factory=lambda: {"dtype": "bfloat16"})
    batch_size: str = "auto"
    output_path: str | None = None
    include_path: str | None = None
    limit: int | None = None
    device: str | None = None
    python: str | None = None
    tasks: list[TaskSpec] = field(default_factory=list)


@dataclass(frozen=True)
class LmEvalCall:
    tasks: list[str]
    num_fewshot: int
    output_path: Path
    argv: list[str]


def check(cfg: Any, model_path: str | Path) -> None:
    """Settings and the model directory, before anything runs."""
    if cfg.model not in LM_EVAL_BACKENDS:
        raise ConfigError(f"model: {cfg.model!r} is not one of {', '.join(LM_EVAL_BACKENDS)}")
    if not cfg.tasks:
        raise ConfigError("tasks: the list is empty")
    for i, task in enumerate(cfg.tasks):
        if not isinstance(task.name, str) or not task.name or task.name == "???":
            raise ConfigError(f"tasks[{i}].name: missing")
        if task.num_fewshot < 0:
            raise ConfigError(f"tasks[{i}].num_fewshot: must be >= 0, got {task.num_fewshot}")
    if "pretrained" in cfg.model_args:
        raise ConfigError("model_args.pretrained: set by --model, not in model_args")
    if not (Path(model_path) / "config.json").is_file():
        raise ConfigError(f"--model: {model_path} is not an HF directory (no config.json); export a NeMo "
                          "checkpoint first: python scripts/convert_hf.py export --nemo CKPT --out HF_DIR")
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise ConfigError(f"include_path: {cfg.include_path} is not a directory")


def build_calls(cfg: Any, model_path: str | Path) -> list[LmEvalCall]:
    """One ``lm_eval`` call per distinct ``num_fewshot`` (lm_eval applies one to all its tasks), in
    the order the tasks are listed; each writes under ``output_path/fewshot<N>``."""
    model_args = ",".join([f"pretrained={model_path}", *(f"{k}={v}" for k, v in cfg.model_args.items())])
    output_root = Path(cfg.output_path or Path(model_path) / "lm_eval")
    groups: dict[int, list[str]] = {}
    for task in cfg.tasks:
        groups.setdefault(int(task.num_fewshot), []).append(task.name)
    calls = []
    for shots, names in groups.items():
        out = output_root / f"fewshot{shots}"
        argv = [cfg.python or sys.executable, "-m", "lm_eval", "--model", cfg.model, "--model_args", model_args,
                "--tasks", ",".join(names), "--num_fewshot", str(shots), "--batch_size", str(cfg.batch_size),
                "--output_path", str(out)]
        if cfg.include_path:
            argv += ["--include_path", str(cfg.include_path)]
        if cfg.limit is not None:
            argv += ["--limit", str(cfg.limit)]
        if cfg.device:
            argv += ["--device", str(cfg.device)]
        calls.append(LmEvalCall(names, shots, out, argv))
    return calls


def collect_results(calls: list[LmEvalCall]) -> dict[str, dict[str, Any]]:
    """Every task's metrics from the ``results_*.json`` lm_eval wrote for each call (the newest
    file of a call wins), with its ``num_fewshot``; a task run at two shot counts is keyed
    ``task@Nshot``."""
    merged: dict[str, dict[str, Any]] = {}
    for call in calls:
        files = sorted(call.output_path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        if not files:
            continue
        for task, metrics in json.loads(files[-1].read_text()).get("results", {}).items():
            key = task if task not in merged else f"{task}@{call.num_fewshot}shot"
            merged[key] = {**metrics, "num_fewshot": call.num_fewshot}
    return merged


def run_calls(calls: list[LmEvalCall], cwd: Path | None = None) -> int:
    """Run the calls one after another; the first failing exit status stops and is returned."""
    for call in calls:
        print(f"[lm_eval] {' '.join(call.argv)}", file=sys.stderr, flush=True)
        status = subprocess.run(call.argv, cwd=cwd).returncode
        if status != 0:
            print(f"error: lm_eval exited {status} on tasks {','.join(call.tasks)}", file=sys.stderr)
            return status
    return 0
