"""``mem://[name]``: in-process feature store for the colocated mode (capture and trainer in one
process).

Stores opened with the same name in one process share one space, so a colocated capture and
trainer see the same samples. It keeps the same bytes, sizes and checksums as ``file://``, so
switching stores changes nothing upstream. Samples live until deleted.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping

import torch

from specforge_common.contracts import FeatureLocation
from specforge_common.featurestore import codec
from specforge_common.featurestore.errors import (
    FeatureCorruptError,
    FeatureMissingError,
    FeatureOutsideRootError,
    FeatureStoreError,
)

PREFIX = "mem://"
DEFAULT_NAME = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Space:
    """The samples of one name; the lock lets a capture thread and a trainer thread share it."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[codec.Buffer, FeatureLocation]] = {}
        self.lock = threading.Lock()


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


class MemoryFeatureStore:
    """Feature store in this process's memory; see the module docstring."""

    def __init__(self, uri: str, name: str) -> None:
        self.uri = uri
        self.name = name
        self._closed = False
        with _SPACES_LOCK:
            self._space = _SPACES.setdefault(name, _Space())

    @classmethod
    def from_uri(cls, uri: str) -> MemoryFeatureStore:
        """``mem://`` (the default space) or ``mem://name``."""
        if not uri.startswith(PREFIX):
            raise ValueError(f"memory store URI {uri!r} must be mem:// or mem://name")
        name = uri[len(PREFIX) :] or DEFAULT_NAME
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"memory store name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        return cls(uri, name)

    def __enter__(self) -> MemoryFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FeatureStoreError(f"feature store {self.uri} is closed")

    def _sample_id(self, location: FeatureLocation) -> str:
        scheme, sep, rest = location.uri.partition(":")
        if not sep or scheme != "mem":
            raise FeatureStoreError(
                f"location {location.uri!r} is not a mem: location; store {self.uri} cannot read it"
            )
        name, _, sample_id = rest.partition("/")
        if name != self.name:
            raise FeatureOutsideRootError(
                f"location {location.uri!r} belongs to memory space {name!r}, not {self.name!r}"
            )
        try:
            return codec.validate_sample_id(sample_id)
        except ValueError as exc:
            raise FeatureOutsideRootError(f"location {location.uri!r}: {exc}") from None

    def put(self, sample_id: str, tensors: Mapping[str, torch.Tensor]) -> FeatureLocation:
        """Keep a private copy; like ``file://``, the first copy of an id wins until deleted."""
        self._check_open()
        codec.validate_sample_id(sample_id)
        with self._space.lock:
            stored = self._space.objects.get(sample_id)
        if stored is not None:
            return stored[1]
        buf, specs = codec.encode(tensors)
        location = FeatureLocation(
            uri=f"mem:{self.name}/{sample_id}",
            tensors=specs,
            nbytes=len(buf),
            checksum=codec.checksum(buf),
        )
        with self._space.lock:
            return self._space.objects.setdefault(sample_id, (buf, location))[1]

    def get(self, location: FeatureLocation) -> dict[str, torch.Tensor]:
        """Views of a fresh copy: the caller may mutate them without touching the store."""
        self._check_open()
        sample_id = self._sample_id(location)
        codec.check_algorithm(location)
        with self._space.lock:
            entry = self._space.objects.get(sample_id)
        if entry is None:
            raise FeatureMissingError(f"no sample at {location.uri} in store {self.uri}")
        stored = entry[0]
        if len(stored) != location.nbytes:
            raise FeatureCorruptError(
                f"{location.uri}: {len(stored)} bytes stored but the location says "
                f"{location.nbytes} (the sample was replaced after a delete)"
            )
        # Stored buffers are never written after put, so the copy needs no lock.
        buf = codec.alloc_buffer(len(stored))
        with memoryview(buf) as view:
            view[:] = stored
        codec.verify_checksum(codec.checksum(buf), location)
        return codec.decode(buf, location)

    def delete(self, location: FeatureLocation) -> None:
        """Idempotent: deleting a missing sample is not an error (consumers may retry)."""
        self._check_open()
        sample_id = self._sample_id(location)
        with self._space.lock:
            self._space.objects.pop(sample_id, None)

    def exists(self, location: FeatureLocation) -> bool:
        self._check_open()
        sample_id = self._sample_id(location)
        with self._space.lock:
            return sample_id in self._space.objects

    def close(self) -> None:
        """Refuses later calls on this handle; the space and its samples stay for other handles."""
        self._closed = True
