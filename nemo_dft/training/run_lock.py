"""One process tree per ``run.dir``: an advisory ``flock`` on ``run.dir/.lock``.

Two trainings in one directory would both write checkpoints and ``metrics.jsonl``, or one would
resume from a checkpoint the other is rotating away.  Rank 0 takes the lock before anything is
written and keeps it until it exits (the other ranks are started by, or together with, rank 0, so
they never lock).  The file records who holds it (host, pid, start time, Slurm job).

The kernel releases a ``flock`` when its process dies, so a free lock on the same host is
authoritative: a record left by a killed process is taken over with a warning.  Across hosts a
shared file system may not carry ``flock``, so a record from another host is only taken over by the
same Slurm job (a requeue, whose earlier run has ended); otherwise the user removes it by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nemo_dft.config.loading import ConfigError

LOCK_NAME = ".lock"


class RunDirLocked(ConfigError):
    """Another process holds (or may hold) the run directory (exit 2)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    slurm_job_id: str | None = None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"),
                   os.environ.get("SLURM_JOB_ID"))

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host} (started {self.started}{job})"


def _read_holder(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
        return Holder(str(record["host"]), int(record["pid"]), str(record["started"]), record.get("slurm_job_id"))
    except (ValueError, KeyError, TypeError):
        return Holder("an unknown host", -1, f"unreadable record {text[:60]!r}")


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    """``acquire()`` before writing to ``run_dir``; ``release()`` on every way out (also a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise RunDirLocked naming the holder; returns a warning line when a
        record left by an ended process was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = holder.describe() if holder else "another process (starting up)"
                raise RunDirLocked(f"run.dir: {self.path.parent} is in use by {who} (lock {self.path}); "
                                   "wait for it to end, or use another run.dir") from None
            # the holder before us may have removed the file between our open and flock: lock the new one
            if self.path.exists() and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        self._fd = fd
        try:
            warning = self._take_over(_read_holder(fd))
        except RunDirLocked:
            self.release(remove=False)
            raise
        record = json.dumps(asdict(Holder.this_process()))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (record + "\n").encode())
        os.fsync(fd)
        return warning

    def _take_over(self, previous: Holder | None) -> str | None:
        """None for a fresh lock; a warning line for a record its process left behind."""
        if previous is None:
            return None
        me = Holder.this_process()
        if previous.host == me.host:
            state = "is still running but no longer holds it" if _pid_exists(previous.pid) else "no longer exists"
            return f"warning: took over {self.path} left by {previous.describe()}, which {state}"
        if previous.slurm_job_id and previous.slurm_job_id == me.slurm_job_id:
            return f"warning: took over {self.path} left by an earlier run of this Slurm job: {previous.describe()}"
        raise RunDirLocked(
            f"run.dir: {self.path} was left by {previous.describe()}, another host, whose processes this one "
            f"cannot see; if that run has ended, remove {self.path} by hand and start again")

    def release(self, remove: bool = True) -> None:
        """Remove the record (while still locked, so no one takes a file about to vanish) and unlock."""
        if self._fd is None:
            return
        try:
            if remove and self.path.exists() and os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
