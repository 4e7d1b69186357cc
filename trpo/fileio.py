"""Safe file access inside a run directory: atomic writes that never follow a link at the
destination, and reads that open only regular files.

A run directory may be shared, copied or tampered with, so every artifact (checkpoints and
their records, ``metrics.csv`` rewrites, ``learning_curve.svg``, ``eval.gif``) is written
the same way:

1. the bytes go to a fresh temporary file ``.tmp_<name>.<random>`` in the destination's own
   directory (``tempfile.mkstemp``: created with ``O_EXCL``, so it never opens an existing
   file or link);
2. it is flushed and ``fsync``ed, then renamed over the destination with ``os.replace``.
   ``rename(2)`` replaces a symbolic link at the destination *by the file*; the link's target
   is never opened, so a planted ``learning_curve.svg -> ~/.bashrc`` cannot redirect a write;
3. the directory is ``fsync``ed so that the rename itself survives a power loss.

On any failure the temporary file is removed and :class:`RunDirError` names the path and
what to do (a full disk, ``ulimit -f``, a read-only directory).

Reads (:func:`read_regular_file`) open with ``O_NOFOLLOW | O_NONBLOCK`` and check with
``fstat`` that the file is a regular file before reading a byte, with a size cap: a FIFO
(which would block forever), ``/dev/zero`` (which never ends) or a link is refused.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_bytes(d / "a.txt", b"hello").name
    'a.txt'
    >>> read_regular_file(d / "a.txt", max_bytes=10)
    b'hello'
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "TMP_PREFIX",
    "FileTooLargeError",
    "RunDirError",
    "atomic_write_bytes",
    "atomic_writer",
    "describe_os_error",
    "fsync_dir",
    "open_append_regular",
    "read_regular_file",
    "refuse_symlink",
]

TMP_PREFIX = ".tmp_"
"""Prefix of the temporary files of interrupted writes (never listed as artifacts)."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# mkstemp creates files 0600; artifacts get the mode a plain open() would give them. The
# umask can only be read by setting it, so it is read once, at import (single-threaded).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class RunDirError(RuntimeError):
    """A run-directory artifact cannot be written or read safely (not writable, disk full,
    file-size limit, a symbolic link, not a regular file). The message names the path and
    what to do."""


class FileTooLargeError(RunDirError):
    """:func:`read_regular_file` found more bytes than ``max_bytes`` (none were returned)."""


def describe_os_error(path: str | os.PathLike[str], e: OSError, action: str = "write") -> str:
    """One line: what failed on ``path`` and the remedy for the common causes."""
    advice = {
        errno.EFBIG: "the file-size limit was exceeded (see `ulimit -f`); raise it",
        errno.ENOSPC: "the disk is full; free space or choose another --runs-root",
        errno.EDQUOT: "the disk quota is exhausted; free space or choose another --runs-root",
        errno.EACCES: "permission denied; make it writable or choose another --runs-root",
        errno.EPERM: "operation not permitted; make it writable or choose another --runs-root",
        errno.EROFS: "the filesystem is read-only; choose another --runs-root",
        errno.ENOTDIR: "a component of the path is not a directory",
        errno.EISDIR: "a directory is in the way; move it",
        errno.ELOOP: "it is a symbolic link, which is never followed; replace it by a file",
    }.get(e.errno or 0, "check the path, its permissions and the free space")
    return f"cannot {action} {path}: {e.strerror or e}; {advice}"


def refuse_symlink(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`RunDirError` if ``path`` itself is a symbolic link (it is not followed)."""
    if os.path.islink(path):
        target = os.readlink(path)
        raise RunDirError(
            f"{what} {path} is a symbolic link (to {target}); refusing to write, read or delete "
            "through it. Replace it by a real directory or file"
        )


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Context manager: a new temporary file in ``path``'s directory, renamed over ``path``
    (``os.replace``, never following a link there) when the block exits without error.

    Args:
        path: the destination; its directory must exist.
        mode: ``"wb"`` or ``"w"`` (text, ``newline=""``).

    Raises:
        RunDirError: if the file cannot be created, written or renamed (the temporary file is
            removed; the destination is left as it was).
    """
    path = Path(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w' (got {mode!r})")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    except OSError as e:
        raise RunDirError(describe_os_error(path, e)) from e
    try:
        with contextlib.suppress(OSError, AttributeError):  # no fchmod on Windows
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **({"newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise RunDirError(describe_os_error(path, e)) from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`). Returns ``path``."""
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def _open_regular(path: Path, flags: int, action: str) -> int:
    """``os.open`` without following a final link; the fd of a regular file, else raise."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, 0o644)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise RunDirError(
                f"{path} is a symbolic link; refusing to follow it. Replace it by a regular file"
            ) from None
        raise RunDirError(describe_os_error(path, e, action)) from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a directory" if stat.S_ISDIR(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise RunDirError(f"{path} is {kind}, not a regular file; refusing to {action} it")
    return fd


def read_regular_file(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO or device).

    Args:
        path: the file.
        max_bytes: refuse a file larger than this (checked with ``fstat`` before reading,
            and again while reading, in case it grows).

    Raises:
        FileNotFoundError: if it does not exist.
        FileTooLargeError: if it is larger than ``max_bytes``.
        RunDirError: if it is a link or not a regular file, or cannot be read.
    """
    path = Path(path)
    fd = _open_regular(path, os.O_RDONLY, "read")
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise FileTooLargeError(f"{path} holds {size} bytes, more than the {max_bytes} expected")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 24 if max_bytes is None else max_bytes + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise FileTooLargeError(f"{path} grew past {max_bytes} bytes while being read")
        return b"".join(chunks)
    except OSError as e:
        raise RunDirError(describe_os_error(path, e, "read")) from e
    finally:
        os.close(fd)


def open_append_regular(path: str | os.PathLike[str]) -> IO[str]:
    """``path`` opened for appending text (created if missing), never through a link, and
    only if it is a regular file.

    Raises:
        RunDirError: naming the path and what to do.
    """
    path = Path(path)
    fd = _open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "append to")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", newline="")
