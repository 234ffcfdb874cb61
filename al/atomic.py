"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """Where an atomic write stages ``path`` (``.<name>.tmp-<pid>`` beside it, so the rename
    stays on one file system and a crash leaves a name :func:`is_temporary` recognises)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``."""
    tmp = temporary_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
