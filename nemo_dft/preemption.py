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

from lightning.pytorch.callbacks import Callback

from nemo_dft.parallel import any_rank

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


class SignalLatch:
    """Remembers that one of ``signals`` arrived; the handler only records it, so the work it
    interrupts (a step, a collective) finishes and the caller acts at a safe point."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = signals
        self.received = False
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if not self.received:
            logger.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.received = True


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
