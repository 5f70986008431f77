"""mem:// store: the same bytes and checks as file://, shared by name, private copies."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import torch
import xxhash

from specforge_common.contracts import FeatureLocation, TensorSpec
from specforge_common.featurestore import (
    FeatureCorruptError,
    FeatureMissingError,
    FeatureOutsideRootError,
    FeatureStore,
    FeatureStoreError,
    MemoryFeatureStore,
    open_store,
)
from specforge_common.featurestore.codec import encode

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape) * 100).to(dtype)
    return torch.randint(0, 100, shape).to(dtype)


def _uri() -> str:
    """A fresh space per test: spaces live as long as the process."""
    return f"mem://test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store() -> MemoryFeatureStore:
    opened = open_store(_uri())
    assert isinstance(opened, MemoryFeatureStore)
    return opened


def _with(location: FeatureLocation, **changes: object) -> FeatureLocation:
    fields = {
        "uri": location.uri,
        "tensors": location.tensors,
        "nbytes": location.nbytes,
        "checksum": location.checksum,
    }
    return FeatureLocation(**(fields | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_each_dtype(store: MemoryFeatureStore, dtype: torch.dtype) -> None:
    tensors = {
        "matrix": _tensor(dtype, (5, 9)),
        "scalar": _tensor(dtype, ()),
        "empty": _tensor(dtype, (3, 0)),
    }
    location = store.put("s", tensors)
    out = store.get(location)
    assert list(out) == list(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor)


def test_location_matches_a_file_store_for_the_same_sample(
    store: MemoryFeatureStore, tmp_path: Path
) -> None:
    tensors = {
        "hidden_states": torch.randn(1, 512, 2048).to(torch.bfloat16),
        "ids": torch.arange(9),
    }
    mem = store.put("same", tensors)
    disk = open_store(f"file://{tmp_path}").put("same", tensors)
    assert mem.uri == f"mem:{store.name}/same"
    assert (mem.tensors, mem.nbytes, mem.checksum) == (disk.tensors, disk.nbytes, disk.checksum)
    buf, _ = encode(tensors)
    assert mem.checksum == "xxh3_128:" + xxhash.xxh3_128_hexdigest(bytes(buf))


def test_same_name_shares_and_other_names_are_isolated() -> None:
    uri = _uri()
    writer, reader = open_store(uri), open_store(uri)
    other = open_store(_uri())
    location = writer.put("shared", {"x": torch.arange(4)})
    assert torch.equal(reader.get(location)["x"], torch.arange(4))
    reader.delete(location)
    assert not writer.exists(location)

    location = writer.put("shared", {"x": torch.arange(4)})
    other_location = other.put("shared", {"x": torch.zeros(4, dtype=torch.int64)})
    assert torch.equal(writer.get(location)["x"], torch.arange(4))
    assert torch.equal(other.get(other_location)["x"], torch.zeros(4, dtype=torch.int64))
    for call in (other.get, other.exists, other.delete):
        with pytest.raises(FeatureOutsideRootError):
            call(location)
    assert writer.exists(location)


def test_default_space() -> None:
    plain, named = open_store("mem://"), open_store("mem://default")
    assert plain.uri == "mem://"
    location = plain.put(f"d-{uuid.uuid4().hex}", {"x": torch.ones(2)})
    assert location.uri.startswith("mem:default/")
    assert torch.equal(named.get(location)["x"], torch.ones(2))
    named.delete(location)


def test_copy_semantics(store: MemoryFeatureStore) -> None:
    source = torch.zeros(4, 4)
    location = store.put("copy", {"x": source})
    source.fill_(9)  # after put: the stored value must not follow
    first = store.get(location)
    first["x"].fill_(5)  # a caller mutating its result must not change the store
    second = store.get(location)
    assert torch.equal(second["x"], torch.zeros(4, 4))
    assert second["x"].data_ptr() != first["x"].data_ptr()


def test_missing_delete_exists(store: MemoryFeatureStore) -> None:
    location = store.put("m", {"x": torch.zeros(1)})
    assert store.exists(location)
    never = _with(location, uri=f"mem:{store.name}/never")
    assert not store.exists(never)
    with pytest.raises(FeatureMissingError):
        store.get(never)
    store.delete(location)
    store.delete(location)  # idempotent
    assert not store.exists(location)
    with pytest.raises(FeatureMissingError):
        store.get(location)


def test_integrity_checks(store: MemoryFeatureStore) -> None:
    location = store.put("i", {"x": torch.randn(4, 4)})
    with pytest.raises(FeatureCorruptError, match="checksum"):
        store.get(_with(location, checksum="xxh3_128:" + "0" * 32))
    with pytest.raises(FeatureCorruptError):
        store.get(_with(location, nbytes=location.nbytes + 1))
    with pytest.raises(FeatureCorruptError):
        store.get(_with(location, tensors=(TensorSpec("x", "bfloat16", (4, 4)),)))
    with pytest.raises(FeatureCorruptError):
        store.get(_with(location, tensors=(TensorSpec("x", "float32", (2, 8)),)))
    with pytest.raises(FeatureStoreError, match="sha256"):
        store.get(_with(location, checksum="sha256:00"))


def test_first_copy_wins_until_deleted(store: MemoryFeatureStore) -> None:
    first = store.put("o", {"x": torch.zeros(3)})
    assert store.put("o", {"x": torch.ones(3)}) == first
    assert torch.equal(store.get(first)["x"], torch.zeros(3))
    store.delete(first)
    fresh = store.put("o", {"x": torch.ones(4)})
    assert torch.equal(store.get(fresh)["x"], torch.ones(4))
    with pytest.raises(FeatureCorruptError, match="replaced"):
        store.get(first)


def test_foreign_and_malformed_locations(store: MemoryFeatureStore) -> None:
    location = store.put("f", {"x": torch.zeros(1)})
    with pytest.raises(FeatureStoreError, match="not a mem: location") as info:
        store.get(_with(location, uri="file:ab/f.safetensors"))
    assert type(info.value) is FeatureStoreError
    for uri in (f"mem:{store.name}/../x", f"mem:{store.name}/a/b", f"mem:{store.name}"):
        with pytest.raises(FeatureOutsideRootError):
            store.get(_with(location, uri=uri))


def test_invalid_ids_and_names(store: MemoryFeatureStore) -> None:
    for bad in ["../x", "a/b", "", "a..b"]:
        with pytest.raises(ValueError):
            store.put(bad, {"x": torch.zeros(1)})
    for uri in ("mem://a/b", "mem://../x", "mem://" + "n" * 65):
        with pytest.raises(ValueError):
            open_store(uri)


def test_closed_handle_refuses_but_space_remains() -> None:
    uri = _uri()
    first, second = open_store(uri), open_store(uri)
    location = first.put("c", {"x": torch.ones(1)})
    first.close()
    with pytest.raises(FeatureStoreError, match="closed"):
        first.get(location)
    assert isinstance(second, FeatureStore)
    assert torch.equal(second.get(location)["x"], torch.ones(1))


def test_threads_share_one_space() -> None:
    uri = _uri()
    locations: list[FeatureLocation] = []

    def capture() -> None:
        writer = open_store(uri)
        for i in range(50):
            locations.append(writer.put(f"t{i}", {"x": torch.full((8,), i)}))

    thread = threading.Thread(target=capture)
    thread.start()
    thread.join()
    trainer = open_store(uri)
    for i, location in enumerate(locations):
        assert torch.equal(trainer.get(location)["x"], torch.full((8,), i))
