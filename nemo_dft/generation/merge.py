"""Merging shard files into the final 1-to-m dataset, refusing anything incomplete or inconsistent.

Checks, each with an error that names the shard: every shard 0..count-1 present and no file of
another shard count; one settings fingerprint; slices that tile the input; each shard holding
exactly the ids of its slice; ids unique across shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_dft.generation.shards import (
    FORMAT_VERSION,
    METADATA_KEY,
    SHARD_DIR,
    ids_digest,
    parse_shard_name,
    read_shard,
    shard_path,
)
from nemo_dft.generation.shards import write_shard as _write

MERGED_NAME = "negatives.parquet"


class MergeError(ValueError):
    """The shards cannot be merged; the message names the shard file and the problem."""


@dataclass
class MergeReport:
    path: Path
    num_rows: int
    num_negatives: int
    counts: dict[str, int]


def count_from_names(out_dir: str | Path) -> int | None:
    """The shard count that the names of the shard files carry (``shard-00000-of-00002``), when
    they all carry the same one; None when there are none or they disagree."""
    counts = {parsed[1] for path in (Path(out_dir) / SHARD_DIR).glob("shard-*.parquet")
              if (parsed := parse_shard_name(path.name)) is not None}
    return counts.pop() if len(counts) == 1 else None


def _check_shard_files(out_dir: Path, count: int) -> None:
    shard_dir = out_dir / SHARD_DIR
    if not shard_dir.is_dir():
        raise MergeError(f"{shard_dir}: no shard directory; run scripts/generate_negatives.py first")
    stray = []
    present = set()
    for path in sorted(shard_dir.glob("shard-*.parquet")):
        parsed = parse_shard_name(path.name)
        if parsed is None or parsed[1] != count:
            stray.append(path.name)
        else:
            present.add(parsed[0])
    if stray:
        raise MergeError(
            f"{shard_dir}: files that are not shards of {count} ({stray}); "
            "set shard.count to the count used for generation, or move them away"
        )
    missing = sorted(set(range(count)) - present)
    if missing:
        raise MergeError(
            f"{shard_dir}: {len(missing)} of {count} shards missing: indices {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; rerun the generator (finished shards are skipped)"
        )


def merge_shards(out_dir: str | Path, count: int, output: str | Path | None = None) -> MergeReport:
    """Check the ``count`` shards under ``out_dir`` and write them, in input order, to ``output``
    (default ``out_dir/negatives.parquet``), atomically."""
    out_dir = Path(out_dir)
    _check_shard_files(out_dir, count)
    all_rows: list[dict[str, Any]] = []
    seeds: list[Any] = []
    counts: dict[str, int] = {}
    owner: dict[Any, int] = {}
    all_dropped: list[Any] = []
    first: dict[str, Any] | None = None
    expected_start = 0
    for index in range(count):
        path = shard_path(out_dir, index, count)
        try:
            rows, meta = read_shard(path)
        except ValueError as err:
            raise MergeError(str(err)) from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise MergeError(
                f"{path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}"
            )
        first = first or meta
        if meta["fingerprint"] != first["fingerprint"]:
            raise MergeError(
                f"{path}: generated with other settings (fingerprint {meta['fingerprint']}) than shard 0 "
                f"({first['fingerprint']}); regenerate it with the same config"
            )
        shard = meta["shard"]
        if shard["index"] != index or shard["start"] != expected_start:
            raise MergeError(
                f"{path}: covers rows [{shard['start']}, {shard['stop']}), "
                f"expected to start at {expected_start}"
            )
        expected_start = shard["stop"]
        ids = [row["id"] for row in rows]
        for position, example_id in enumerate(ids):
            if example_id in owner:
                raise MergeError(
                    f"{path}: row {position}: duplicate id {example_id!r}, also in shard {owner[example_id]}"
                )
            owner[example_id] = index
        dropped = meta.get("dropped_ids", [])  # prompts left out by filter.on_short=drop
        if len(rows) + len(dropped) != shard["stop"] - shard["start"] or ids_digest(ids) != meta["ids_sha256"]:
            raise MergeError(
                f"{path}: holds {len(rows)} rows whose ids do not match the {shard['stop'] - shard['start']} "
                "ids of its input slice (incomplete or altered shard); delete it and rerun the generator"
            )
        all_rows.extend(rows)
        all_dropped.extend(dropped)
        seeds.extend(meta["seeds"])
        for key, value in meta["counts"].items():  # rounds: the most any shard ran; the rest add up
            counts[key] = max(counts.get(key, 0), value) if key.endswith("_rounds") else counts.get(key, 0) + value
    assert first is not None
    if expected_start != first["num_input_examples"]:
        raise MergeError(
            f"{out_dir}: the shards cover {expected_start} of {first['num_input_examples']} examples"
        )
    target = Path(output) if output else out_dir / MERGED_NAME
    per_shard = {"shard", "seeds", "counts", "ids_sha256", "dropped_ids"}
    metadata = {key: value for key, value in first.items() if key not in per_shard}
    metadata.update({"shard_count": count, "num_rows": len(all_rows), "counts": counts, "seeds": seeds,
                     **({"dropped_ids": all_dropped} if all_dropped else {})})
    _write(target, all_rows, metadata)
    return MergeReport(
        path=target, num_rows=len(all_rows), num_negatives=first["settings"]["sampling"]["n"], counts=counts
    )


__all__ = ["MERGED_NAME", "METADATA_KEY", "MergeError", "MergeReport", "merge_shards"]
