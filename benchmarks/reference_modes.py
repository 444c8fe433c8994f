"""Peak memory and step time of reference-based DFT with the frozen on-the-fly reference against
the offline reference file, on the same model, data and batch.

    .venv/bin/python benchmarks/reference_modes.py [--steps 6] [--hidden 512] [--layers 8]

Each mode trains in its own process (peak RSS of that process, from getrusage); step time is the
median over steps after the first, from metrics.jsonl.  The offline mode's one-off scoring pass is
timed apart.  Prints a JSON summary with the offline/frozen ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Runs a command and prints the peak RSS (KiB on Linux) of that one child.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run(command: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of ``command``; its output is shown only on failure."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    peak = int(result.stdout.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
    return time.perf_counter() - started, peak


def step_seconds(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["step_s"] for m in lines[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    shape = [f"model.config.hidden_size={args.hidden}", f"model.config.num_layers={args.layers}",
             f"model.config.ffn_hidden_size={3 * args.hidden}", "model.config.num_attention_heads=8",
             "model.config.num_query_groups=4", f"model.config.kv_channels={args.hidden // 8}"]
    common = ["trainer.progress_bar=false", "data.num_epochs=2", "data.eval_path=null", *shape]
    train = [sys.executable, "scripts/train_dft.py", *common, f"trainer.max_steps={args.steps}"]
    with tempfile.TemporaryDirectory(prefix="dft-ref-bench-") as tmp:
        root = Path(tmp)
        run([*train, f"run.dir={root / 'init'}", "trainer.max_steps=1", "optim.lr=0", "optim.min_lr=0"])
        [init] = sorted((root / "init" / "checkpoints").glob("*-last"))
        ref_file = root / "ref.parquet"
        scoring_seconds, scoring_peak = run([sys.executable, "scripts/precompute_ref_logps.py", *common,
                                             f"model.init_from={init}", f"output={ref_file}"])
        frozen_seconds, frozen_peak = run([*train, f"run.dir={root / 'frozen'}", f"model.init_from={init}"])
        offline_seconds, offline_peak = run([*train, f"run.dir={root / 'offline'}", f"model.init_from={init}",
                                             "dft.reference=offline", f"dft.ref_logps={ref_file}"])
        frozen_step, offline_step = step_seconds(root / "frozen"), step_seconds(root / "offline")
    print(json.dumps({
        "model": {"hidden": args.hidden, "layers": args.layers}, "steps": args.steps,
        "peak_rss_mib": {"frozen": frozen_peak // 1024, "offline": offline_peak // 1024,
                         "scoring_pass": scoring_peak // 1024},
        "median_step_s": {"frozen": round(frozen_step, 3), "offline": round(offline_step, 3)},
        "process_s": {"frozen": round(frozen_seconds, 1), "offline": round(offline_seconds, 1),
                      "scoring_pass": round(scoring_seconds, 1)},
        "offline_over_frozen": {"peak_rss": round(offline_peak / frozen_peak, 3),
                                "step_time": round(offline_step / frozen_step, 3)},
    }, indent=2))


if __name__ == "__main__":
    main()
