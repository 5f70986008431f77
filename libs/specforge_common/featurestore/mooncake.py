"""``mooncake://MASTER_HOST:PORT[?options]``: samples in a Mooncake distributed store.

For capture and trainer nodes that share no filesystem: bytes go memory to memory over TCP or
RDMA into segments that long-lived holders lend (``specforge mooncake-holder``); the master
(``specforge mooncake-master``) only maps keys to segments. Start both before opening a store.

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
namespace (default ``default``) separates stores that share a master.

Options: ``protocol=tcp|rdma``, ``devices=mlx5_0,mlx5_1`` (RDMA NICs), ``segment=SIZE`` (memory
this process lends; default 0, a pure client: a segment dies with its process), ``namespace=``,
``host=`` (how peers reach this process; default loopback for a loopback master, else the
address that routes to the master), ``metadata=P2PHANDSHAKE`` (or an etcd/http metadata server),
``pool=SIZE`` (free registered buffers kept for reuse, default 1 GiB), ``pin=auto|0|1`` (page-
locked pool buffers; auto = when CUDA is available), ``metrics=[HOST:]PORT`` (the master's
metrics server, default the master host and port 9003: where ``used_bytes`` reads how full the
store is, for capture's byte backpressure).

Zero copy in transit: ``put`` copies the tensors once, encoding them straight into a registered
pooled buffer that ``put_from`` sends; ``get_into`` / ``get_pooled`` land the bytes in a
registered buffer that the returned tensors view, so a warm trainer fetch allocates nothing.
``get`` returns tensors the caller owns: it registers a fresh buffer for the call (microseconds
on TCP; faulting the fresh pages in costs more, as with ``file://``).

Semantics as ``file://``: the first whole copy of a sample id wins (a Mooncake put on an existing
key silently keeps the old value; ``put`` looks first and replaces a damaged copy with an
upsert); reads verify size, checksum and the location's specs. Known limits: two *concurrent*
first puts of one id race inside Mooncake, which keeps one copy silently; the loser's location
then fails its checksum on read (FeatureCorruptError), never returns wrong tensors. A full store
evicts objects silently: they read as FeatureMissingError. ``delete`` removes at once, ignoring
the 10 s read lease; a read racing it fails its checksum rather than returning other bytes.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import torch

from specforge_common.contracts import FeatureLocation, TensorSpec
from specforge_common.featurestore import codec
from specforge_common.featurestore.errors import (
    FeatureCorruptError,
    FeatureMissingError,
    FeatureOutsideRootError,
    FeatureStoreError,
)
from specforge_common.mooncake_processes import (
    DEFAULT_METRICS_PORT,
    IBVERBS_HINT,
    WHEEL_HINT,
    parse_size,
)

PREFIX = "mooncake://"
SCHEME = "mooncake"
KEY_PREFIX = "specforge"
DEFAULT_NAMESPACE = "default"
DEFAULT_POOL = 1 << 30
# Staging memory for Mooncake's copying calls, which this backend never makes.
_LOCAL_BUFFER = 16 << 20
_MASTER_PROBE_TIMEOUT = 3.0

# Mooncake status codes (ErrorCode in mooncake-store types.h) that this backend tells apart.
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
LEASE_EXPIRED = -707
_CODE_NAMES = {
    NO_AVAILABLE_HANDLE: "NO_AVAILABLE_HANDLE: no segment has room (start a holder or add one)",
    INVALID_PARAMS: "INVALID_PARAMS",
    REPLICA_IS_NOT_READY: "REPLICA_IS_NOT_READY: a put of this key is still in flight",
    OBJECT_NOT_FOUND: "OBJECT_NOT_FOUND",
    OBJECT_ALREADY_EXISTS: "OBJECT_ALREADY_EXISTS",
    LEASE_EXPIRED: "LEASE_EXPIRED: the read outlived its lease; retry",
    -800: "TRANSFER_FAIL",
    -900: "RPC_FAIL",
    -901: "RPC_TIMEOUT",
}
_OPTIONS = ("protocol", "devices", "segment", "namespace", "host", "metadata", "pool", "pin",
            "metrics")  # fmt: skip
# The master's gauge of bytes allocated in all segments (every namespace, every client).
ALLOCATED_METRIC = "master_allocated_bytes"
_METRICS_TIMEOUT = 2.0


class MooncakeUnavailableError(FeatureStoreError):
    """The Mooncake wheel or its system library (libibverbs) is missing on this machine."""


def _status(code: int) -> str:
    return f"{_CODE_NAMES.get(code, 'error')} ({code})"


def load_client_class() -> type:
    """``MooncakeDistributedStore``, imported only when a mooncake:// store is opened."""
    # Read once, when the library loads: without it every client logs at INFO to stderr.
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        hint = IBVERBS_HINT if "libibverbs" in str(exc) else WHEEL_HINT
        raise MooncakeUnavailableError(f"cannot use mooncake:// stores: {exc}; {hint}") from None
    return MooncakeDistributedStore


@dataclass(frozen=True)
class MooncakeOptions:
    """What a ``mooncake://`` URI says; see the module docstring."""

    master_host: str
    master_port: int
    protocol: str = "tcp"
    devices: str = ""
    segment: int = 0
    namespace: str = DEFAULT_NAMESPACE
    host: str = ""
    metadata: str = "P2PHANDSHAKE"
    pool: int = DEFAULT_POOL
    pin: str = "auto"
    metrics: str = ""  # HOST:PORT of the master's metrics server

    @property
    def master(self) -> str:
        return f"{self.master_host}:{self.master_port}"

    @classmethod
    def parse(cls, uri: str) -> MooncakeOptions:
        if not uri.startswith(PREFIX):
            raise ValueError(f"mooncake store URI {uri!r} must start with {PREFIX}")
        parts = urlsplit(uri)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"mooncake store URI {uri!r}: {exc}") from None
        if not host or not port or parts.path not in ("", "/") or parts.fragment:
            raise ValueError(
                f"mooncake store URI {uri!r} must be mooncake://MASTER_HOST:PORT[?options]"
            )
        fields: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(fields) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"mooncake store URI {uri!r}: unknown option(s) {unknown}")
        if fields.setdefault("protocol", "tcp") not in ("tcp", "rdma"):
            raise ValueError(f"mooncake store URI {uri!r}: protocol must be tcp or rdma")
        if fields.setdefault("pin", "auto") not in ("auto", "0", "1"):
            raise ValueError(f"mooncake store URI {uri!r}: pin must be auto, 0 or 1")
        namespace = fields.setdefault("namespace", DEFAULT_NAMESPACE)
        if not codec.SAMPLE_ID_PATTERN.match(namespace) or len(namespace) > 64 or ".." in namespace:
            raise ValueError(f"mooncake store URI {uri!r}: namespace must be 1-64 [A-Za-z0-9._-]")
        for name in ("segment", "pool"):
            if name in fields:
                fields[name] = parse_size(fields[name])
        if "host" not in fields:
            fields["host"] = _local_host_towards(host, port)
        fields["metrics"] = _metrics_address(uri, fields.get("metrics", ""), host)
        return cls(master_host=host, master_port=port, **fields)


def _metrics_address(uri: str, value: str, master_host: str) -> str:
    """``HOST:PORT`` from ``PORT``, ``HOST:PORT`` or nothing (the master's default port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = master_host, port or str(DEFAULT_METRICS_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
        raise ValueError(f"mooncake store URI {uri!r}: metrics must be [HOST:]PORT")
    return f"{host}:{int(port)}"


def allocated_bytes(metrics_text: str) -> int | None:
    """The ``master_allocated_bytes`` gauge of a master's Prometheus text, or None if absent."""
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name == ALLOCATED_METRIC:
            return int(float(value))
    return None


def _local_host_towards(host: str, port: int) -> str:
    """This machine's address on the route to the master (loopback for a loopback master)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(infos[0][4])  # UDP connect: picks a route, sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _size_class(nbytes: int) -> int:
    """Capacity for ``nbytes``: four steps per power of two (<= 25% slack), at least 64 KiB."""
    nbytes = max(nbytes, 64 << 10)
    step = 1 << max(nbytes.bit_length() - 3, 0)
    return -(-nbytes // step) * step


class PooledBuffer:
    """A registered buffer of the pool. ``view`` is its memory as bytes; tensors from
    ``get_into`` view it, so use or copy them before ``release`` (or the ``with`` exit)."""

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
    """Registered buffers reused across puts and gets; thread-safe.

    Registration pins memory for RDMA (costly per call), and fresh memory costs page faults, so
    buffers go back to a free list by size class; free ones beyond ``retain_bytes`` are dropped.
    """

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
        capacity = _size_class(nbytes)
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
        address = _address(view)
        code = self._client.register_buffer(address, capacity)
        if code != 0:
            raise FeatureStoreError(f"cannot register a {capacity}-byte buffer: {_status(code)}")
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

    def covers(self, address: int, nbytes: int) -> bool:
        """Whether ``[address, address + nbytes)`` lies inside one registered pool buffer."""
        with self._lock:
            return any(
                b.address <= address and address + nbytes <= b.address + b.capacity
                for b in self._live.values()
            )

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    @property
    def registered(self) -> int:
        return len(self._live)

    def close(self) -> None:
        """Unregister everything (the client is about to close); buffers still held stay valid
        memory for the tensors that view them."""
        with self._lock:
            self._closed = True
            live, self._live, self._free, self._free_bytes = list(self._live.values()), {}, {}, 0
        for buffer in live:
            self._client.unregister_buffer(buffer.address)


@dataclass
class PooledSample:
    """Tensors viewing a pooled buffer: ``release`` (or ``with``) returns it to the pool."""

    tensors: dict[str, torch.Tensor]
    buffer: PooledBuffer

    def release(self) -> None:
        self.tensors = {}
        self.buffer.release()

    def __enter__(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Gate:
    """Counts calls in flight so ``close`` waits for them: a call on a closed client segfaults
    (seen with 0.3.13), so none may start after ``close`` or still run during it."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._cond = threading.Condition()
        self._active = 0
        self.closed = False

    def __enter__(self) -> None:
        with self._cond:
            if self.closed:
                raise FeatureStoreError(f"feature store {self._uri} is closed")
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def close(self) -> bool:
        """Refuse new calls, wait for those in flight; False if already closed."""
        with self._cond:
            if self.closed:
                return False
            self.closed = True
            self._cond.wait_for(lambda: not self._active)
            return True


@dataclass(frozen=True)
class _Plan:
    """Where each tensor goes in the codec's layout, before any byte is written."""

    header: bytes
    specs: tuple[TensorSpec, ...]
    placed: tuple[tuple[torch.Tensor, int], ...]
    nbytes: int


def _plan(tensors: Mapping[str, torch.Tensor]) -> _Plan:
    """The exact layout ``codec.encode`` writes (widest elements first, header padded to 8 bytes),
    so the bytes -- and the location's size and checksum -- equal those of the other stores."""
    specs: list[TensorSpec] = []
    entries: list[tuple[str, torch.Tensor, int]] = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must be a non-empty string, not __metadata__")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        dtype_name = codec._BY_TORCH.get(tensor.dtype)
        if dtype_name is None:
            raise ValueError(
                f"tensor {name!r} has dtype {tensor.dtype}; supported: {', '.join(codec._DTYPES)}"
            )
        specs.append(TensorSpec(name, dtype_name, tuple(tensor.shape)))
        entries.append((name, tensor, tensor.element_size()))
    entries.sort(key=lambda e: (-e[2], e[0]))
    header: dict[str, dict[str, object]] = {}
    placed: list[tuple[torch.Tensor, int]] = []
    offset = 0
    for name, tensor, itemsize in entries:
        size = tensor.numel() * itemsize
        header[name] = {
            "dtype": codec._DTYPES[codec._BY_TORCH[tensor.dtype]][0],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        placed.append((tensor, offset))
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return _Plan(header_bytes, tuple(specs), tuple(placed), 8 + len(header_bytes) + offset)


def _write(plan: _Plan, view: memoryview) -> None:
    """Encode into ``view`` (exactly ``plan.nbytes`` long): one copy per tensor."""
    base = 8 + len(plan.header)
    view[0:8] = len(plan.header).to_bytes(8, "little")
    view[8:base] = plan.header
    for tensor, start in plan.placed:
        if tensor.numel():
            target = torch.frombuffer(view, dtype=tensor.dtype, count=tensor.numel(),
                                      offset=base + start)  # fmt: skip
            target.view(tensor.shape).copy_(tensor.detach())


def _writable_view(buffer: object, nbytes: int) -> memoryview:
    """The first ``nbytes`` of a caller's buffer (or pooled buffer) as flat bytes."""
    if isinstance(buffer, PooledBuffer):
        buffer = buffer.view
    return codec.writable_view(buffer, nbytes)


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
        self._gate = _Gate(uri)

    @classmethod
    def from_uri(cls, uri: str) -> MooncakeFeatureStore:
        """Connect to the master the URI names; fails fast if nothing answers there."""
        options = MooncakeOptions.parse(uri)
        client_class = load_client_class()
        try:  # Mooncake itself retries an absent master for ~90 s before giving up.
            socket.create_connection(
                (options.master_host, options.master_port), timeout=_MASTER_PROBE_TIMEOUT
            ).close()
        except OSError as exc:
            raise FeatureStoreError(
                f"no Mooncake master answers at {options.master} ({exc}); start one with "
                "`specforge mooncake-master` and a segment holder with `specforge mooncake-holder`"
            ) from None
        client = client_class()
        code = client.setup(
            options.host,
            options.metadata,
            options.segment,
            _LOCAL_BUFFER,
            options.protocol,
            options.devices,
            options.master,
        )
        if code != 0:
            raise FeatureStoreError(
                f"cannot connect to the Mooncake master at {options.master} as {options.host} "
                f"({options.protocol}): setup returned {code}"
            )
        return cls(uri, options, client)

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
                raise FeatureStoreError(f"cannot look up {uri} in {self.uri}: {_status(size)}")
            plan = _plan(tensors)
            with self.pool.acquire(plan.nbytes) as buffer:
                view = buffer.view[: plan.nbytes]
                _write(plan, view)
                checksum = codec.checksum(view)
                # A plain put keeps an existing value: only an upsert replaces a damaged copy.
                send = self._client.upsert_from if replace else self._client.put_from
                code = send(key, buffer.address, plan.nbytes)
            if code != 0:
                raise FeatureStoreError(f"cannot store {uri} in {self.uri}: {_status(code)}")
            return FeatureLocation(uri=uri, tensors=plan.specs, nbytes=plan.nbytes,
                                   checksum=checksum)  # fmt: skip

    def _stored_location(self, key: str, uri: str, size: int) -> FeatureLocation | None:
        """Location of the whole copy already stored under ``key``, or None if it is damaged
        (or went away meanwhile)."""
        with self.pool.acquire(max(size, 1)) as buffer:
            code = self._client.get_into(key, buffer.address, size)
            if code == OBJECT_NOT_FOUND:
                return None
            if code != size:
                raise FeatureStoreError(f"cannot read the stored copy of {uri}: {_status(code)}")
            try:
                return codec.describe(buffer.view[:size], uri)
            except FeatureCorruptError:
                return None

    # --- get ------------------------------------------------------------------------------

    def get(self, location: FeatureLocation) -> dict[str, torch.Tensor]:
        """Tensors the caller owns (views of a fresh buffer), after size and checksum match."""
        with self._gate:
            key = self._key_of(location)
            buffer = codec.alloc_buffer(location.nbytes)
            view = memoryview(buffer)
            self._fetch_into(key, location, view)
            return self._verified(view, location)

    def get_into(
        self, location: FeatureLocation, buffer: PooledBuffer | bytearray | memoryview | Any
    ) -> dict[str, torch.Tensor]:
        """Like ``get``, but into the first ``location.nbytes`` of ``buffer``; the tensors view it.

        A ``PooledBuffer`` (``acquire_buffer``) is already registered: nothing is allocated or
        registered. Any other writable buffer is registered for the call. ValueError for an
        unusable buffer, before any I/O; after an error the buffer may hold part of a sample.
        """
        with self._gate:
            key = self._key_of(location)
            view = _writable_view(buffer, location.nbytes)
            self._fetch_into(key, location, view)
            return self._verified(view, location)

    def get_pooled(self, location: FeatureLocation) -> PooledSample:
        """The trainer's fetch: into a pooled registered buffer (no allocation once warm).
        Release the result (or use it as a context manager) when its tensors are consumed."""
        buffer = self.acquire_buffer(location.nbytes)
        try:
            return PooledSample(self.get_into(location, buffer), buffer)
        except BaseException:
            buffer.release()
            raise

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
                _writable_view(b, loc.nbytes) for loc, b in zip(locations, buffers, strict=True)
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
            addresses = [_address(views[i]) for i in pending]
            sizes = [locations[i].nbytes for i in pending]
            temporary = self._register_foreign(addresses, sizes)
            try:
                codes = self._client.batch_get_into(keys, addresses, sizes) if keys else []
            finally:
                for address in temporary:
                    self._client.unregister_buffer(address)
            for i, key, code in zip(pending, keys, codes, strict=True):
                try:
                    self._check_read(key, locations[i], code)
                    results[i] = self._verified(views[i], locations[i])
                except FeatureStoreError as exc:
                    results[i] = exc
            return results

    def acquire_buffer(self, nbytes: int) -> PooledBuffer:
        """A registered buffer of at least ``nbytes`` from the pool; ``release`` it after use."""
        with self._gate:
            return self.pool.acquire(nbytes)

    def _register_foreign(self, addresses: list[int], sizes: list[int]) -> list[int]:
        """Register the buffers the pool does not own (RDMA can only write registered memory)."""
        temporary: list[int] = []
        try:
            for address, size in zip(addresses, sizes, strict=True):
                if self.pool.covers(address, size):
                    continue
                code = self._client.register_buffer(address, size)
                if code != 0:
                    raise FeatureStoreError(f"cannot register the caller's buffer: {_status(code)}")
                temporary.append(address)
        except BaseException:
            for address in temporary:
                self._client.unregister_buffer(address)
            raise
        return temporary

    def _fetch_into(self, key: str, location: FeatureLocation, view: memoryview) -> None:
        address = _address(view)
        temporary = self._register_foreign([address], [location.nbytes])
        try:
            code = self._client.get_into(key, address, location.nbytes)
        finally:
            for registered in temporary:
                self._client.unregister_buffer(registered)
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
        raise FeatureStoreError(f"cannot read {location.uri} from {self.uri}: {_status(code)}")

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
                raise FeatureStoreError(f"cannot delete {location.uri}: {_status(code)}")

    def exists(self, location: FeatureLocation) -> bool:
        with self._gate:
            key = self._key_of(location)
            code = self._client.is_exist(key)
            if code < 0:
                raise FeatureStoreError(f"cannot look up {location.uri}: {_status(code)}")
            return code == 1

    def used_bytes(self) -> int | None:
        """Bytes the whole store holds now (every namespace: eviction is store-wide), from the
        master's metrics server; None if it does not answer (see the ``metrics`` option)."""
        url = f"http://{self.options.metrics}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=_METRICS_TIMEOUT) as response:  # noqa: S310
                return allocated_bytes(response.read().decode())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def close(self) -> None:
        """Wait for calls in flight, then unregister the pool and disconnect; later calls are
        refused. Tensors from ``get`` stay valid; pooled ones stay readable memory."""
        if self._gate.close():
            self.pool.close()
            self._client.close()


def from_uri(uri: str) -> MooncakeFeatureStore:
    """The ``open_store`` factory for ``mooncake://`` (imported only when such a URI is opened)."""
    return MooncakeFeatureStore.from_uri(uri)
