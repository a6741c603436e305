"""One writer per run folder: an advisory `fcntl` lock on `<run>/.lock`, held for the whole life of the writer.

The OS drops the lock when its process ends however it ends (exit, crash, kill -9), so a lock is never stale and
nothing has to clean it up. The file also holds the holder's PID, so a second writer can say who holds the folder.
Readers (sampling, plotting) do not lock; writers (train.py, a resume, an export into the run folder) do.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".lock"


class RunLocked(ConfigError):
    """Another live process is writing this run folder."""


class RunLock:
    """`with RunLock(run_dir, "--out"):` holds the folder's lock or raises RunLocked naming the holder's PID."""

    def __init__(self, run_dir: Path, flag: str = "--out"):
        self.run_dir, self.flag, self._fd = Path(run_dir), flag, None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.flag} {self.run_dir}: another process (PID {holder}) is writing this run; wait "
                            f"for it to finish (or stop it), or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        # The file stays: deleting it would let a third process lock a new inode while a second still waits on
        # the old one. Closing the descriptor drops the lock.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
