"""The bytes of one stored sample: safetensors layout, xxh3-128 checksum, zero-copy decode.

Every store keeps exactly these bytes, so a sample has the same size and checksum in whichever
store holds it and switching stores changes nothing upstream.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from collections.abc import Mapping

import torch
import xxhash

from specforge_common.contracts import FeatureLocation, TensorSpec
from specforge_common.featurestore.errors import FeatureCorruptError, FeatureStoreError

CHECKSUM_ALGORITHM = "xxh3_128"

# Sample ids become file names: one path component, no way to climb out of the store root.
SAMPLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")

# TensorSpec dtype (torch name) -> (safetensors name, torch dtype).
_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "bfloat16": ("BF16", torch.bfloat16),
    "float16": ("F16", torch.float16),
    "float32": ("F32", torch.float32),
    "float64": ("F64", torch.float64),
    "int64": ("I64", torch.int64),
    "int32": ("I32", torch.int32),
    "int16": ("I16", torch.int16),
    "int8": ("I8", torch.int8),
    "uint8": ("U8", torch.uint8),
    "bool": ("BOOL", torch.bool),
}
_BY_SAFETENSORS = {st: (name, dtype) for name, (st, dtype) in _DTYPES.items()}
_BY_TORCH = {dtype: name for name, (_, dtype) in _DTYPES.items()}

# Below this a plain bytearray is cheaper than a mapping of its own.
_HUGE_PAGE = 2 << 20

Buffer = bytearray | mmap.mmap


def validate_sample_id(sample_id: str) -> str:
    """Refuse ids that are not one safe file-name component (ValueError: a caller bug)."""
    if not isinstance(sample_id, str) or not SAMPLE_ID_PATTERN.match(sample_id):
        raise ValueError(
            f"sample id {sample_id!r} must be 1-200 characters of letters, digits, '.', '_' or '-'"
        )
    if ".." in sample_id:
        raise ValueError(f"sample id {sample_id!r} must not contain '..'")
    return sample_id


def alloc_buffer(nbytes: int) -> Buffer:
    """A fresh writable buffer that decoded tensors may point into for as long as they live.

    Big ones are private anonymous maps advised for transparent huge pages: faulting in 4 KiB
    pages of a fresh 64 MiB buffer costs more than copying the file into it.
    """
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return bytearray(nbytes)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def checksum_string(hasher: xxhash.xxh3_128) -> str:
    return f"{CHECKSUM_ALGORITHM}:{hasher.hexdigest()}"


def checksum(data: Buffer | bytes) -> str:
    return checksum_string(xxhash.xxh3_128(data))


def check_algorithm(location: FeatureLocation) -> None:
    """Refuse before any I/O a location hashed with an algorithm this code cannot verify."""
    algorithm = location.checksum.partition(":")[0]
    if algorithm != CHECKSUM_ALGORITHM:
        raise FeatureStoreError(
            f"location {location.uri!r} has checksum algorithm {algorithm!r}; "
            f"this store verifies only {CHECKSUM_ALGORITHM!r}"
        )


def verify_checksum(actual: str, location: FeatureLocation) -> None:
    if actual != location.checksum:
        raise FeatureCorruptError(
            f"{location.uri}: checksum {actual} does not match the location's {location.checksum} "
            "(corrupted, or overwritten by a later put)"
        )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Layout:
    """Where each tensor of a sample goes in its stored bytes, fixed before any byte is written.

    Planning first lets a store size (and register) the destination, then encode straight into
    it with one copy per tensor; ``encode`` is plan + ``write_into`` a fresh buffer, so every
    store writes the same bytes.
    """

    __slots__ = ("specs", "nbytes", "_header", "_placed")

    def __init__(
        self,
        specs: tuple[TensorSpec, ...],
        header: bytes,
        placed: tuple[tuple[torch.Tensor, int], ...],
        data_bytes: int,
    ) -> None:
        self.specs = specs  # in the caller's order: what the location lists
        self.nbytes = 8 + len(header) + data_bytes
        self._header = header
        self._placed = placed  # (tensor, offset after the header)

    def write_into(self, buffer: object) -> memoryview:
        """Encode into the first ``nbytes`` of ``buffer``; returns that part as a byte view.

        Copying with ``copy_`` into views of the buffer makes the stored value independent of
        the caller's tensors and handles non-contiguous and non-CPU tensors in the same single
        copy. ValueError for a buffer that is read-only, not contiguous or too short.
        """
        view = writable_view(buffer, self.nbytes)
        base = 8 + len(self._header)
        view[0:8] = len(self._header).to_bytes(8, "little")
        view[8:base] = self._header
        for tensor, start in self._placed:
            if tensor.numel():
                target = torch.frombuffer(
                    view, dtype=tensor.dtype, count=tensor.numel(), offset=base + start
                )
                target.view(tensor.shape).copy_(tensor.detach())
        return view


def plan(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """The layout of ``tensors`` in standard safetensors; ValueError / TypeError for a name,
    value or dtype this format cannot store."""
    specs: list[TensorSpec] = []
    entries: list[tuple[str, torch.Tensor, str, int]] = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must be a non-empty string, not __metadata__")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        dtype_name = _BY_TORCH.get(tensor.dtype)
        if dtype_name is None:
            raise ValueError(
                f"tensor {name!r} has dtype {tensor.dtype}; supported: {', '.join(_DTYPES)}"
            )
        specs.append(TensorSpec(name, dtype_name, tuple(tensor.shape)))
        entries.append((name, tensor, _DTYPES[dtype_name][0], _itemsize(tensor.dtype)))

    # Widest elements first: with the header padded to 8 bytes every tensor starts aligned.
    entries.sort(key=lambda e: (-e[3], e[0]))
    header: dict[str, dict[str, object]] = {}
    placed: list[tuple[torch.Tensor, int]] = []
    offset = 0
    for name, tensor, st_dtype, itemsize in entries:
        size = tensor.numel() * itemsize
        header[name] = {
            "dtype": st_dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        placed.append((tensor, offset))
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return Layout(tuple(specs), header_bytes, tuple(placed), offset)


def encode(tensors: Mapping[str, torch.Tensor]) -> tuple[Buffer, tuple[TensorSpec, ...]]:
    """Serialize into one fresh buffer and describe each tensor."""
    layout = plan(tensors)
    buf = alloc_buffer(layout.nbytes)
    layout.write_into(buf)
    return buf, layout.specs


def describe(buf: Buffer, uri: str) -> FeatureLocation:
    """The location of bytes already stored at ``uri``; FeatureCorruptError if they are not whole.

    Used when a put finds the sample already stored (a redelivered capture): the stored copy is
    kept and its location returned, so a SampleRef published by the first attempt stays valid.
    """
    probe = FeatureLocation(uri=uri, tensors=(), nbytes=len(buf), checksum="")
    if len(buf) < 8:
        raise _corrupt(probe, "too short for a safetensors header")
    header_len = int.from_bytes(buf[0:8], "little")
    try:
        header = json.loads(bytes(buf[8 : 8 + header_len]))
        header.pop("__metadata__", None)
        specs = tuple(
            TensorSpec(name, _BY_SAFETENSORS[info["dtype"]][0], tuple(info["shape"]))
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        )
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise _corrupt(probe, f"unreadable header ({exc!r})") from None
    location = FeatureLocation(uri=uri, tensors=specs, nbytes=len(buf), checksum=checksum(buf))
    decode(buf, location)  # every remaining structural check
    return location


def _corrupt(location: FeatureLocation, why: str) -> FeatureCorruptError:
    return FeatureCorruptError(f"{location.uri}: {why}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode(buf: Buffer, location: FeatureLocation) -> dict[str, torch.Tensor]:
    """Tensors as views into ``buf`` (no copy), after checking the header against the location.

    Dtype and shape come from the location and must equal the header's; nothing is guessed.
    Call only after the checksum matched: this guards against bad writers, not bit rot.
    """
    size = len(buf)
    if size < 8:
        raise _corrupt(location, f"{size} bytes is too short for a safetensors header")
    header_len = int.from_bytes(buf[0:8], "little")
    if header_len > size - 8:
        raise _corrupt(location, f"header length {header_len} exceeds the {size}-byte object")
    try:
        header = json.loads(bytes(buf[8 : 8 + header_len]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(location, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(location, "header is not a JSON object")
    header.pop("__metadata__", None)

    expected = {spec.name: spec for spec in location.tensors}
    if len(expected) != len(location.tensors):
        raise _corrupt(location, "the location names a tensor twice")
    if set(header) != set(expected):
        raise _corrupt(
            location,
            f"stored tensors {sorted(header)} differ from the location's {sorted(expected)}",
        )

    base = 8 + header_len
    data_len = size - base
    out: dict[str, torch.Tensor] = {}
    for spec in location.tensors:
        info = header[spec.name]
        if not isinstance(info, dict):
            raise _corrupt(location, f"header entry for {spec.name!r} is not an object")
        st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if st_dtype not in _BY_SAFETENSORS:
            raise _corrupt(location, f"tensor {spec.name!r} has unknown dtype {st_dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _corrupt(location, f"tensor {spec.name!r} has a bad shape {shape!r}")
        dtype_name, dtype = _BY_SAFETENSORS[st_dtype]
        if dtype_name != spec.dtype or tuple(shape) != tuple(spec.shape):
            raise _corrupt(
                location,
                f"tensor {spec.name!r} is stored as {dtype_name}{shape} but the location says "
                f"{spec.dtype}{list(spec.shape)}",
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
        ):
            raise _corrupt(location, f"tensor {spec.name!r} has bad data_offsets {offsets!r}")
        start, end = offsets
        numel = math.prod(shape)
        if not start <= end <= data_len or end - start != numel * _itemsize(dtype):
            raise _corrupt(
                location,
                f"tensor {spec.name!r} data_offsets {offsets} do not fit its shape or the object",
            )
        if numel == 0:
            out[spec.name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start)
            out[spec.name] = flat.view(shape)
    return out


def writable_view(buffer: object, nbytes: int) -> memoryview:
    """The first ``nbytes`` of a caller's buffer as a flat byte view; ValueError if unusable."""
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"buffer must be a writable bytes-like object, not {type(buffer).__name__}"
        ) from None
    if view.readonly:
        raise ValueError(f"buffer ({type(buffer).__name__}) is read-only")
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"buffer cannot be viewed as bytes: {exc}") from None
    if view.nbytes < nbytes:
        raise ValueError(f"buffer holds {view.nbytes} bytes but the sample needs {nbytes}")
    return view[:nbytes]
