"""Replacing a file so that a crash leaves the old one or the new one, never part of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(
    target: Path, text: str, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Temp file in the target's directory, mode (and owner) set, fsync, rename, fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            # Before any byte is written: the content is never visible with a wider mode.
            os.fchmod(out.fileno(), mode)
            if owner is not None:
                with contextlib.suppress(PermissionError):  # only root may give files away
                    os.fchown(out.fileno(), *owner)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
