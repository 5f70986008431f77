"""Feature stores: where captured tensors live, so only a FeatureLocation travels on the bus.

``open_store(uri)`` picks the backend by scheme: ``file://DIR`` (one safetensors file per sample,
shared directory), ``mem://[name]`` (in-process, colocated mode) or ``mooncake://HOST:PORT`` (a
Mooncake distributed store, for nodes that share no filesystem). Every backend stores the same
bytes with the same size and ``xxh3_128`` checksum, and ``get`` verifies both and the tensor
specs, so a location is portable between stores of one kind and switching kinds changes nothing
upstream.

Invalid sample ids given to ``put`` raise ``ValueError`` (a caller bug); bad locations read from
the bus raise a ``FeatureStoreError`` subclass so the sample can be dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch

from specforge_common.contracts import FeatureLocation
from specforge_common.featurestore.errors import (
    FeatureCorruptError,
    FeatureMissingError,
    FeatureOutsideRootError,
    FeatureStoreError,
)
from specforge_common.featurestore.file import FileFeatureStore
from specforge_common.featurestore.memory import MemoryFeatureStore

__all__ = [
    "FeatureCorruptError",
    "FeatureMissingError",
    "FeatureOutsideRootError",
    "FeatureStore",
    "FeatureStoreError",
    "FileFeatureStore",
    "MemoryFeatureStore",
    "open_store",
    "register_scheme",
]


@runtime_checkable
class FeatureStore(Protocol):
    """What every backend does. Optional, looked up with ``getattr``: ``used_bytes() -> int |
    None``, the bytes the store holds now (None: cannot tell), for stores that evict when full
    (``mooncake://``); capture's byte backpressure reads it."""

    uri: str  # the URI it was opened with

    def put(self, sample_id: str, tensors: Mapping[str, torch.Tensor]) -> FeatureLocation: ...

    def get(self, location: FeatureLocation) -> dict[str, torch.Tensor]: ...

    def delete(self, location: FeatureLocation) -> None: ...  # idempotent

    def exists(self, location: FeatureLocation) -> bool: ...

    def close(self) -> None: ...


StoreFactory = Callable[[str], FeatureStore]

# Scheme -> factory taking the whole URI. The mooncake:// module (and the optional wheel it loads)
# is imported only when such a URI is opened.
_SCHEMES: dict[str, StoreFactory] = {
    "file": FileFeatureStore.from_uri,
    "mem": MemoryFeatureStore.from_uri,
    "mooncake": lambda uri: __import__(f"{__name__}.mooncake", fromlist=["_"]).from_uri(uri),
}


def register_scheme(scheme: str, factory: StoreFactory) -> None:
    """Make ``open_store`` accept ``scheme://...`` URIs (a backend outside this package)."""
    _SCHEMES[scheme] = factory


def open_store(uri: str) -> FeatureStore:
    """Open the store a RunSpec's ``store_uri`` names: file:///abs, file://./rel, mem://[name],
    mooncake://HOST:PORT[?options]."""
    scheme, sep, _ = uri.partition("://")
    factory = _SCHEMES.get(scheme) if sep else None
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise ValueError(f"unknown feature store URI {uri!r}; known schemes: {known}")
    return factory(uri)
