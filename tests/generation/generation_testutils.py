"""Helpers shared by the generation tests (a unique module name: test dirs have no __init__.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nemo_dft.demo.tiny_task import ASSET_DIR

REPO = Path(__file__).resolve().parents[2]


def reference_seed(base: int, example_id: int | str, round_index: int = 0) -> int:
    """The documented seed rule, recomputed here independently of nemo_dft.generation.seeds."""
    digest = hashlib.sha256(json.dumps([base, example_id, round_index]).encode()).hexdigest()
    return int(digest[:8], 16) % 2**31


def task_rows(count: int) -> list[dict[str, Any]]:
    """The first ``count`` tiny-task examples as (id, question, answer)."""
    rows = []
    with open(ASSET_DIR / "train.jsonl", encoding="utf-8") as handle:
        for line, _ in zip(handle, range(count), strict=False):
            row = json.loads(line)
            rows.append({"id": row["id"], "q": row["real"][0]["content"], "a": row["real"][1]["content"]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def messages_input(path: Path, count: int, field: str = "messages") -> Path:
    rows = [
        {
            "id": r["id"],
            field: [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}],
        }
        for r in task_rows(count)
    ]
    return write_jsonl(path, rows)
