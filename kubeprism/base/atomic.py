"""Small local files: replaced so that a crash leaves the old one or the new one, never
part of one, and read with a size limit so that a wrong path cannot hang or flood us."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
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


def read_limited(path: str | os.PathLike[str], limit: int) -> str:
    """A regular file's UTF-8 text, refused (OSError) when it is bigger than ``limit`` bytes.

    O_NONBLOCK so that a FIFO fails at once instead of waiting for a writer; a device
    (a symlink to /dev/zero, say) is refused before anything is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OSError(errno.EILSEQ, f"is not UTF-8 text (byte {exc.start})", str(path)) from None
