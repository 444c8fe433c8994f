"""Trainable parameters, peak memory and held-out ranking accuracy of LoRA-DFT (the reference is the
model with its adapters off) against full DFT (a frozen copy of the weights as the reference).

    .venv/bin/python benchmarks/lora_memory.py [--steps 256] [--hidden 128] [--layers 2] [key=value ...]

Both variants train the demo task from the same random initial checkpoint, each in its own process
(peak RSS of that process, from getrusage); the trainable parameter count is the trainer's own
(``memory.json``), the accuracies are the ``before``/``after`` lines of ``eval.jsonl``.  Extra
``key=value`` arguments go to both runs; LoRA's own settings (``peft.dim`` etc.) to the LoRA run
only.  Prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from reference_modes import run  # noqa: E402  (one child-process peak-RSS harness for both benchmarks)


def summary(run_dir: Path, seconds: float, peak_kib: int) -> dict:
    memory = json.loads((run_dir / "memory.json").read_text())
    eval_file = run_dir / "eval.jsonl"  # absent with data.eval_path=null
    lines = eval_file.read_text().splitlines() if eval_file.exists() else []
    evals = {e["when"]: e["rank_acc"] for e in map(json.loads, lines)}
    return {"trainable": sum(memory["trainable_parameters_per_rank"]),
            "adam_mib": sum(memory["optimizer_state_bytes_per_rank"]) / 2**20,
            "peak_rss_mib": peak_kib / 1024, "seconds": seconds,
            "acc_before": evals.get("before"), "acc_after": evals.get("after")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="LoRA's learning rate (default: 1e-2)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    shape = [f"model.config.hidden_size={args.hidden}", f"model.config.num_layers={args.layers}",
             f"model.config.ffn_hidden_size={3 * args.hidden}", f"model.config.kv_channels={args.hidden // 4}"]
    shared = [o for o in args.overrides if not o.startswith("peft.")]
    lora_only = [o for o in args.overrides if o.startswith("peft.")]
    train = [sys.executable, "scripts/train_dft.py", "trainer.progress_bar=false", "log.tensorboard=false",
             "dft.reference=frozen", *shape, *shared]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dft-lora-bench-") as tmp:
        root = Path(tmp)
        run([*train, f"run.dir={root / 'init'}", "trainer.max_steps=1", "optim.lr=0", "optim.min_lr=0",
             "data.eval_path=null"])
        [init] = sorted((root / "init" / "checkpoints").glob("*-last"))
        variants = {
            "full DFT, frozen copy": [],
            "LoRA-DFT, adapter-free": ["peft.scheme=lora", f"optim.lr={args.lora_lr}",
                                       f"optim.min_lr={args.lora_lr / 10}", *lora_only],
        }
        for name, extra in variants.items():
            run_dir = root / name.split(",")[0].replace(" ", "_")
            seconds, peak = run([*train, f"run.dir={run_dir}", f"model.init_from={init}",
                                 f"trainer.max_steps={args.steps}", *extra])
            rows[name] = summary(run_dir, seconds, peak)
    print(f"model: hidden {args.hidden}, {args.layers} layers; {args.steps} steps of reference-based DFT "
          f"on the demo task; one process per variant")
    header = f"{'variant':<24} {'trainable':>10} {'Adam MiB':>9} {'peak RSS MiB':>13} {'held-out acc':>14} {'s':>6}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        accuracy = f"{r['acc_before']:.2f} -> {r['acc_after']:.2f}" if r["acc_after"] is not None else "-"
        print(f"{name:<24} {r['trainable']:>10,} {r['adam_mib']:>9.2f} {r['peak_rss_mib']:>13.0f} {accuracy:>14} "
              f"{r['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
