"""Registered buffers that a ``mooncake://`` store reuses for the bytes of its puts.

Registration pins memory for RDMA (costly per call), and fresh memory costs page faults, so a
put encodes into a buffer from this pool and sends it straight from there (``put_from``).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

from specforge_common.featurestore import codec
from specforge_common.featurestore.errors import FeatureStoreError
from specforge_common.featurestore.mooncake_client import status


def address_of(view: memoryview) -> int:
    """The address of a writable buffer's first byte, as Mooncake's ``*_from`` / ``*_into`` take."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def size_class(nbytes: int) -> int:
    """Capacity for ``nbytes``: four steps per power of two (<= 25% slack), at least 64 KiB."""
    nbytes = max(nbytes, 64 << 10)
    step = 1 << max(nbytes.bit_length() - 3, 0)
    return -(-nbytes // step) * step


class PooledBuffer:
    """A registered buffer of the pool; ``view`` is its memory as bytes. ``release`` it (or leave
    the ``with``) once nothing reads it."""

    __slots__ = ("address", "capacity", "view", "_pool", "_in_use", "__weakref__")

    def __init__(self, pool: BufferPool, view: memoryview, address: int) -> None:
        self._pool = pool
        self.view = view
        self.address = address
        self.capacity = len(view)
        self._in_use = True

    def release(self) -> None:
        self._pool.release(self)

    def __enter__(self) -> PooledBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BufferPool:
    """Registered buffers on a free list by size class; free ones beyond ``retain_bytes`` are
    unregistered and dropped. Thread-safe."""

    def __init__(self, client: Any, retain_bytes: int, pinned: bool) -> None:
        self._client = client
        self._retain = retain_bytes
        self._pinned = pinned
        self._free: dict[int, list[PooledBuffer]] = {}
        self._free_bytes = 0
        self._live: dict[int, PooledBuffer] = {}  # address -> every registered pool buffer
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, nbytes: int) -> PooledBuffer:
        """A registered buffer of at least ``nbytes``: a free one of its size class, or new."""
        capacity = size_class(nbytes)
        with self._lock:
            if self._closed:
                raise FeatureStoreError("buffer pool is closed")
            stack = self._free.get(capacity)
            if stack:
                buffer = stack.pop()
                self._free_bytes -= capacity
                buffer._in_use = True
                return buffer
        view = self._allocate(capacity)
        address = address_of(view)
        code = self._client.register_buffer(address, capacity)
        if code != 0:
            raise FeatureStoreError(f"cannot register a {capacity}-byte buffer: {status(code)}")
        buffer = PooledBuffer(self, view, address)
        with self._lock:
            self._live[address] = buffer
        return buffer

    def _allocate(self, capacity: int) -> memoryview:
        if not self._pinned:
            return memoryview(codec.alloc_buffer(capacity))
        owner = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        array = (ctypes.c_char * capacity).from_address(owner.data_ptr())
        array._owner = owner  # type: ignore[attr-defined]  # the memory lives while views do
        return memoryview(array).cast("B")

    def release(self, buffer: PooledBuffer) -> None:
        with self._lock:
            if not buffer._in_use:
                raise ValueError("this pooled buffer was already released")
            buffer._in_use = False
            keep = not self._closed and self._free_bytes + buffer.capacity <= self._retain
            if keep:
                self._free.setdefault(buffer.capacity, []).append(buffer)
                self._free_bytes += buffer.capacity
                return
            self._live.pop(buffer.address, None)
        if not self._closed:
            self._client.unregister_buffer(buffer.address)

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    @property
    def registered(self) -> int:
        return len(self._live)

    def close(self) -> None:
        """Unregister everything (the client is about to close); buffers still held stay valid
        memory."""
        with self._lock:
            self._closed = True
            live, self._live, self._free, self._free_bytes = list(self._live.values()), {}, {}, 0
        for buffer in live:
            self._client.unregister_buffer(buffer.address)
