"""Files and directories that survive a power cut, not only a crash of the process.

Under POSIX rules a new name (a created file or directory, a rename) is durable only
once the directory holding it is fsynced; ext4's journal ordering hides the gap, other
file systems (and the SD card's own cache) do not. So every atomic write fsyncs the
file, renames it, then fsyncs its directory; every created directory fsyncs its parent.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the names in *directory* (created, renamed, removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, mode: int = 0o700) -> None:
    """``mkdir -p`` with every created directory made durable (its parent fsynced).

    Raises :class:`OSError` like :meth:`Path.mkdir` (e.g. ``FileExistsError`` when a
    file holds the name, ``PermissionError``)."""
    missing: list[Path] = []
    path = directory.absolute()
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            if not path.is_dir():
                raise
        fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of *data* to *fd* (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace *path* with *data*: a power cut leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a left-over file
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def replace(src: Path, dst: Path) -> None:
    """Rename *src* over *dst* durably (both in the same directory)."""
    src.replace(dst)
    fsync_dir(dst.parent)


def remove(path: Path) -> None:
    """Remove *path* (if present) durably."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
