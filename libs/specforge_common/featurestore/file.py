"""``file://DIR``: one safetensors file per sample in a directory several nodes may mount.

Locations are relative to the root (``file:ab/<sample_id>.safetensors``) because a capture node
and a trainer node can mount the same shared directory at different paths.

A put fsyncs the file and its directory before it returns: capture acks a prompt only once its
sample survives a crash.

A get of a big file reads each piece on the calling thread while one shared worker thread hashes
the piece before it; ``FileFeatureStore.get_into`` reads into a buffer the caller recycles.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
import xxhash

from specforge_common import faults
from specforge_common.contracts import FeatureLocation
from specforge_common.durable import fsync_dir, temp_sibling
from specforge_common.featurestore import codec
from specforge_common.featurestore.errors import (
    FeatureCorruptError,
    FeatureMissingError,
    FeatureOutsideRootError,
    FeatureStoreError,
)

PREFIX = "file://"
SUFFIX = ".safetensors"
# Hash each piece right after it is read or written, while its bytes are still in cache.
CHUNK = 2 << 20
# Gets of files at least this big read piece i+1 on the calling thread while one worker thread
# hashes piece i; below it the handoff costs more than it saves. Tests lower it. With no free
# core the overlap loses ~10% instead: set it out of reach (1 << 62) to keep reads on one thread.
OVERLAP_MIN_BYTES = 8 << 20


class _Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


_worker_lock = threading.Lock()
_worker: ThreadPoolExecutor | None = None


def _forget_worker_after_fork() -> None:
    # A forked child has no copy of the worker thread; submitting to the parent's would hang.
    global _worker, _worker_lock
    _worker = None
    _worker_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_after_fork)


def _hash_worker() -> ThreadPoolExecutor:
    """The one long-lived thread that hashes while a get reads the next piece.

    Concurrent gets share it; each get's ``_InOrder`` keeps its own pieces in file order. Both
    ``readinto`` and xxh3's ``update`` release the GIL, so the two threads really run at once.
    """
    global _worker
    worker = _worker
    if worker is None:
        with _worker_lock:
            if _worker is None:
                _worker = ThreadPoolExecutor(1, thread_name_prefix="featurestore-hash")
            worker = _worker
    return worker


def _read_single(file: _Readable, view: memoryview, uri: str) -> xxhash.xxh3_128:
    """Read ``view`` full from ``file``, hashing each piece right after it lands."""
    hasher = codec.new_hasher()
    size = len(view)
    done = 0
    while done < size:
        got = file.readinto(view[done : done + CHUNK])
        if not got:
            raise FeatureCorruptError(f"{uri}: file ended after {done} of {size} bytes")
        hasher.update(view[done : done + got])
        done += got
    return hasher


class _InOrder:
    """The pieces of one overlapped read that are read but not yet hashed.

    Whichever thread is free hashes the oldest one, under ``lock``, so the pieces reach the
    streaming hasher in file order. After ``finish`` no thread touches the buffer again.
    """

    def __init__(self) -> None:
        self.hasher = codec.new_hasher()
        self.pieces: deque[memoryview] = deque()
        self.lock = threading.Lock()  # held while a piece is hashed
        self.error: BaseException | None = None

    def hash_next(self, blocking: bool = True) -> bool:
        """Hash the oldest waiting piece; False if none waits (or, not blocking, if busy)."""
        if not self.lock.acquire(blocking):
            return False
        try:
            if not self.pieces:
                return False
            self.hasher.update(self.pieces.popleft())
            return True
        finally:
            self.lock.release()

    def work(self) -> None:
        """A worker step; it finds nothing to do if the reading thread got there first."""
        try:
            self.hash_next()
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self.error = self.error or exc

    def finish(self) -> None:
        """Drop what is left (after an error) and wait out the worker's piece in flight."""
        self.pieces.clear()
        with self.lock:
            pass


def _read_overlapped(file: _Readable, view: memoryview, uri: str) -> xxhash.xxh3_128:
    """Like ``_read_single``, but the worker hashes piece i while piece i+1 is read.

    If the worker falls behind (no free core), the reading thread hashes the oldest waiting
    piece itself between reads rather than let it go cold, and at the end it hashes what is
    left instead of waiting. Nothing touches ``view`` once this returns or raises.
    """
    size = len(view)
    state = _InOrder()
    worker = _hash_worker()
    done = 0
    try:
        while done < size:
            got = file.readinto(view[done : done + CHUNK])
            if not got:
                raise FeatureCorruptError(f"{uri}: file ended after {done} of {size} bytes")
            state.pieces.append(view[done : done + got])
            done += got
            try:
                worker.submit(state.work)
            except RuntimeError:  # interpreter shutting down: this thread hashes it all
                pass
            if len(state.pieces) > 1:  # the worker is behind: take one off its queue
                state.hash_next(blocking=False)
        while state.hash_next():
            pass
    finally:
        state.finish()
    if state.error is not None:
        raise state.error
    return state.hasher


class FileFeatureStore:
    """Feature store over a local or shared directory; see the module docstring."""

    def __init__(self, uri: str, root: Path) -> None:
        self.uri = uri
        self.root = root
        self._closed = False

    @classmethod
    def from_uri(cls, uri: str) -> FileFeatureStore:
        """``file:///abs/dir`` or ``file://./rel/dir`` (relative to the cwd); creates the dir."""
        if not uri.startswith(PREFIX) or not uri[len(PREFIX) :]:
            raise ValueError(
                f"file store URI {uri!r} must be file:///absolute/dir or file://./relative/dir"
            )
        path = Path(uri[len(PREFIX) :])
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatureStoreError(f"cannot create feature store directory {path}: {exc}") from exc
        return cls(uri, path.resolve())

    def __enter__(self) -> FileFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FeatureStoreError(f"feature store {self.uri} is closed")

    def _relative(self, sample_id: str) -> str:
        # 256 fan-out directories keep millions of samples out of one directory listing.
        return f"{xxhash.xxh3_64_hexdigest(sample_id.encode())[:2]}/{sample_id}{SUFFIX}"

    def _resolve(self, location: FeatureLocation) -> Path:
        scheme, sep, rel = location.uri.partition(":")
        if not sep or scheme != "file":
            raise FeatureStoreError(
                f"location {location.uri!r} is not a file: location; "
                f"store {self.uri} cannot read it"
            )
        if not rel or "\x00" in rel or rel.startswith(("/", "\\")) or Path(rel).is_absolute():
            raise FeatureOutsideRootError(
                f"location {location.uri!r} must be a path relative to the store root"
            )
        path = (self.root / rel).resolve()
        if path == self.root or not path.is_relative_to(self.root):
            raise FeatureOutsideRootError(
                f"location {location.uri!r} resolves to {path}, outside the store root {self.root}"
            )
        return path

    def _ensure_dir(self, path: Path) -> None:
        try:
            os.mkdir(path)
        except FileExistsError:
            return
        except OSError as exc:
            raise FeatureStoreError(f"cannot create {path}: {exc}") from exc
        fsync_dir(self.root)

    def put(self, sample_id: str, tensors: Mapping[str, torch.Tensor]) -> FeatureLocation:
        """Store a sample once: the first whole copy of an id wins and later puts return it.

        A redelivered capture may recompute slightly different bytes (GPU non-determinism) after
        the first attempt already published its SampleRef; keeping the first copy keeps that
        SampleRef valid. Writes are atomic (temp file + link), so no reader or concurrent writer
        ever sees a torn file. Raises ValueError for an invalid sample id.
        """
        self._check_open()
        codec.validate_sample_id(sample_id)
        rel = self._relative(sample_id)
        final = self.root / rel
        existing = self._stored_location(rel, final)
        if existing is not None:
            return existing
        buf, specs = codec.encode(tensors)
        self._ensure_dir(final.parent)
        tmp = temp_sibling(final)
        hasher = codec.new_hasher()
        try:
            faults.point("store.put")  # SPECFORGE_FAULT=store.put@1-3:enospc: a full disk
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
            try:
                with memoryview(buf) as view:
                    done = 0
                    while done < len(view):
                        chunk = view[done : done + CHUNK]
                        hasher.update(chunk)
                        while chunk:
                            chunk = chunk[os.write(fd, chunk) :]
                        done += CHUNK
                os.fsync(fd)
            finally:
                os.close(fd)
            winner = self._publish_file(tmp, final, rel)
        except OSError as exc:
            raise FeatureStoreError(f"cannot write sample {sample_id!r} to {final}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        if winner is not None:
            return winner
        fsync_dir(final.parent)
        return FeatureLocation(
            uri=f"file:{rel}",
            tensors=specs,
            nbytes=len(buf),
            checksum=codec.checksum_string(hasher),
        )

    def _publish_file(self, tmp: Path, final: Path, rel: str) -> FeatureLocation | None:
        """Move ``tmp`` to ``final`` unless a whole copy got there first (then return that)."""
        try:
            os.link(tmp, final)  # atomic create-if-absent
            return None
        except FileExistsError:
            winner = self._stored_location(rel, final)
            if winner is not None:
                return winner
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise  # below: filesystems without hard links get last-writer-wins
        os.replace(tmp, final)  # replaces a corrupt copy
        return None

    def _stored_location(self, rel: str, final: Path) -> FeatureLocation | None:
        """Location of a whole stored copy of the sample, or None if absent or damaged."""
        try:
            data = bytearray(final.read_bytes())  # writable: decode makes tensor views of it
        except FileNotFoundError:
            return None
        try:
            return codec.describe(data, f"file:{rel}")
        except FeatureCorruptError:
            return None

    def get(self, location: FeatureLocation) -> dict[str, torch.Tensor]:
        """Read the file once into a fresh buffer, verify size and checksum, return views of it.

        The caller owns the returned tensors and the buffer under them.
        """
        self._check_open()
        return self._read(location, None)

    def get_into(
        self, location: FeatureLocation, buffer: bytearray | memoryview | mmap.mmap
    ) -> dict[str, torch.Tensor]:
        """Like ``get``, but read into the first ``location.nbytes`` bytes of ``buffer``.

        Only ``FileFeatureStore`` has this (not the ``FeatureStore`` protocol): a reader that
        recycles one buffer per in-flight sample skips faulting in a fresh buffer's pages (a
        quarter or more of a 64 MiB get). The returned tensors are views into ``buffer``:
        they change or become garbage as soon as the caller reuses it, so copy or consume them
        first. ``buffer`` must be writable, C-contiguous and at least ``location.nbytes`` long
        (ValueError otherwise, before any I/O). If the get raises, ``buffer`` may hold part of the
        file. A bytearray cannot be resized while the returned tensors are alive.
        """
        self._check_open()
        view = codec.writable_view(buffer, location.nbytes)
        return self._read(location, view)

    def _read(
        self, location: FeatureLocation, target: memoryview | None
    ) -> dict[str, torch.Tensor]:
        path = self._resolve(location)
        codec.check_algorithm(location)
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise FeatureMissingError(
                f"no sample at {location.uri} in store {self.uri} ({path})"
            ) from None
        except OSError as exc:
            raise FeatureStoreError(f"cannot open {path}: {exc}") from exc
        with file:
            size = os.fstat(file.fileno()).st_size
            if size != location.nbytes:
                raise FeatureCorruptError(
                    f"{location.uri}: {size} bytes on disk but the location says "
                    f"{location.nbytes} (truncated or overwritten)"
                )
            buf = codec.alloc_buffer(size) if target is None else target
            with memoryview(buf) as view:
                read = _read_single if size < OVERLAP_MIN_BYTES else _read_overlapped
                hasher = read(file, view, location.uri)
        codec.verify_checksum(codec.checksum_string(hasher), location)
        return codec.decode(buf, location)

    def delete(self, location: FeatureLocation) -> None:
        """Idempotent: deleting a missing sample is not an error (consumers may retry)."""
        self._check_open()
        path = self._resolve(location)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise FeatureStoreError(f"cannot delete {path}: {exc}") from exc

    def exists(self, location: FeatureLocation) -> bool:
        self._check_open()
        return self._resolve(location).is_file()

    def close(self) -> None:
        """Nothing to release (files are closed after each call); later calls are refused."""
        self._closed = True
