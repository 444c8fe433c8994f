"""Graceful stop on a scheduler's signal: finish the step, checkpoint, exit for a requeue.

Slurm sends SIGTERM on preemption and, with ``--signal=USR1@T``, SIGUSR1 before the time limit,
to every task, though not at the same instant.  Each rank only records the signal; after every
optimizer step the ranks agree (an all-reduce) on whether any rank received one, so all of them
stop after the same step and save a complete checkpoint (with the optimizer) together, through
the checkpoint callback, before Lightning ends training; the script then exits with
:data:`EXIT_PREEMPTED`, the sign to requeue, and the next start resumes from that checkpoint.

Lightning's own SIGTERM handler would raise on each rank as soon as it saw the signal, without
a checkpoint and without agreeing with the other ranks, so it is replaced while training runs.
"""

from __future__ import annotations

import logging
import signal

from lightning.pytorch.callbacks import Callback

from nemo_dft.platform.collectives import any_rank
from nemo_dft.platform.signals import SignalLatch

logger = logging.getLogger(__name__)


class PreemptionStop(Callback):
    """Stops training after the step during which any rank received one of ``signals``."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.latch = SignalLatch(signals)
        self.preempted = False  # training stopped because some rank received a signal

    def on_train_start(self, trainer, pl_module) -> None:
        # Registered after Lightning's signal connector, so this handler replaces its SIGTERM one.
        self.latch.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if any_rank(self.latch.received):
            self.preempted = True
            trainer.should_stop = True
            _save_last_checkpoint(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.latch.restore()


def _save_last_checkpoint(trainer) -> None:
    """Save the "-last" checkpoint of this step now (NeMo's end-of-training save skips steps that
    fall on the validation interval); the end-of-training hook then finds it already written."""
    callback = trainer.checkpoint_callback
    if callback is None:
        raise RuntimeError("preemption needs a checkpoint callback to save the run")
    candidates = callback._monitor_candidates(trainer)
    if callback.last_model_path != callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST):
        callback._save_last_checkpoint(trainer, candidates)
