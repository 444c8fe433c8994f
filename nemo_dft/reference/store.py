"""The reference log-prob file: Parquet (no pickle), one row per scored sequence, fingerprinted.

Rows: ``id`` (the example id, JSON-encoded so that 1 and "1" stay apart), ``epoch`` (the training
epoch whose group was scored), ``column`` (``generated_k``: only negatives are scored; files and
shards written before that also hold ``real`` rows, which are read and ignored), ``logp`` (the summed
response log-prob, fp32) and ``tokens`` (response tokens).  The scoring pass writes complete
shards atomically into ``<output>.partial/``; a rerun skips the groups they hold, and the merge
into ``<output>`` (also atomic) checks that every group is there exactly once.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nemo_dft.data.io import write_parquet_atomic
from nemo_dft.reference import fingerprint as fp

METADATA_KEY = "nemo_dft.ref_logps"
FORMAT_VERSION = 1
_SHARD = re.compile(r"^shard-(\d{3,})-(\d{5,})\.parquet$")

GroupKey = tuple[str, int]  # (JSON-encoded id, epoch)


def encode_id(example_id: Any) -> str:
    return json.dumps(example_id)


def partial_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial")


def read_file(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and metadata of a shard or merged file; errors name the file."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from err
    raw = (schema.metadata or {}).get(METADATA_KEY.encode())
    if raw is None:
        raise ValueError(f"{path}: no '{METADATA_KEY}' metadata; not written by scripts/precompute_ref_logps.py")
    metadata = json.loads(raw)
    if metadata.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {metadata.get('format')} is not the supported {FORMAT_VERSION}")
    return pq.read_table(path).to_pylist(), metadata


def check_fingerprint(path: str | Path, metadata: dict[str, Any], expected: dict[str, str]) -> None:
    """Raise ValueError naming every component in which ``metadata``'s fingerprint differs."""
    names = fp.differences(expected, metadata.get("fingerprint", {}))
    if names:
        raise ValueError(fp.explain(path, names))


class ShardWriter:
    """Collects scored groups and writes them as numbered shards of ``groups_per_shard`` groups."""

    def __init__(self, output: str | Path, fingerprint: dict[str, str], groups_per_shard: int) -> None:
        self.directory = partial_dir(output)
        self.fingerprint = fingerprint
        self.groups_per_shard = groups_per_shard
        self.attempt = 1 + max((int(m.group(1)) for m in map(_SHARD.match, _names(self.directory)) if m), default=0)
        self.sequence = 0
        self.rows: list[dict[str, Any]] = []
        self.groups = 0

    def add_group(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.groups += 1
        if self.groups >= self.groups_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        path = self.directory / f"shard-{self.attempt:03d}-{self.sequence:05d}.parquet"
        metadata = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint}
        write_parquet_atomic(self.rows, path, metadata={METADATA_KEY: json.dumps(metadata)})
        self.sequence += 1
        self.rows, self.groups = [], 0


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def completed_groups(output: str | Path, fingerprint: dict[str, str]) -> dict[GroupKey, list[dict[str, Any]]]:
    """Groups already scored by earlier attempts; shards of a different fingerprint are an error."""
    directory = partial_dir(output)
    done: dict[GroupKey, list[dict[str, Any]]] = {}
    for name in _names(directory):
        if not _SHARD.match(name):
            continue  # temporary files of an interrupted write
        rows, metadata = read_file(directory / name)
        try:
            check_fingerprint(directory / name, metadata, fingerprint)
        except ValueError as err:
            raise ValueError(f"{err} (or delete {directory} to start the pass afresh)") from err
        for row in rows:
            done.setdefault((row["id"], row["epoch"]), []).append(row)
    return done


def merge(
    output: str | Path,
    fingerprint: dict[str, str],
    expected: Iterable[tuple[GroupKey, list[str]]],
    description: dict[str, Any],
) -> int:
    """Write ``output`` from the shards: every expected group with exactly its columns, in the
    expected order.  Returns the number of rows; removes the shards once the file is in place."""
    done = completed_groups(output, fingerprint)
    rows: list[dict[str, Any]] = []
    missing = []
    for key, columns in expected:
        group = {row["column"]: row for row in done.get(key, []) if row["column"] in columns}
        if sorted(group) != sorted(columns):
            missing.append(key)
            continue
        rows.extend(group[c] for c in columns)
    if missing:
        raise RuntimeError(f"{partial_dir(output)}: {len(missing)} groups were not scored, e.g. (id, epoch) = "
                           f"{missing[:3]}; rerun the scoring pass to complete them")
    metadata = {"format": FORMAT_VERSION, "fingerprint": fingerprint, **description}
    write_parquet_atomic(rows, output, metadata={METADATA_KEY: json.dumps(metadata)})
    shutil.rmtree(partial_dir(output))
    return len(rows)
