"""``mooncake://MASTER_HOST:PORT[?options]``: samples in a Mooncake distributed store.

For capture and trainer nodes that share no filesystem: bytes go memory to memory over TCP or
RDMA into segments that long-lived holders lend (``specforge mooncake-holder``); the master
(``specforge mooncake-master``) only maps keys to segments. Start both before opening a store.
The URI's options are described in ``mooncake_uri``.

One object per sample, not one per tensor. Measured with ``python -m bench mooncake`` (raw
client, put + get, loopback TCP to a holder process, 2 shared cores, two runs) on the capture's
four tensors (two int64 [T], bf16 [T, 3H], bf16 [T, H]), one object vs a batched call over four:
0.6 MiB 1.19 / 1.55 ms vs 1.15 / 1.55 ms; 4 MiB 5.8 / 5.2 vs 7.0 / 5.5 ms; 64 MiB 85 / 131 vs
114 / 137 ms: per tensor is at best even and up to 1.34x slower. And an object is whole or
absent, so eviction never leaves half a sample and a replace is one upsert; and the object is
exactly the codec's bytes (safetensors layout, ``xxh3_128``), so a location has the same size and
checksum as in ``file://`` and ``mem://``.

Keys are ``specforge/<namespace>/<sample_id>``, locations ``mooncake:<namespace>/<sample_id>``.
Sample ids already carry the run (capture derives them from run, prompt and spec hash); the
namespace separates stores that share a master.

Zero copy in transit: ``put`` copies the tensors once, encoding them straight into a registered
pooled buffer that ``put_from`` sends; ``get_into`` lands the bytes in the caller's buffer, which
the returned tensors view. ``get`` returns tensors the caller owns: it registers a fresh buffer
for the call (microseconds on TCP; faulting the fresh pages in costs more, as with ``file://``).

Semantics as ``file://``: the first whole copy of a sample id wins (a Mooncake put on an existing
key silently keeps the old value; ``put`` looks first and replaces a damaged copy with an
upsert); reads verify size, checksum and the location's specs. Known limits: two *concurrent*
first puts of one id race inside Mooncake, which keeps one copy silently; the loser's location
then fails its checksum on read (FeatureCorruptError), never returns wrong tensors. A full store
evicts objects silently: they read as FeatureMissingError. ``delete`` removes at once, ignoring
the 10 s read lease; a read racing it fails its checksum rather than returning other bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from specforge_common.contracts import FeatureLocation
from specforge_common.featurestore import codec
from specforge_common.featurestore.errors import (
    FeatureCorruptError,
    FeatureMissingError,
    FeatureOutsideRootError,
    FeatureStoreError,
)
from specforge_common.featurestore.mooncake_buffers import BufferPool, address_of
from specforge_common.featurestore.mooncake_client import (
    OBJECT_NOT_FOUND,
    ClientGate,
    MooncakeUnavailableError,
    allocated_bytes,
    connect,
    read_allocated_bytes,
    status,
)
from specforge_common.featurestore.mooncake_uri import MooncakeOptions

__all__ = [
    "MooncakeFeatureStore",
    "MooncakeOptions",
    "MooncakeUnavailableError",
    "allocated_bytes",
    "from_uri",
]

SCHEME = "mooncake"
KEY_PREFIX = "specforge"


class MooncakeFeatureStore:
    """Feature store over a Mooncake distributed store; see the module docstring."""

    def __init__(self, uri: str, options: MooncakeOptions, client: Any) -> None:
        self.uri = uri
        self.options = options
        self.namespace = options.namespace
        self._client = client
        has_cuda = torch.cuda.is_available()
        if options.pin == "1" and not has_cuda:
            raise ValueError(f"{uri}: pin=1 needs CUDA (page-locked memory); use pin=auto")
        pinned = options.pin == "1" or (options.pin == "auto" and has_cuda)
        self.pool = BufferPool(client, options.pool, pinned)
        self._gate = ClientGate(uri)

    @classmethod
    def from_uri(cls, uri: str) -> MooncakeFeatureStore:
        """Connect to the master the URI names; fails fast if nothing answers there."""
        options = MooncakeOptions.parse(uri)
        return cls(uri, options, connect(options))

    def __enter__(self) -> MooncakeFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- keys and locations ---------------------------------------------------------------

    def _key(self, sample_id: str) -> str:
        return f"{KEY_PREFIX}/{self.namespace}/{sample_id}"

    def _key_of(self, location: FeatureLocation) -> str:
        scheme, sep, rest = location.uri.partition(":")
        if not sep or scheme != SCHEME:
            raise FeatureStoreError(
                f"location {location.uri!r} is not a mooncake: location; "
                f"store {self.uri} cannot read it"
            )
        namespace, _, sample_id = rest.partition("/")
        if namespace != self.namespace:
            raise FeatureOutsideRootError(
                f"location {location.uri!r} belongs to namespace {namespace!r}, "
                f"not {self.namespace!r}"
            )
        try:
            codec.validate_sample_id(sample_id)
        except ValueError as exc:
            raise FeatureOutsideRootError(f"location {location.uri!r}: {exc}") from None
        codec.check_algorithm(location)
        if location.nbytes < 8:
            raise FeatureCorruptError(f"{location.uri}: {location.nbytes} bytes cannot be a sample")
        return self._key(sample_id)

    # --- put ------------------------------------------------------------------------------

    def put(self, sample_id: str, tensors: Mapping[str, torch.Tensor]) -> FeatureLocation:
        """Store a sample once: the first whole copy of an id wins and later puts return it.

        Raises ValueError for an invalid sample id, FeatureStoreError if Mooncake refuses
        (no segment with room, a concurrent put of the same id still in flight).
        """
        with self._gate:
            codec.validate_sample_id(sample_id)
            key = self._key(sample_id)
            uri = f"{SCHEME}:{self.namespace}/{sample_id}"
            size = self._client.get_size(key)
            replace = size >= 0
            if replace:
                existing = self._stored_location(key, uri, size)
                if existing is not None:
                    return existing
            elif size != OBJECT_NOT_FOUND:
                raise FeatureStoreError(f"cannot look up {uri} in {self.uri}: {status(size)}")
            layout = codec.plan(tensors)
            with self.pool.acquire(layout.nbytes) as buffer:
                checksum = codec.checksum(layout.write_into(buffer.view))
                # A plain put keeps an existing value: only an upsert replaces a damaged copy.
                send = self._client.upsert_from if replace else self._client.put_from
                code = send(key, buffer.address, layout.nbytes)
            if code != 0:
                raise FeatureStoreError(f"cannot store {uri} in {self.uri}: {status(code)}")
            return FeatureLocation(uri=uri, tensors=layout.specs, nbytes=layout.nbytes,
                                   checksum=checksum)  # fmt: skip

    def _stored_location(self, key: str, uri: str, size: int) -> FeatureLocation | None:
        """Location of the whole copy already stored under ``key``, or None if it is damaged
        (or went away meanwhile)."""
        with self.pool.acquire(max(size, 1)) as buffer:
            code = self._client.get_into(key, buffer.address, size)
            if code == OBJECT_NOT_FOUND:
                return None
            if code != size:
                raise FeatureStoreError(f"cannot read the stored copy of {uri}: {status(code)}")
            try:
                return codec.describe(buffer.view[:size], uri)
            except FeatureCorruptError:
                return None

    # --- get ------------------------------------------------------------------------------

    def get(self, location: FeatureLocation) -> dict[str, torch.Tensor]:
        """Tensors the caller owns (views of a fresh buffer), after size and checksum match."""
        with self._gate:
            key = self._key_of(location)
            view = memoryview(codec.alloc_buffer(location.nbytes))
            self._fetch_into(key, location, view)
            return self._verified(view, location)

    def get_into(self, location: FeatureLocation, buffer: Any) -> dict[str, torch.Tensor]:
        """Like ``get``, but into the first ``location.nbytes`` of ``buffer``; the tensors view it.

        ``buffer`` (bytearray, mmap, writable memoryview ...) is registered for the call only.
        ValueError for an unusable buffer, before any I/O; after an error the buffer may hold
        part of a sample.
        """
        with self._gate:
            key = self._key_of(location)
            view = codec.writable_view(buffer, location.nbytes)
            self._fetch_into(key, location, view)
            return self._verified(view, location)

    def get_many_into(
        self, locations: Sequence[FeatureLocation], buffers: Sequence[Any]
    ) -> list[dict[str, torch.Tensor] | FeatureStoreError]:
        """Several samples in one batched transfer (fewer round trips than one get each).

        Per sample: its tensors (views of its buffer), or the FeatureStoreError that sample
        alone raised (missing, corrupt, foreign), so one bad sample does not sink the batch.
        ValueError for an unusable buffer, before any I/O.
        """
        if len(locations) != len(buffers):
            raise ValueError(f"{len(locations)} locations but {len(buffers)} buffers")
        with self._gate:
            results: list[dict[str, torch.Tensor] | FeatureStoreError] = []
            views = [
                codec.writable_view(b, loc.nbytes)
                for loc, b in zip(locations, buffers, strict=True)
            ]
            pending: list[int] = []
            keys: list[str] = []
            for i, location in enumerate(locations):
                try:
                    keys.append(self._key_of(location))
                    pending.append(i)
                    results.append({})
                except FeatureStoreError as exc:
                    results.append(exc)
            with self._registered([views[i] for i in pending]) as addresses:
                sizes = [locations[i].nbytes for i in pending]
                codes = self._client.batch_get_into(keys, addresses, sizes) if keys else []
            for i, key, code in zip(pending, keys, codes, strict=True):
                try:
                    self._check_read(key, locations[i], code)
                    results[i] = self._verified(views[i], locations[i])
                except FeatureStoreError as exc:
                    results[i] = exc
            return results

    @contextmanager
    def _registered(self, views: Sequence[memoryview]) -> Iterator[list[int]]:
        """The views' addresses, registered for one transfer (RDMA writes only registered
        memory) and unregistered after it."""
        addresses: list[int] = []
        try:
            for view in views:
                address = address_of(view)
                code = self._client.register_buffer(address, len(view))
                if code != 0:
                    raise FeatureStoreError(f"cannot register the caller's buffer: {status(code)}")
                addresses.append(address)
            yield addresses
        finally:
            for address in addresses:
                self._client.unregister_buffer(address)

    def _fetch_into(self, key: str, location: FeatureLocation, view: memoryview) -> None:
        with self._registered([view]) as (address,):
            code = self._client.get_into(key, address, location.nbytes)
        self._check_read(key, location, code)

    def _check_read(self, key: str, location: FeatureLocation, code: int) -> None:
        """Map a get's status to the store's typed errors."""
        if code == location.nbytes:
            return
        if code == OBJECT_NOT_FOUND:
            raise FeatureMissingError(
                f"no sample at {location.uri} in store {self.uri} (never written, deleted, "
                "or evicted: the store was full or its holder died)"
            )
        stored = code if code >= 0 else self._client.get_size(key)
        if stored >= 0 and stored != location.nbytes:
            raise FeatureCorruptError(
                f"{location.uri}: {stored} bytes stored but the location says {location.nbytes} "
                "(replaced after a delete)"
            )
        raise FeatureStoreError(f"cannot read {location.uri} from {self.uri}: {status(code)}")

    @staticmethod
    def _verified(view: memoryview, location: FeatureLocation) -> dict[str, torch.Tensor]:
        codec.verify_checksum(codec.checksum(view), location)
        return codec.decode(view, location)

    # --- the rest -------------------------------------------------------------------------

    def delete(self, location: FeatureLocation) -> None:
        """Idempotent; removes at once, even within the read lease (see the module docstring)."""
        with self._gate:
            key = self._key_of(location)
            code = self._client.remove(key, True)
            if code not in (0, OBJECT_NOT_FOUND):
                raise FeatureStoreError(f"cannot delete {location.uri}: {status(code)}")

    def exists(self, location: FeatureLocation) -> bool:
        with self._gate:
            key = self._key_of(location)
            code = self._client.is_exist(key)
            if code < 0:
                raise FeatureStoreError(f"cannot look up {location.uri}: {status(code)}")
            return code == 1

    def used_bytes(self) -> int | None:
        """Bytes the whole store holds (every namespace: eviction is store-wide), from the
        master's metrics server; None if it does not answer (see the ``metrics`` option)."""
        return read_allocated_bytes(self.options.metrics)

    def close(self) -> None:
        """Wait for calls in flight, then unregister the pool and disconnect; later calls are
        refused. Tensors from ``get`` stay valid."""
        if self._gate.close():
            self.pool.close()
            self._client.close()


def from_uri(uri: str) -> MooncakeFeatureStore:
    """The ``open_store`` factory for ``mooncake://`` (imported only when such a URI is opened)."""
    return MooncakeFeatureStore.from_uri(uri)
