"""Reading and writing tabular datasets: JSONL, Parquet and saved HF ``datasets`` directories."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class DataFormatError(ValueError):
    """A dataset file cannot be read; the message names the file and, where known, the row."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{path}:{line_number}: column {err.start + 1}: byte {raw[err.start]:#04x} is not valid UTF-8"
                ) from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{line_number}: column {err.colno}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_parquet(paths: list[Path]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a JSONL file, a Parquet file or directory, or a saved HF dataset, in order."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                raise DataFormatError(
                    f"{path}: a DatasetDict with splits {sorted(loaded)}; point at one split's directory"
                )
            return loaded.to_list()
        parquet_files = sorted(path.glob("*.parquet"))
        if parquet_files:
            return _read_parquet(parquet_files)
        raise DataFormatError(f"{path}: directory holds neither a saved HF dataset nor *.parquet files")
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json"}:
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet([path])
    raise DataFormatError(f"{path}: unsupported extension {suffix!r} (expected .jsonl, .json or .parquet)")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` via a temporary name and a rename, so a crash never leaves a partial file
    (the file gets the umask's mode, like any other output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_parquet_atomic(
    rows: list[dict[str, Any]], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write rows as one Parquet file via a temporary name and a rename, so readers never see
    a partial file.  ``metadata`` goes into the file's schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; the file is for the whole group
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_group_readable(directory: str | Path) -> None:
    """Give every file under ``directory`` the mode the umask allows (0644 under 022).

    Libraries that write through a private temporary file (safetensors does) leave 0600 files,
    which the rest of a cluster group cannot read."""
    mode = 0o666 & ~umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)
