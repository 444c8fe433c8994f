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
from types import FrameType

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run again with the same run.dir


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1"]`` -> signals; unknown names raise ValueError naming the config key."""
    parsed = []
    for name in names:
        key = name if name.startswith("SIG") else f"SIG{name}"
        if key not in signal.Signals.__members__ or key in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"trainer.preemption_signals: {name!r} is not a signal that can be caught")
        parsed.append(signal.Signals[key])
    return parsed


class PreemptionStop(Callback):
    """Stops training after the step during which any rank received one of ``signals``."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = signals
        self.requested = False  # this rank received a signal
        self.preempted = False  # training stopped because some rank did
        self._previous: dict[signal.Signals, object] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if not self.requested:
            logger.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.requested = True

    def on_train_start(self, trainer, pl_module) -> None:
        # Registered after Lightning's signal connector, so this handler replaces its SIGTERM one.
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._any_rank_requested():
            self.preempted = True
            trainer.should_stop = True
            _save_last_checkpoint(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _any_rank_requested(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _save_last_checkpoint(trainer) -> None:
    """Save the "-last" checkpoint of this step now (NeMo's end-of-training save skips steps that
    fall on the validation interval); the end-of-training hook then finds it already written."""
    callback = trainer.checkpoint_callback
    if callback is None:
        raise RuntimeError("preemption needs a checkpoint callback to save the run")
    candidates = callback._monitor_candidates(trainer)
    if callback.last_model_path != callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST):
        callback._save_last_checkpoint(trainer, candidates)
