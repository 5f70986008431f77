"""Files that are whole after a crash or a power loss, and the hash that names their bytes.

A checkpoint, its ``latest``/``best`` pointers, a vocab map or a feature file is read back by
another process, maybe after a crash, so each is written the same way: into a hidden sibling
(same filesystem, so the rename is atomic), fsynced, renamed over the target, and then the
directory is fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "sha256_file", "temp_sibling", "write_atomic"]


def temp_sibling(path: str | Path, suffix: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call, for staging ``path``.

    It starts with ``.`` and ends with ``.<suffix>``, so it never matches the final name and a
    glob for ``.<name>.*.<suffix>`` finds what a crash left behind.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.{suffix}")


def fsync_file(path: str | Path) -> None:
    """Flush a file written by a library that takes a file name (safetensors, torch.save)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename, create or delete inside ``path`` durable.

    Some filesystems refuse to fsync a directory (EINVAL, ENOTSUP, EBADF) and some platforms
    cannot open one; there nothing more can be done, so nothing is raised. Other errors (EIO)
    mean the change may be lost, and are raised.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` (str as UTF-8): readers and a crash see the old or the new.

    On any failure the temp file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks: the identity of a checkpoint's weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()
