"""One writer per folder: the lock refuses a second holder, names the first, and survives kill -9."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from al.folder_lock import FolderLock, FolderLockedError

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    first = FolderLock(tmp_path / "out", "test folder").acquire()
    assert (tmp_path / "out" / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(FolderLockedError, match=rf"out \(folder\) is being written by another process \(pid {os.getpid()}\)"):
        FolderLock(tmp_path / "out").acquire()  # flock is per open file: a second holder in one process too
    first.release()
    assert not (tmp_path / "out" / ".lock").exists()  # a clean release leaves nothing behind
    with FolderLock(tmp_path / "out") as again:
        assert again.held
    assert not again.held


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom al.folder_lock import FolderLock\n"
                               "FolderLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(300)", str(tmp_path)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            FolderLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # a killed holder's file stays...
    with FolderLock(tmp_path):  # ...but not its lock
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_lock_file_replaced_between_open_and_lock_is_retried(tmp_path, monkeypatch):
    """A holder that releases between our open and our flock removes the file we opened: we must not
    hold a lock on a file nobody else will open."""
    import al.folder_lock as module

    real_flock, calls = module.fcntl.flock, []

    def flock_after_a_release(fd, operation):
        if not calls:  # the first open's file is unlinked and recreated by another holder's cycle
            os.unlink(tmp_path / ".lock")
            (tmp_path / ".lock").write_text("")
        calls.append(os.fstat(fd).st_ino)
        return real_flock(fd, operation)

    monkeypatch.setattr(module.fcntl, "flock", flock_after_a_release)
    lock = FolderLock(tmp_path).acquire()
    assert len(calls) == 2 and os.fstat(lock._fd).st_ino == os.stat(tmp_path / ".lock").st_ino
    lock.release()
