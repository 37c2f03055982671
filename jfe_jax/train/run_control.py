"""Whether a training workdir is in use, stopped part way, or complete.

One trainer per workdir: ``WorkdirLock`` holds ``<workdir>/.jfe-train.lock`` (an flock, which
the OS releases when the process dies, plus who holds it for the refusal message), taken by
host 0 of a run through ``lock_workdir``. A run stopped by SIGTERM or Ctrl-C raises
``TrainingInterrupted`` after its checkpoint is saved, so no caller can take it for a finished
one; ``train_summary.json`` says whether the last step was reached (``training_completed``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jfe_jax.workdir import Workdir

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGTERM or a first Ctrl-C stopped training after ``step`` of ``total_steps``; the
    checkpoint of that step is saved and closed, and rerunning resumes from it."""

    def __init__(self, step: int, total_steps: int, checkpoint_dir: str, stage: str = ""):
        super().__init__(step, total_steps, checkpoint_dir)
        self.step, self.total_steps, self.checkpoint_dir = step, total_steps, checkpoint_dir
        self.stage = stage  # set by callers running several stages (``jfe demo``)

    def __str__(self) -> str:
        prefix = f"{self.stage} " if self.stage else ""
        return (
            f"{prefix}stopped at step {self.step} of {self.total_steps} (checkpoint saved); "
            "rerun the same command to resume"
        )


def training_completed(workdir: str, num_steps: int) -> bool:
    """Whether the run in ``workdir`` reached step ``num_steps`` (its train_summary.json)."""
    path = epath.Path(Workdir(workdir).train_summary)
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    return summary.get("completed") is True and summary.get("step") == num_steps


class WorkdirLock:
    """``with WorkdirLock(workdir):`` refuses (ValueError) while another process holds it.

    A lock file left by a process that died is taken over with a warning. Object-store
    workdirs (``gs://...``) have no flock and are not locked.
    """

    def __init__(self, workdir: str):
        self.workdir = str(workdir)
        self.path = Workdir(self.workdir).lock
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        if "://" in self.workdir:
            log.debug("no lock on %s: object stores have no flock", self.workdir)
            return
        import fcntl

        os.makedirs(self.workdir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise ValueError(
                    f"workdir {self.workdir} is in use by jfe train pid "
                    f"{holder.get('pid', '?')} on host {holder.get('host', '?')} since "
                    f"{holder.get('started', '?')}; wait for it or stop it"
                ) from None
            # The holder removes the file before releasing it: if it did so between our open
            # and our flock, we hold a lock on a file nobody else will open. Start again.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = _read_record(fd)
        if previous:
            log.warning(
                "taking over the lock of %s from jfe train pid %s on host %s (since %s), "
                "which is no longer running",
                self.workdir,
                previous.get("pid", "?"),
                previous.get("host", "?"),
                previous.get("started", "?"),
            )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so no one locks a file being removed
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[None]:
    """Process 0 holds the workdir's lock; every host raises if another trainer holds it."""
    lock = WorkdirLock(workdir)
    refusal = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except ValueError as e:
            refusal = e
    if jax.process_count() > 1:
        refused = multihost_utils.process_allgather(np.array(refusal is not None))
        if refused.any() and refusal is None:
            refusal = ValueError(f"workdir {workdir} is in use by another trainer (see host 0)")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        lock.release()


def _read_record(fd: int) -> dict:
    """The lock holder's {host, pid, started}; {} when empty or unreadable."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
