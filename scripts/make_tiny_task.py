"""Regenerate the embedded demo task shipped in nemo_dft/demo/assets/tiny_task."""

from __future__ import annotations

import argparse
from pathlib import Path

from nemo_dft.demo.tiny_task import ASSET_DIR, write_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output directory")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-heldout", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_task(args.out, args.num_train, args.num_heldout, args.seed)
    print(f"wrote {args.out}/train.jsonl and {args.out}/heldout.jsonl")


if __name__ == "__main__":
    main()
