"""Generate K negatives per prompt from the base model (vLLM or HF) into resumable Parquet shards.

Usage: python scripts/generate_negatives.py [--config FILE] [key=value ...]
With shard.index=null every shard runs in this process and the result is merged at the end;
with shard.index=i only shard i runs (one Slurm array task), and scripts/merge_negatives.py merges.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from omegaconf import DictConfig  # noqa: E402

from nemo_dft.generation.cli import main  # noqa: E402
from nemo_dft.generation.runner import run_generation  # noqa: E402


def _generate(cfg: DictConfig) -> None:
    run_generation(cfg)


if __name__ == "__main__":  # required: vLLM starts its engine core with multiprocessing spawn
    sys.exit(main("generate_negatives.py", __doc__, _generate))
