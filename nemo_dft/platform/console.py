"""The console policy: what a run prints, and where everything else goes.

By default the console shows this project's own messages, the progress bar, warnings that matter
to the user and the final summary.  NeMo, Megatron and Lightning INFO messages, and warnings known
to be harmless (missing optional packages, deprecations inside the libraries), go to
``<run.dir>/logs/console/rank<N>.log`` only (appended to by every start of the run).  ``verbose=True``
prints everything on the console as well.

NeMo logs through its own non-propagating logger with its own stream handlers, created when NeMo
is imported; :func:`configure` (called before any NeMo import) diverts that logger's records to
our handlers, and :func:`adopt_nemo_logging` (called right after the import) also hands our
handlers to the Megatron loggers NeMo wires up later.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from logging.handlers import MemoryHandler
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = ("nemo_dft", "__main__")
# Loggers that print through a console handler of their own (records then reach ours via the root).
LIBRARY_CONSOLE_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                           "lightning_fabric")

# Warnings that every CPU or minimal install triggers and that ask nothing of the user.
HARMLESS = tuple(re.compile(p) for p in (
    r"pynvml package is deprecated",
    r"Transformer Engine and Apex are not installed",
    r"transformer_engine not installed",
    r"Failed to create unified memory mempool",
    r"has reached end of life",
    r"OneLogger",
    r"No exporters were provided",
    r"module could not be imported: cannot import name",
    r"update_logger_directory is False",
    r"already contains a ModelCheckpoint callback",
    r"no checkpoints found in checkpoint_dir",
    r"It is recommended to use `self\.log\(",
    r"The `srun` command is available on your system",
    r"Checkpoint directory .* exists and is not empty",
    r"ckpt_load_strictness",
    r"torch\.distributed\.reduce_op",
    r"NeMoLogger is logging to .*, but it already exists",
    r"`torch\.cuda\.amp\.",
    r"Please use the new API settings to control TF32",
))
# The same, for child processes (PYTHONWARNINGS: action:message prefix:category).
CHILD_WARNING_FILTERS = ("ignore:The pynvml package is deprecated:FutureWarning",)


def process_rank() -> int:
    """The global rank from the launcher's environment (torchrun, Slurm, Lightning's own launcher)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_harmless(message: str) -> bool:
    return any(pattern.search(message) for pattern in HARMLESS)


class ConsoleFilter(logging.Filter):
    """Our own INFO and up; other libraries' warnings and errors unless known to be harmless; on
    ranks other than 0 only errors (rank 0 speaks for the run)."""

    def __init__(self, verbose: bool, rank: int) -> None:
        super().__init__()
        self.verbose = verbose
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0 and record.levelno < logging.ERROR:
            return False
        if self.verbose:
            return True
        if record.name.split(".")[0] in OWN_LOGGERS:
            return record.levelno >= logging.INFO
        if record.levelno < logging.WARNING:
            return False
        return record.levelno >= logging.ERROR or not is_harmless(record.getMessage())


class _Divert(logging.Filter):
    """Placed on NeMo's logger: gives each record to our handlers and stops it there, so that NeMo's
    own stream handlers never print it."""

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self.handlers = handlers

    def filter(self, record: logging.LogRecord) -> bool:
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        return False


_handlers: list[logging.Handler] = []


def log_file_for(run_dir: str | Path, rank: int | None = None) -> Path:
    """``logs/console/rank<N>.log``: a folder, because NeMo moves the files at the top of logs/ into
    logs/run_<k>/ when a run starts there again."""
    rank = process_rank() if rank is None else rank
    return Path(run_dir) / "logs" / "console" / f"rank{rank}.log"


def configure(run_dir: str | Path | None, verbose: bool = False) -> Path | None:
    """Set the console policy for this process (before NeMo, Megatron or Lightning is imported);
    returns the log file.  Without ``run_dir`` (before the config is read) records are kept in
    memory and written to the file of the next call that names one."""
    rank = process_rank()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG)
    console.addFilter(ConsoleFilter(verbose, rank))
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handlers: list[logging.Handler] = [console]
    if run_dir is None:  # kept until the run directory is known (a later call)
        log_file, keeper = None, MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    else:
        log_file = log_file_for(run_dir, rank)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        keeper = logging.FileHandler(log_file, encoding="utf-8")
        keeper.setFormatter(logging.Formatter(FORMAT))
        keeper.stream.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    keeper.setLevel(logging.INFO)
    handlers.append(keeper)
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        if isinstance(handler, MemoryHandler):
            handler.setTarget(keeper)
        handler.close()  # a buffer passes what it kept to the new file
    _handlers[:] = handlers
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings become records of "py.warnings"
    if not verbose:  # processes started from this one (checkpoint writers) import torch afresh
        quiet = ",".join(CHILD_WARNING_FILTERS)
        previous = os.environ.get("PYTHONWARNINGS", "")
        if quiet not in previous:
            os.environ["PYTHONWARNINGS"] = f"{previous},{quiet}" if previous else quiet
    nemo = logging.getLogger("nemo_logger")
    for existing in [f for f in nemo.filters if isinstance(f, _Divert)]:
        nemo.removeFilter(existing)
    nemo.addFilter(_Divert(handlers))
    return log_file


def adopt_library_logging() -> None:
    """After NeMo is imported: drop the console handlers NeMo and Lightning install on their own
    loggers and register ours with NeMo, so that the Megatron loggers NeMo equips with its handlers
    (when its logger is set up) print through our policy too."""
    if not _handlers:
        return
    from nemo.utils import logging as nemo_logging

    nemo_logging.remove_stream_handlers()
    for index, handler in enumerate(_handlers):
        nemo_logging._handlers[f"nemo_dft_{index}"] = handler
    for name in LIBRARY_CONSOLE_LOGGERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler and handler not in _handlers:
                library.removeHandler(handler)
