"""Collect the run directories of ``scripts/gpu_kit.sh run`` into one ``gpu_report.json``.

    python scripts/gpu_kit_report.py --runs DIR --out gpu_report.json [--mode gpu|cpu]

Reads each part's exit status (DIR/status.jsonl), the trainer's per-step records
(DIR/<part>/metrics.jsonl: tokens/s, TFLOP/s, MFU, peak CUDA memory) and optimizer report
(memory.json), the memory plan's text (DIR/memory_plan.txt) and the benchmark's results.json.
Throughput is the mean over the steps after the first two (compilation and allocator warm-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
from pathlib import Path

WARMUP_STEPS = 2


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize_run(run_dir: Path) -> dict:
    steps = read_jsonl(run_dir / "metrics.jsonl")
    timed = steps[WARMUP_STEPS:] or steps
    summary = {
        "steps": len(steps),
        "losses": [s.get("loss") for s in steps],
        "step_s": mean([s.get("step_s") for s in timed]),
        "real_tokens_per_s": mean([s.get("tokens_per_s") for s in timed]),
        "processed_tokens_per_s": mean([s.get("processed_tokens_per_s") for s in timed]),
        "tflops_per_device": mean([s.get("tflops_per_device") for s in timed]),
        "mfu": mean([s.get("mfu") for s in timed]),
        "peak_memory_gb": max((s.get("max_memory_allocated_gb") or 0.0 for s in steps), default=None) or None,
    }
    memory = run_dir / "memory.json"
    if memory.is_file():
        summary["optimizer_memory"] = json.loads(memory.read_text())
    return summary


def relative_differences(a: list, b: list) -> list[float | None]:
    return [None if x is None or y is None else abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=False)]


def memory_plan(path: Path) -> dict:
    if not path.is_file():
        return {}
    text = path.read_text()
    total = re.search(r"total\s+([0-9.]+) GB", text)
    return {"predicted_total_gb": float(total.group(1)) if total else None, "text": text[-3000:]}


def device() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"name": torch.cuda.get_device_name(), "memory_gb": props.total_memory / 1e9,
                    "torch": torch.__version__, "cuda": torch.version.cuda}
        return {"name": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__}
    except Exception as err:  # the report is still written
        return {"error": repr(err)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="gpu")
    args = parser.parse_args(argv)
    report: dict = {"mode": args.mode, "device": device(), "parts": read_jsonl(args.runs / "status.jsonl")}
    a = {mode: summarize_run(args.runs / f"a_{mode}") for mode in ("packed", "padded")}
    plan = memory_plan(args.runs / "memory_plan.txt")
    from_plan = plan.get("predicted_total_gb")
    for run in a.values():
        run["memory_plan_predicted_gb"] = from_plan
    report["a_throughput"] = a
    report["a_memory_plan"] = plan
    report["a_first_steps_loss_rel_diff"] = relative_differences(a["packed"]["losses"][:3], a["padded"]["losses"][:3])
    b = {mode: summarize_run(args.runs / f"b_{mode}") for mode in ("packed", "padded")}
    diffs = relative_differences(b["packed"]["losses"], b["padded"]["losses"])
    report["b_packed_vs_padded"] = {"packed_losses": b["packed"]["losses"], "padded_losses": b["padded"]["losses"],
                                    "rel_diff": diffs, "max_rel_diff": max((d for d in diffs if d is not None),
                                                                           default=None)}
    results = args.runs / "c_benchmark" / "results.json"
    report["c_benchmark_quick"] = json.loads(results.read_text()) if results.is_file() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for mode, run in a.items():
        print(f"(a) {mode}: {run['steps']} steps, {run['real_tokens_per_s'] or 0:.0f} real / "
              f"{run['processed_tokens_per_s'] or 0:.0f} processed tokens/s, TFLOP/s {run['tflops_per_device']}, "
              f"MFU {run['mfu']}, peak {run['peak_memory_gb']} GB (plan {from_plan} GB)")
    print(f"(b) packed vs padded losses: {report['b_packed_vs_padded']}")
    print(f"(c) benchmark results: {'present' if report['c_benchmark_quick'] else 'none'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
