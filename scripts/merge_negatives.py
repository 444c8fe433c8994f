"""Merge the generated shards into one dataset after checking they are complete and consistent.

Usage: python scripts/merge_negatives.py [--config FILE] [key=value ...]
Uses output.dir, shard.count and merge.output (default: <output.dir>/negatives.parquet).
Without shard.count (or with its default, 1) the count is read from the shard names
(shard-00000-of-00004.parquet: 4) when they all carry the same one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from omegaconf import DictConfig  # noqa: E402

from nemo_dft.generation.cli import main  # noqa: E402
from nemo_dft.generation.config import validate_for_merge  # noqa: E402
from nemo_dft.generation.merge import count_from_names, merge_shards  # noqa: E402


def _merge(cfg: DictConfig) -> None:
    validate_for_merge(cfg)
    count = int(cfg.shard.count)
    if count == 1:  # the default: the shard names carry the count
        count = count_from_names(cfg.output.dir) or 1
    report = merge_shards(cfg.output.dir, count, cfg.merge.output)
    print(
        f"[merge_negatives] wrote {report.num_rows} rows x {report.num_negatives} negatives "
        f"to {report.path}; counts {report.counts}"
    )


if __name__ == "__main__":
    sys.exit(main("merge_negatives.py", __doc__, _merge))
