"""Which checkpoint a (re)started run resumes from, checked before NeMo is set up.

Every checkpoint directory under ``run.dir/checkpoints`` is inspected without loading the model:
an ``-unfinished`` marker, missing ``metadata.json``/``.metadata``/``common.pt``, an unreadable
``common.pt`` or ``.metadata``, and a missing or truncated ``.distcp`` shard (shorter than the
byte ranges its metadata indexes) all make it unusable.  Each unusable one is reported in one
line and moved to ``run.dir/damaged/`` (never deleted); the run resumes from the newest usable
one.  A ``run.dir`` with training history (``metrics.jsonl`` steps or checkpoint directories) but
no usable checkpoint is refused: starting again from step 0 would silently replace that run.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from nemo_dft.config.loading import ConfigError

logger = logging.getLogger(__name__)

UNFINISHED = "-unfinished"


class RecoveryRefused(ConfigError):
    """The run directory has history but nothing to resume from (exit 2)."""


@dataclass(frozen=True)
class Usable:
    path: Path
    step: int


def checkpoint_problem(path: Path) -> tuple[str | None, int]:
    """(why ``path`` cannot be resumed from, or None; its global step when readable)."""
    import torch

    marker = path.with_name(path.name + UNFINISHED)
    if marker.exists():
        return f"{marker} marks it unfinished", -1
    weights = path / "weights"
    for name in ("metadata.json", ".metadata", "common.pt"):
        if not (weights / name).is_file():
            return f"{weights / name} is missing", -1
    try:
        common = torch.load(weights / "common.pt", map_location="cpu", weights_only=False)
        step = int(common["global_step"])
    except Exception as err:  # a damaged file shows up as any of pickle's or zip's errors
        return f"{weights / 'common.pt'} is unreadable ({type(err).__name__}: {err})", -1
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(weights)).read_metadata()
    except Exception as err:
        return f"{weights / '.metadata'} is unreadable ({type(err).__name__}: {err})", step
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = weights / name
        if not shard.is_file():
            return f"{shard} is missing", step
        if shard.stat().st_size < size:
            return f"{shard} is truncated ({shard.stat().st_size} of {size} bytes)", step
    return None, step


def _metrics_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def choose_resume_checkpoint(run_dir: Path, first_rank: bool = True) -> Path | None:
    """The newest usable checkpoint of ``run_dir`` (None for a fresh run); see the module docstring.

    Every rank chooses the same; only the first one (``first_rank``) reports and moves damaged ones.
    """
    directory = run_dir / "checkpoints"
    candidates = sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
    usable: list[Usable] = []
    damaged: list[tuple[Path, str]] = []
    for path in candidates:
        problem, step = checkpoint_problem(path)
        if problem is None:
            usable.append(Usable(path, step))
        else:
            damaged.append((path, problem))
    best = max(usable, key=lambda u: (u.step, u.path.name.endswith("-last")), default=None)
    for path, problem in damaged if first_rank else []:
        target = run_dir / "damaged" / path.name
        print(f"warning: checkpoint {path} cannot be resumed from: {problem}; "
              + f"moved to {target}"
              + (f"; resuming from {best.path.name} (step {best.step})" if best else ""), flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{target.name}.{len(list(target.parent.iterdir()))}")
        shutil.move(str(path), str(target))
        marker = path.with_name(path.name + UNFINISHED)
        if marker.exists():
            shutil.move(str(marker), str(target.with_name(target.name + UNFINISHED)))
    if best is not None:
        return best.path
    steps = _metrics_steps(run_dir)
    if steps or candidates:
        history = []
        if steps:
            history.append(f"metrics.jsonl with {steps} steps")
        if candidates:
            history.append(f"{len(candidates)} checkpoint(s), none usable")
        raise RecoveryRefused(
            f"run.dir: {run_dir} has training history ({', '.join(history)}) but no checkpoint to resume "
            "from; refusing to start again from step 0. Use a new run.dir, or move metrics.jsonl, eval.jsonl "
            "and checkpoints/ out of it to start over"
        )
    return None
