"""Shard layout on disk: deterministic contiguous splits, one atomically written Parquet file each.

A shard file exists only once complete (``write_parquet_atomic`` renames a finished temporary
file), so its presence is what resume and merge rely on.  Its schema metadata records the
settings fingerprint, the input slice it covers and a hash of the ids it should hold.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from nemo_dft.data.io import write_parquet_atomic

METADATA_KEY = "nemo_dft.generation"
FORMAT_VERSION = 1
SHARD_DIR = "shards"
_SHARD_NAME = re.compile(r"^shard-(\d{5})-of-(\d{5})\.parquet$")


def shard_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of shard ``index``: contiguous, sizes differ by at most one, tiling [0, N)."""
    return num_examples * index // count, num_examples * (index + 1) // count


def shard_path(out_dir: str | Path, index: int, count: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"shard-{index:05d}-of-{count:05d}.parquet"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(index, count) of a shard file name, or None for anything else (temporary files...)."""
    match = _SHARD_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def ids_digest(ids: list[Any]) -> str:
    """Order-sensitive hash of a list of ids, to check that a shard holds exactly its slice."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def write_shard(path: Path, rows: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
    write_parquet_atomic(rows, path, metadata={METADATA_KEY: json.dumps(metadata)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The generation metadata of a shard or merged file; errors name the file."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY.encode())
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from err
    if raw is None:
        raise ValueError(f"{path}: no '{METADATA_KEY}' metadata; not written by the negative generator")
    return json.loads(raw)


def read_shard(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and generation metadata of one shard file."""
    import pyarrow.parquet as pq

    metadata = read_metadata(path)
    return pq.read_table(path).to_pylist(), metadata
