"""One node per data directory: an exclusive lock held for the node's whole life."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from tessera.core.errors import TesseraError


class DataDirInUse(TesseraError):
    """Another process holds the data directory."""

    def __init__(self, data_dir: Path, holder: int | None) -> None:
        who = f"node pid {holder}" if holder else "another process"
        super().__init__(
            f"the data directory {data_dir} is in use by {who}; stop it first "
            "(or pass another --data-dir)", reason="DATA_DIR_IN_USE")
        self.holder = holder


class DataDirLock:
    """flock(LOCK_EX) on <data_dir>/node.lock; the file holds the owner's pid.

    The kernel drops the lock when the owner exits however it dies, so a stale lock file
    never blocks a start. Children do not inherit it (the descriptor is close-on-exec).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirInUse naming the holder's pid."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.path.parent, holder_pid(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; its content is meaningless without the lock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def holder_pid(path: Path) -> int | None:
    """The pid written by the lock's holder, if any."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None

