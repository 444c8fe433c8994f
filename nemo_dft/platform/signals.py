"""Signals a long run stops on: parsing their names, and a latch that records one arrived.

Shared by training (nemo_dft.training.preemption) and the scoring pass (nemo_dft.reference.scoring):
the handler only records the signal, so the step or collective it interrupts finishes, and the
caller stops at a safe point with :data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run again with the same run.dir
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, no checkpoint of the current step


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
    interrupts (a step, a collective) finishes and the caller acts at a safe point.  A second
    SIGINT (Ctrl-C pressed again) ends the process at once with :data:`EXIT_INTERRUPTED`."""

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
        if self.received and signum == signal.SIGINT:  # a second Ctrl-C: the user wants out now
            logger.warning("second SIGINT: exiting at once, without a checkpoint (exit %d)", EXIT_INTERRUPTED)
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
        if not self.received:
            logger.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.received = True
