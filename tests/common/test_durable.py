"""Durable writes: the atomic write leaves the old or the new file, never a torn one or a temp
file, even when the write or the rename fails; directory fsync tolerates what it must."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from specforge_common import durable
from specforge_common.durable import fsync_dir, fsync_file, sha256_file, temp_sibling, write_atomic


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_atomic_writes_bytes_and_text_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    write_atomic(path, b"\x00binary\xff")
    assert path.read_bytes() == b"\x00binary\xff"
    write_atomic(path, "step-00000002\nnon-ascii é\n")
    assert path.read_bytes() == "step-00000002\nnon-ascii é\n".encode()
    assert names(tmp_path) == ["latest"]


def test_a_write_that_raises_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "best_meta.json"
    path.write_text("old")

    class NotBytes:
        pass

    with pytest.raises(TypeError):
        write_atomic(path, NotBytes())  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert names(tmp_path) == ["best_meta.json"]


def test_a_write_cut_short_by_a_full_disk_leaves_the_old_file(tmp_path: Path) -> None:
    """A real partial write: the file-size limit stops it after 64 KiB of 1 MiB (EFBIG)."""
    path = tmp_path / "vocab.safetensors"
    path.write_bytes(b"old")
    script = textwrap.dedent(
        f"""
        import errno, resource, signal, sys
        from specforge_common.durable import write_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
        try:
            write_atomic({str(path)!r}, b"x" * (1 << 20))
        except OSError as exc:
            sys.exit(0 if exc.errno == errno.EFBIG else 2)
        sys.exit(1)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["vocab.safetensors"]


def test_a_failed_replace_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "latest"
    path.write_text("step-00000001\n")
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if Path(str(dst)) == path:
            raise OSError(errno.EIO, "simulated I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(path, "step-00000002\n")
    monkeypatch.undo()
    assert path.read_text() == "step-00000001\n"
    assert names(tmp_path) == ["latest"]


def test_a_rename_over_a_directory_fails_and_keeps_it(tmp_path: Path) -> None:
    target = tmp_path / "step-00000001"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OSError):
        write_atomic(target, b"not a directory")
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert names(tmp_path) == ["step-00000001"]


def test_temp_siblings_are_hidden_unique_and_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "step-00000003"
    first, second = temp_sibling(target), temp_sibling(target, "staging")
    assert first.parent == second.parent == tmp_path
    assert first.name.startswith(".step-00000003.") and first.name.endswith(".tmp")
    assert second.name.endswith(".staging")
    assert temp_sibling(target) != first
    assert list(tmp_path.glob(".step-00000003.*.tmp")) == []  # naming only, nothing created


def test_sha256_file_matches_hashlib_over_many_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 123)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=4096) == expected  # four reads, the last one short
    assert sha256_file(path) == expected
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_fsync_file_and_dir(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    fsync_file(path)
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # a directory that cannot be opened is not an error
    with pytest.raises(FileNotFoundError):
        fsync_file(tmp_path / "missing")


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EBADF])
def test_fsync_dir_tolerates_filesystems_that_cannot_sync_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(durable.os, "fsync", refuse)
    fsync_dir(tmp_path)


def test_fsync_dir_raises_an_io_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(durable.os, "fsync", fail)
    with pytest.raises(OSError, match="simulated"):
        fsync_dir(tmp_path)
