"""Training runs shared between the modules that compare layouts (parallel layouts, packing):
a run with the same process count and overrides is made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


class SharedRuns:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[tuple, Path] = {}

    def get(self, nproc: int, *overrides: str) -> Path:
        """The run directory of ``scripts/train_dft.py`` with the layout tests' common settings
        and ``overrides`` on ``nproc`` processes, trained on first use."""
        from tests.training.test_parallel_layouts import launch

        key = (nproc, overrides)
        if key not in self.done:
            run_dir = self.root / f"run{len(self.done)}"
            launch(run_dir, nproc, *overrides)
            self.done[key] = run_dir
        return self.done[key]


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> SharedRuns:
    return SharedRuns(tmp_path_factory.mktemp("shared_runs"))
