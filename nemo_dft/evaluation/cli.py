"""``scripts/evaluate.py``: settings, input checks (before any model loads) and the run."""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nemo_dft.config.loading import ConfigError, load_structured

USAGE_KEYS = """settings (key=value):
  extract=answer_is        answer_is ("The answer is: N", MetaMath/GSM8K) | exact (whole answer) | number
  max_new_tokens=256       greedy generation length
  batch_size=16            prompts per generate call / sequences per scoring forward
  backend=auto             auto (vllm where installed, else hf) | vllm | hf
  limit=null               the first N rows only
  negatives=null           at most N generated_k per row for the ranking (null: a run.dir's dft.num_negatives,
                           as its eval.jsonl ranks; otherwise all present)
  generate=true            false: ranking and log-probs only
  score=true               false: generation accuracy only
  chat_template=null       null (the tokenizer's own) | zephyr | alpaca | a Jinja template, as tokenizer.chat_template
  tokenizer=null           HF tokenizer directory (null: the model's)
  add_bos=true, append_eos=true, max_length=null, max_prompt_length=null   tokenization as data.* in training
  device=auto, dtype=float32, num_threads=null, progress=true

--model: an HF directory, a NeMo checkpoint written by training (exported to HF in a temporary
directory first), or a training run.dir (its newest *-last checkpoint).
--data: the training layout (real + optional generated_k) or prompts with answers (prompt/answer,
question/answer, query/response, instruction/output, or messages).
Output keys: n, accuracy (null when the extractor found no answer in any generation), n_extracted
(generations with an answer the extractor found), rank_acc (length-averaged; null without negatives), rank_acc_sum,
mean_pos_logp (summed), mean_pos_logp_per_token, mean_neg_logp, n_ranked; --out adds the settings
and one record per example (prediction, correct, log-probs).
Exit codes: 0 done, 2 bad input (one error: line)."""


@dataclass
class EvalConfig:
    extract: str = "answer_is"
    max_new_tokens: int = 256
    batch_size: int = 16
    backend: str = "auto"
    limit: int | None = None
    negatives: int | None = None
    generate: bool = True
    score: bool = True
    chat_template: str | None = None
    tokenizer: str | None = None
    add_bos: bool = True
    append_eos: bool = True
    max_length: int | None = None
    max_prompt_length: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    num_threads: int | None = None
    progress: bool = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description="Greedy-generation accuracy, ranking accuracy and log-probs of a model.",
        epilog=USAGE_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="PATH", help="HF directory, NeMo checkpoint or run.dir")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSONL, Parquet or saved HF dataset")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def check_settings(cfg: Any) -> None:
    from nemo_dft.evaluation.extraction import EXTRACTIONS
    from nemo_dft.evaluation.generation import BACKENDS

    if cfg.extract not in EXTRACTIONS:
        raise ConfigError(f"extract: {cfg.extract!r} is not one of {', '.join(EXTRACTIONS)}")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend: {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    for key in ("max_new_tokens", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {cfg[key]}")
    for key in ("limit", "negatives", "max_length", "max_prompt_length", "num_threads"):
        if cfg[key] is not None and cfg[key] < (0 if key == "negatives" else 1):
            raise ConfigError(f"{key}: must be positive (or null), got {cfg[key]}")
    if not cfg.generate and not cfg.score:
        raise ConfigError("generate, score: both false leaves nothing to evaluate")


def model_kind(path: Path) -> tuple[str, Path]:
    """('hf' | 'nemo', directory): an HF directory, a NeMo checkpoint, or a run.dir's newest
    ``*-last`` checkpoint."""
    if not path.exists():
        raise ConfigError(f"--model: {path} does not exist")
    if (path / "config.json").is_file():
        return "hf", path
    if (path / "context").is_dir() and (path / "weights").is_dir():
        return "nemo", path
    last = sorted((path / "checkpoints").glob("*-last"), key=lambda p: p.stat().st_mtime)
    if last:
        return "nemo", last[-1]
    raise ConfigError(f"--model: {path} is neither an HF directory (config.json), a NeMo checkpoint "
                      "(context/ and weights/) nor a run.dir with checkpoints/*-last")


def run_negatives(path: Path) -> int | None:
    """``dft.num_negatives`` of the training run in ``path`` (a run.dir with config.yaml), else None."""
    saved = path / "config.yaml"
    if not (saved.is_file() and (path / "checkpoints").is_dir()):
        return None
    try:
        return int(OmegaConf.load(saved).dft.num_negatives)
    except Exception as err:
        raise ConfigError(f"--model: {saved} is unreadable ({err}); set negatives=N") from err


def negatives_used(cfg: Any, model: Path) -> str:
    """Settle ``cfg.negatives`` (null on a run.dir: the run's dft.num_negatives, so that rank_acc
    is the trainer's held-out one) and say where the count came from."""
    if cfg.negatives is not None:
        return f"negatives={cfg.negatives}"
    cfg.negatives = run_negatives(model)
    if cfg.negatives is None:
        return "negatives=all present in each row"
    return f"negatives={cfg.negatives} (the run's dft.num_negatives; negatives=N to change)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nemo_dft.evaluation.examples import load_examples

    try:
        cfg = load_structured(EvalConfig, None, args.overrides)
        check_settings(cfg)
        kind, model_dir = model_kind(Path(args.model))
        negatives = negatives_used(cfg, Path(args.model))
        if not Path(args.data).exists():
            raise ConfigError(f"--data: {args.data} does not exist")
        try:
            examples = load_examples(args.data, cfg.limit, cfg.negatives)
        except ValueError as err:
            raise ConfigError(f"--data: {err}") from err
        from nemo_dft.evaluation.generation import resolve_backend

        backend = resolve_backend(cfg.backend) if cfg.generate else None
    except ValueError as err:  # ConfigError, RowError, DataFormatError
        print(f"error: {err}", file=sys.stderr)
        return 2
    from nemo_dft.evaluation.runner import evaluate

    with tempfile.TemporaryDirectory(prefix="nemo_dft-eval-") as tmp:
        if kind == "nemo":
            from nemo_dft.convert.api import export_hf

            print(f"[evaluate] exporting {model_dir} to HF for evaluation", file=sys.stderr)
            model_dir = export_hf(model_dir, Path(tmp) / "hf")
        try:
            result = evaluate(model_dir, examples, cfg, backend)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from nemo_dft.evaluation.report import table, write_results

    print(f"evaluation of {args.model} on {args.data} (extract={cfg.extract}, backend={backend or 'none'}, "
          f"{negatives}):")
    print(table(result.summary))
    if result.summary["n_extracted"] == 0:
        print(f"  accuracy is not reported: extract={cfg.extract} found no answer in any of the "
              f"{result.summary['n']} generations (n_extracted 0); choose another extract= for this task")
    if args.out:
        settings = {"model": str(args.model), "data": str(args.data), "backend": backend,
                    **OmegaConf.to_container(cfg)}
        write_results(args.out, result.summary, settings, result.records)
        print(f"wrote {args.out}")
    return 0
