"""Stage-by-stage progress for conversions, which take minutes and tens of GB for 7B models.

Lines go to stderr with a ``[convert]`` prefix so they stand out from NeMo's own logging; HF's
shard loading adds its own progress bar for sharded checkpoints.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any


def note(message: str) -> None:
    """One progress line."""
    print(f"[convert] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """Announce a stage, then report how long it took."""
    note(f"{label} ...")
    start = time.perf_counter()
    yield
    note(f"{label}: done in {time.perf_counter() - start:.1f} s")


def describe_weights(module: Any) -> str:
    """Parameter count and size of a module, for the progress log."""
    seen: set[int] = set()
    count = size = 0
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count += param.numel()
        size += param.numel() * param.element_size()
    return f"{count / 1e6:.2f} M parameters, {size / 2**30:.2f} GiB"
