"""One writer per folder: an OS-level exclusive lock (``fcntl.flock``) held for a whole run.

The lock lives in ``<folder>/.lock``, which records the holder's pid for the error message, and is
removed on release. The operating system drops the lock when the holder exits, however it exits,
so a killed run never leaves a folder locked: its ``.lock`` file stays and the next holder reuses it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Union

LOCK_NAME = ".lock"


class FolderLockedError(OSError):
    """Another process is writing the folder."""


class FolderLock:
    """Exclusive writer lock on ``folder`` (created if missing); a context manager.

    A second holder, in this process or another, is refused at once with a message that names
    the folder, what it is (``what``) and the holder's pid.
    """

    def __init__(self, folder: Union[str, os.PathLike], what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self._fd = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderLockedError(
                    f"{self.folder} ({self.what}) is being written by another process (pid {holder}); wait for it to "
                    f"finish or stop it, or use another folder") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # a holder released (and removed) the file between our open and our lock: retry
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order, so that a process that opened the
        file meanwhile finds it gone and retries on a new one)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
