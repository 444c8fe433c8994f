"""Run the paper's lm-eval-harness benchmarks on an exported HF checkpoint.

    python scripts/lm_eval.py --model HF_DIR [--config conf/lm_eval_paper.yaml] [--dry-run] [key=value ...]

Tasks and shots come from the config (default ``conf/lm_eval_paper.yaml``: MMLU 5-shot, TruthfulQA
MC2, HellaSwag 10-shot, Winogrande 5-shot, GSM8K 5-shot, ARC-Challenge 25-shot, IFEval); tasks with
the same shot count share one ``lm_eval`` call.  ``--dry-run`` prints the command lines only.
Needs lm_eval in the interpreter ``python=`` names (default: this one): ``pip install '.[eval]'``.
Results: ``<output_path>/fewshot<N>/...`` as lm_eval writes them, and ``<output_path>/summary.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path

from nemo_dft.config.loading import ConfigError, load_structured
from nemo_dft.evaluation.harness import LmEvalConfig, build_calls, check, collect_results, run_calls

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "conf" / "lm_eval_paper.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lm_eval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="HF_DIR", help="exported HF checkpoint directory")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE", help="task list (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the lm_eval command lines and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. model=vllm model_args.dtype=float32 limit=10 output_path=DIR python=PATH")
    args = parser.parse_args(argv)
    try:
        cfg = load_structured(LmEvalConfig, args.config, args.overrides)
        check(cfg, args.model)
        calls = build_calls(cfg, Path(args.model).resolve())
        if not args.dry_run and cfg.python is None and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("lm_eval is not installed here: pip install '.[eval]' (lm-eval==0.4.13), or name "
                              "an interpreter that has it with python=PATH")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for call in calls:
            print(shlex.join(call.argv))
        return 0
    status = run_calls(calls, cwd=REPO)
    if status != 0:
        return status
    output_root = calls[0].output_path.parent
    summary = collect_results(calls)
    (output_root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
