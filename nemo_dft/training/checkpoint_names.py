"""Checkpoint names that count steps like metrics.jsonl and the messages do, and a final save
that never depends on the checkpoint interval.

NeMo logs ``step`` before the optimizer step, so its ``{step}`` in a checkpoint name is one less
than the number of steps trained (``step=8-last`` after 9 steps).  Here the name uses the trainer's
global step, the number of completed optimizer steps, as everything else does.

NeMo's end-of-training save depends on the validation interval (``1.0 % global_step``), so a run of
one step with ``checkpoint.every_n_steps`` above 1 ended with no checkpoint at all; the final step
is saved here whatever the interval, so that every finished run can be resumed and exported.
"""

from __future__ import annotations

import torch
from nemo import lightning as nl


class StepCheckpoint(nl.ModelCheckpoint):
    def _monitor_candidates(self, trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["step"] = torch.tensor(trainer.global_step)
        return candidates

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not trainer.fast_dev_run and trainer.global_step > 0:
            candidates = self._monitor_candidates(trainer)
            if self.last_model_path != self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST):
                self._save_last_checkpoint(trainer, candidates)  # NeMo's own check then finds it saved
        super().on_train_end(trainer, pl_module)
