"""Leave a finished command without the interpreter's final teardown.

A process that has imported NeMo holds about 9,000 modules; after the atexit handlers, CPython's
finalization tears them down one by one, which takes about 3.4 s on the 2-core machine and changes
nothing outside the process.  Every command (and every rank of a run) pays it once, so a finished
command exits as the interpreter would, minus that teardown: it waits for non-daemon threads, runs
the atexit handlers (logging, multiprocessing, loggers' flushes), flushes stdout and stderr, then
ends the process.  A process that has loaded vLLM keeps the interpreter's exit (its engine
processes are shut down by finalizers), and so does any process with NEMO_DFT_FULL_EXIT=1.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

FULL_EXIT_VARIABLE = "NEMO_DFT_FULL_EXIT"


def exit_after_cleanup(code: int | None) -> NoReturn:
    """``sys.exit(code)`` without the module teardown (``code`` None means 0, as for sys.exit)."""
    if os.environ.get(FULL_EXIT_VARIABLE, "") not in ("", "0") or "vllm" in sys.modules:
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to deliver
            pass
    os._exit(int(code or 0))
