"""Checkpoint names that count steps like metrics.jsonl and the messages do.

NeMo logs ``step`` before the optimizer step, so its ``{step}`` in a checkpoint name is one less
than the number of steps trained (``step=8-last`` after 9 steps).  Here the name uses the trainer's
global step, the number of completed optimizer steps, as everything else does.
"""

from __future__ import annotations

import torch
from nemo import lightning as nl


class StepCheckpoint(nl.ModelCheckpoint):
    def _monitor_candidates(self, trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["step"] = torch.tensor(trainer.global_step)
        return candidates
