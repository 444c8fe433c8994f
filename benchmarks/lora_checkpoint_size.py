"""Size on disk of a LoRA run's checkpoint with ``peft.checkpoint=full`` (every weight) and with
``peft.checkpoint=adapters`` (the adapters, their Adam state and the run's state; the base is
reloaded from ``model.init_from``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/lora_checkpoint_size.py [--hidden 128] [--layers 2] \
        [--steps 2] [key=value ...]

A base checkpoint of the given shape (the demo's model by default, random init), then the same LoRA
run from it with each setting, one process each; the sizes are ``du -sb`` (allocated blocks, as
``du -s`` counts them, in bytes) of the final ``step=N-last`` directory and of its ``weights/`` part
(``context/``, the model config and tokenizer, is the same in both).  Extra ``key=value`` arguments
go to the LoRA runs (e.g. ``peft.dim=16``).  Prints a table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    """Bytes of allocated blocks under ``path`` (``du -s --block-size=1``)."""
    return int(subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def train(*args: str) -> None:
    result = subprocess.run([sys.executable, "scripts/train_dft.py", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train_dft.py {' '.join(args)} failed:\n{result.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    shape = [f"model.config.hidden_size={args.hidden}", f"model.config.num_layers={args.layers}",
             f"model.config.ffn_hidden_size={3 * args.hidden}", f"model.config.kv_channels={args.hidden // 4}"]
    common = ["trainer.progress_bar=false", "log.tensorboard=false", "data.eval_path=null", *shape]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dft-lora-ckpt-") as tmp:
        root = Path(tmp)
        train(*common, f"run.dir={root / 'base'}", "trainer.max_steps=1", "optim.lr=0", "optim.min_lr=0")
        [base] = sorted((root / "base" / "checkpoints").glob("*-last"))
        rows["base (model.init_from)"] = (du(base), du(base / "weights"))
        for setting in ("full", "adapters"):
            run_dir = root / setting
            train(*common, f"run.dir={run_dir}", f"model.init_from={base}", f"trainer.max_steps={args.steps}",
                  "peft.scheme=lora", f"peft.checkpoint={setting}", *args.overrides)
            [last] = sorted((run_dir / "checkpoints").glob("*-last"))
            rows[f"LoRA, peft.checkpoint={setting}"] = (du(last), du(last / "weights"))
    print(f"model: hidden {args.hidden}, {args.layers} layers; LoRA {' '.join(args.overrides) or 'defaults'}")
    header = f"{'checkpoint':<32} {'step dir MiB':>13} {'weights/ MiB':>13}"
    print(header)
    print("-" * len(header))
    for name, (total, weights) in rows.items():
        print(f"{name:<32} {total / 2**20:>13.2f} {weights / 2**20:>13.2f}")


if __name__ == "__main__":
    main()
