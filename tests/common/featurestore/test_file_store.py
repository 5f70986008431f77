"""file:// store on real files: round trips, integrity checks, root confinement, atomic writes."""

from __future__ import annotations

import io
import mmap
import multiprocessing
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import torch
import xxhash

from specforge_common.contracts import FeatureLocation, TensorSpec
from specforge_common.featurestore import (
    FeatureCorruptError,
    FeatureMissingError,
    FeatureOutsideRootError,
    FeatureStore,
    FeatureStoreError,
    FileFeatureStore,
    open_store,
)
from specforge_common.featurestore import file as file_store
from specforge_common.featurestore.codec import alloc_buffer, checksum, encode

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
    gen = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen).to(dtype)


@pytest.fixture
def store(tmp_path: Path) -> FileFeatureStore:
    opened = open_store(f"file://{tmp_path / 'features'}")
    assert isinstance(opened, FileFeatureStore)
    return opened


def _path(store: FileFeatureStore, location: FeatureLocation) -> Path:
    return store.root / location.uri.removeprefix("file:")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_each_dtype(store: FileFeatureStore, dtype: torch.dtype) -> None:
    tensors = {
        "matrix": _tensor(dtype, (3, 17)),
        "scalar": _tensor(dtype, ()),
        "empty": _tensor(dtype, (0, 4)),
    }
    location = store.put("sample-1", tensors)
    out = store.get(location)
    assert list(out) == list(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == dtype
        assert out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor)
    assert [(s.name, s.dtype, s.shape) for s in location.tensors] == [
        (n, str(dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()
    ]


def test_large_mixed_sample_and_non_contiguous_input(store: FileFeatureStore) -> None:
    hidden = torch.randn(1, 512, 2048).to(torch.bfloat16)  # 2 MiB: the huge-page buffer path
    transposed = torch.randn(64, 32).t()
    tensors = {"hidden_states": hidden, "t": transposed, "ids": torch.arange(512)}
    out = store.get(store.put("big", tensors))
    for name, tensor in tensors.items():
        assert torch.equal(out[name], tensor)


def test_location_is_relative_and_describes_the_file(store: FileFeatureStore) -> None:
    location = store.put("s.1", {"x": torch.ones(2, 2)})
    assert location.uri.startswith("file:")
    rel = location.uri.removeprefix("file:")
    assert not rel.startswith("/") and ".." not in rel
    assert str(store.root) not in location.uri
    fan, name = rel.split("/")
    assert len(fan) == 2 and name == "s.1.safetensors"
    data = _path(store, location).read_bytes()
    assert location.nbytes == len(data)
    assert location.checksum == "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)


def test_file_reads_with_safetensors_library(store: FileFeatureStore) -> None:
    tensors = {"h": _tensor(torch.bfloat16, (4, 8)), "m": _tensor(torch.bool, (4,))}
    location = store.put("lib", tensors)
    with safetensors.safe_open(str(_path(store, location)), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_same_bytes_as_an_independent_encode(store: FileFeatureStore) -> None:
    tensors = {"a": torch.arange(6).reshape(2, 3)}
    location = store.put("enc", tensors)
    buf, _ = encode(tensors)
    assert _path(store, location).read_bytes() == bytes(buf)


def test_caller_owns_the_returned_tensors(store: FileFeatureStore) -> None:
    source = torch.zeros(3)
    location = store.put("own", {"x": source})
    source += 1  # mutating after put changes nothing stored
    first = store.get(location)
    first["x"] += 5  # mutating a result changes neither the file nor the next get
    assert torch.equal(store.get(location)["x"], torch.zeros(3))


def test_flipped_data_byte_is_corrupt(store: FileFeatureStore) -> None:
    location = store.put("flip", {"x": torch.randn(64, 64)})
    path = _path(store, location)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(FeatureCorruptError, match="checksum"):
        store.get(location)


def test_truncated_file_is_corrupt(store: FileFeatureStore) -> None:
    location = store.put("trunc", {"x": torch.randn(64, 64)})
    path = _path(store, location)
    os.truncate(path, location.nbytes - 1)
    with pytest.raises(FeatureCorruptError, match="truncated"):
        store.get(location)


def test_tampered_header_is_corrupt(store: FileFeatureStore) -> None:
    location = store.put("head", {"x": torch.randn(4, 4)})
    path = _path(store, location)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"F32"', b'"I32"', 1))
    with pytest.raises(FeatureCorruptError):
        store.get(location)


def test_header_rewritten_with_a_matching_checksum_still_refused(
    store: FileFeatureStore,
) -> None:
    """A writer that rewrote the header and the checksum cannot change what the location says."""
    location = store.put("rewrite", {"x": torch.randn(4, 4)})
    path = _path(store, location)
    data = path.read_bytes().replace(b"[4,4]", b"[2,8]", 1)
    path.write_bytes(data)
    forged = FeatureLocation(
        uri=location.uri,
        tensors=location.tensors,
        nbytes=len(data),
        checksum="xxh3_128:" + xxhash.xxh3_128_hexdigest(data),
    )
    with pytest.raises(FeatureCorruptError, match="location says"):
        store.get(forged)


@pytest.mark.parametrize(
    "specs",
    [
        (TensorSpec("x", "float16", (4, 4)),),
        (TensorSpec("x", "float32", (16,)),),
        (TensorSpec("y", "float32", (4, 4)),),
        (TensorSpec("x", "float32", (4, 4)), TensorSpec("z", "int64", (1,))),
    ],
    ids=["dtype", "shape", "name", "extra"],
)
def test_specs_that_disagree_with_the_file_are_corrupt(
    store: FileFeatureStore, specs: tuple[TensorSpec, ...]
) -> None:
    location = store.put("specs", {"x": torch.randn(4, 4)})
    wrong = FeatureLocation(
        uri=location.uri, tensors=specs, nbytes=location.nbytes, checksum=location.checksum
    )
    with pytest.raises(FeatureCorruptError):
        store.get(wrong)


def _foreign(uri: str) -> FeatureLocation:
    return FeatureLocation(uri=uri, tensors=(), nbytes=1, checksum="xxh3_128:00")


@pytest.mark.parametrize("uri", ["file:../../etc/passwd", "file:/etc/passwd", "file:///etc/passwd"])
def test_reads_outside_the_root_are_refused(store: FileFeatureStore, uri: str) -> None:
    with pytest.raises(FeatureOutsideRootError):
        store.get(_foreign(uri))
    with pytest.raises(FeatureOutsideRootError):
        store.exists(_foreign(uri))


@pytest.mark.parametrize(
    "uri",
    [
        "file:../outside.safetensors",
        "file:ab/../../outside.safetensors",
        "file:{victim}",
        "file://{victim}",
        "file:",
        "file:.",
    ],
)
def test_locations_outside_the_root_touch_nothing(store: FileFeatureStore, uri: str) -> None:
    victim = store.root.parent / "outside.safetensors"
    victim.write_bytes(b"keep me")
    location = _foreign(uri.format(victim=victim))
    for call in (store.get, store.exists, store.delete):
        with pytest.raises(FeatureOutsideRootError):
            call(location)
    assert victim.read_bytes() == b"keep me"


def test_symlink_out_of_the_root_is_refused(store: FileFeatureStore, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "s.safetensors").write_bytes(b"secret")
    (store.root / "zz").symlink_to(outside)
    with pytest.raises(FeatureOutsideRootError):
        store.get(_foreign("file:zz/s.safetensors"))
    with pytest.raises(FeatureOutsideRootError):
        store.delete(_foreign("file:zz/s.safetensors"))
    assert (outside / "s.safetensors").exists()


def test_other_scheme_is_refused(store: FileFeatureStore) -> None:
    with pytest.raises(FeatureStoreError, match="not a file: location") as info:
        store.get(_foreign("mem:default/s"))
    assert type(info.value) is FeatureStoreError


def test_invalid_sample_ids_are_refused(store: FileFeatureStore) -> None:
    for bad in ["../escape", "a/b", "", "a..b", "x" * 201]:
        with pytest.raises(ValueError):
            store.put(bad, {"x": torch.zeros(1)})
    assert _files(store.root) == []


def test_missing_delete_exists(store: FileFeatureStore) -> None:
    location = store.put("gone", {"x": torch.zeros(1)})
    assert store.exists(location)
    never = FeatureLocation(
        uri="file:00/never.safetensors",
        tensors=location.tensors,
        nbytes=location.nbytes,
        checksum=location.checksum,
    )
    assert not store.exists(never)
    with pytest.raises(FeatureMissingError):
        store.get(never)
    store.delete(location)
    store.delete(location)  # idempotent
    store.delete(never)
    assert not store.exists(location)
    with pytest.raises(FeatureMissingError):
        store.get(location)


def test_first_copy_wins_so_a_published_location_stays_valid(store: FileFeatureStore) -> None:
    first = store.put("again", {"x": torch.zeros(8)})
    # A redelivered capture recomputes the sample with slightly different bytes.
    second = store.put("again", {"x": torch.ones(8)})
    assert second == first
    assert torch.equal(store.get(first)["x"], torch.zeros(8))
    assert len(_files(store.root)) == 1


def test_a_damaged_copy_is_replaced_by_the_next_put(store: FileFeatureStore) -> None:
    first = store.put("damaged", {"x": torch.zeros(8)})
    path = store.root / first.uri.removeprefix("file:")
    path.write_bytes(path.read_bytes()[:-5])  # truncated by a crash
    second = store.put("damaged", {"x": torch.ones(8)})
    assert torch.equal(store.get(second)["x"], torch.ones(8))
    with pytest.raises(FeatureCorruptError, match="overwritten"):
        store.get(first)


def test_delete_then_put_stores_the_new_value(store: FileFeatureStore) -> None:
    first = store.put("recaptured", {"x": torch.zeros(4)})
    store.delete(first)
    second = store.put("recaptured", {"x": torch.full((4,), 2.0)})
    assert torch.equal(store.get(second)["x"], torch.full((4,), 2.0))


def test_no_temp_files_left(store: FileFeatureStore) -> None:
    for i in range(5):
        store.put(f"s{i}", {"x": torch.full((10,), i)})
    files = _files(store.root)
    assert len(files) == 5
    assert all(f.name.endswith(".safetensors") and not f.name.startswith(".") for f in files)


def test_other_paths_to_the_same_directory_read_the_same_locations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "shared" / "features"
    writer = open_store(f"file://{real}")
    location = writer.put("portable", {"h": torch.arange(12).reshape(3, 4)})

    (tmp_path / "mnt").symlink_to(tmp_path / "shared")
    via_link = open_store(f"file://{tmp_path / 'mnt' / 'features'}")
    monkeypatch.chdir(tmp_path)
    via_relative = open_store("file://./shared/features")
    for reader in (via_link, via_relative):
        assert torch.equal(reader.get(location)["h"], torch.arange(12).reshape(3, 4))


def test_open_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    opened = open_store("file://./a/b")
    assert isinstance(opened, FeatureStore)
    assert opened.uri == "file://./a/b"
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(ValueError, match="file://"):
        open_store("file://")
    with pytest.raises(ValueError, match=r"known schemes: file://, mem://, mooncake://"):
        open_store("s3://bucket/x")
    with pytest.raises(ValueError):
        open_store("/no/scheme")


def test_closed_store_refuses(store: FileFeatureStore) -> None:
    location = store.put("c", {"x": torch.zeros(1)})
    store.close()
    with pytest.raises(FeatureStoreError, match="closed"):
        store.get(location)
    with pytest.raises(FeatureStoreError, match="closed"):
        store.put("d", {"x": torch.zeros(1)})


# --- get_into: a caller's reusable buffer ------------------------------------------------


def _mixed() -> dict[str, torch.Tensor]:
    return {
        "hidden_states": _tensor(torch.bfloat16, (2, 64, 32)),
        "input_ids": torch.arange(64),
        "loss_mask": _tensor(torch.bool, (64,)),
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda n: bytearray(n),
        lambda n: bytearray(n + 100),  # longer than needed: only the first n bytes are used
        lambda n: memoryview(bytearray(n + 3))[3:],  # a slice with an offset
        lambda n: memoryview(bytearray(-(-n // 4) * 4)).cast("i"),  # not a byte format
        lambda n: memoryview(bytearray(n)).cast("B", (1, n)),  # not one-dimensional
        lambda n: alloc_buffer(n),
        lambda n: mmap.mmap(-1, n),
    ],
    ids=["bytearray", "longer", "offset", "int-format", "2d", "alloc_buffer", "mmap"],
)
def test_get_into_equals_get_and_returns_views_of_the_buffer(
    store: FileFeatureStore, make: Callable[[int], object]
) -> None:
    tensors = _mixed()
    location = store.put("into", tensors)
    buffer = make(location.nbytes)
    out = store.get_into(location, buffer)  # type: ignore[arg-type]
    plain = store.get(location)
    assert list(out) == list(plain) == list(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)
        assert torch.equal(out[name], plain[name])
    view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
    assert bytes(view[: location.nbytes]) == _path(store, location).read_bytes()
    view[: location.nbytes] = bytes(location.nbytes)  # the caller reuses its buffer...
    assert not out["input_ids"].any()  # ...and the tensors see it: they are views, not copies
    assert torch.equal(plain["input_ids"], tensors["input_ids"])  # get's own buffer is apart


def test_get_into_reused_buffer_holds_the_latest_sample(store: FileFeatureStore) -> None:
    first = store.put("a", {"x": torch.zeros(256)})
    second = store.put("b", {"x": torch.ones(256)})
    buffer = bytearray(max(first.nbytes, second.nbytes))
    assert torch.equal(store.get_into(first, buffer)["x"], torch.zeros(256))
    out = store.get_into(second, buffer)
    assert torch.equal(out["x"], torch.ones(256))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda n: bytearray(n - 1), "needs"),
        (lambda n: bytes(n), "read-only"),
        (lambda n: memoryview(bytearray(n)).toreadonly(), "read-only"),
        (lambda n: memoryview(bytearray(2 * n))[::2], "contiguous"),
        (lambda n: [0] * n, "bytes-like"),
        (lambda n: None, "bytes-like"),
    ],
    ids=["too-small", "bytes", "read-only-view", "strided", "list", "none"],
)
def test_get_into_refuses_an_unusable_buffer_before_any_io(
    store: FileFeatureStore, make: Callable[[int], object], match: str
) -> None:
    location = store.put("refused", {"x": torch.randn(16)})
    missing = FeatureLocation(
        uri="file:00/never.safetensors",
        tensors=location.tensors,
        nbytes=location.nbytes,
        checksum=location.checksum,
    )
    for target in (location, missing):  # a buffer problem wins over a missing file
        with pytest.raises(ValueError, match=match):
            store.get_into(target, make(location.nbytes))  # type: ignore[arg-type]


def test_get_into_detects_corruption(store: FileFeatureStore) -> None:
    location = store.put("into-flip", {"x": torch.randn(64, 64)})
    path = _path(store, location)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(FeatureCorruptError, match="checksum"):
        store.get_into(location, bytearray(location.nbytes))


def test_get_into_on_a_closed_store_refuses(store: FileFeatureStore) -> None:
    location = store.put("closed-into", {"x": torch.zeros(1)})
    store.close()
    with pytest.raises(FeatureStoreError, match="closed"):
        store.get_into(location, bytearray(location.nbytes))


# --- overlapped reads: the worker hashes piece i while piece i+1 is read ------------------

BIG = (1, 1536, 4096)  # 12 MiB of bf16: six overlapped pieces


@pytest.fixture(scope="module")
def big_tensors() -> dict[str, torch.Tensor]:
    hidden = torch.randn(BIG, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    return {"hidden_states": hidden, "input_ids": torch.arange(1536)}


class _Paths:
    """Which read loop each get used."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.used: list[str] = []
        for name in ("_read_single", "_read_overlapped"):
            real = getattr(file_store, name)
            monkeypatch.setattr(file_store, name, self._spy(name, real))

    def _spy(self, name: str, real: Callable[..., object]) -> Callable[..., object]:
        def spy(*args: object, **kwargs: object) -> object:
            self.used.append(name)
            return real(*args, **kwargs)

        return spy


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> _Paths:
    return _Paths(monkeypatch)


def _overlap(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(file_store, "OVERLAP_MIN_BYTES", 8 << 20 if on else 1 << 62)


def test_overlapped_get_equals_single_thread_get(
    store: FileFeatureStore,
    big_tensors: dict[str, torch.Tensor],
    paths: _Paths,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    location = store.put("big", big_tensors)
    assert location.nbytes > 12 << 20
    _overlap(monkeypatch, False)
    single = store.get(location)
    _overlap(monkeypatch, True)
    overlapped = store.get(location)
    into = store.get_into(location, bytearray(location.nbytes))
    assert paths.used == ["_read_single", "_read_overlapped", "_read_overlapped"]
    for out in (single, overlapped, into):
        for name, tensor in big_tensors.items():
            assert torch.equal(out[name], tensor)


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0], ids=["first", "middle", "last"])
@pytest.mark.parametrize("overlap", [False, True], ids=["single", "overlapped"])
def test_big_flipped_byte_is_corrupt(
    store: FileFeatureStore,
    big_tensors: dict[str, torch.Tensor],
    paths: _Paths,
    monkeypatch: pytest.MonkeyPatch,
    where: float,
    overlap: bool,
) -> None:
    _overlap(monkeypatch, overlap)
    location = store.put("big-flip", big_tensors)
    path = _path(store, location)
    data = bytearray(path.read_bytes())
    data[min(int(len(data) * where), len(data) - 1)] ^= 0x10
    path.write_bytes(data)
    with pytest.raises(FeatureCorruptError, match="checksum"):
        store.get(location)
    with pytest.raises(FeatureCorruptError, match="checksum"):
        store.get_into(location, bytearray(location.nbytes))
    assert set(paths.used) == {"_read_overlapped" if overlap else "_read_single"}


def test_big_truncated_file_is_corrupt(
    store: FileFeatureStore,
    big_tensors: dict[str, torch.Tensor],
    paths: _Paths,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _overlap(monkeypatch, True)
    location = store.put("big-trunc", big_tensors)
    os.truncate(_path(store, location), location.nbytes // 2)
    with pytest.raises(FeatureCorruptError, match="truncated"):
        store.get(location)
    with pytest.raises(FeatureCorruptError, match="truncated"):
        store.get_into(location, bytearray(location.nbytes))


@pytest.mark.parametrize("keep", [0, 1, 5 << 20, (12 << 20) - 1], ids=str)
def test_file_ending_during_an_overlapped_read_is_corrupt(keep: int) -> None:
    """The size was checked first, but the file can still shrink while it is read."""
    size = 12 << 20
    with (
        memoryview(alloc_buffer(size)) as view,
        pytest.raises(FeatureCorruptError, match=f"after {keep} of {size} bytes"),
    ):
        file_store._read_overlapped(io.BytesIO(os.urandom(keep)), view, "file:x")


def test_overlapped_hash_is_the_file_checksum() -> None:
    data = os.urandom((12 << 20) + 12345)
    view = memoryview(alloc_buffer(len(data)))
    hasher = file_store._read_overlapped(io.BytesIO(data), view, "file:x")
    assert f"xxh3_128:{hasher.hexdigest()}" == checksum(data)
    assert view == data


class _StalledWorker:
    """A worker that never gets a core: its steps run only after the get is over."""

    def __init__(self) -> None:
        self.steps: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        self.steps.append((fn, args))


class _EagerWorker:
    """A worker that runs each step at once, before the next read."""

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        fn(*args)


class _ShutDownWorker:
    """The worker of an interpreter that is shutting down."""

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")


class _ThreadWorker:
    """A worker that runs each step at once, on a thread of its own."""

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        thread = threading.Thread(target=fn, args=args)
        thread.start()
        thread.join()


class _Unusable:
    def update(self, data: object) -> None:
        raise AssertionError("a late worker step touched a finished read")


def test_overlapped_read_does_not_depend_on_the_worker_keeping_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom((12 << 20) + 7)
    stalled = _StalledWorker()
    for worker in (stalled, _EagerWorker(), _ThreadWorker(), _ShutDownWorker()):
        monkeypatch.setattr(file_store, "_hash_worker", lambda worker=worker: worker)
        with memoryview(alloc_buffer(len(data))) as view:
            hasher = file_store._read_overlapped(io.BytesIO(data), view, "file:x")
            assert f"xxh3_128:{hasher.hexdigest()}" == checksum(data)
            assert view == data
    assert stalled.steps
    for fn, args in stalled.steps:  # late steps find nothing left to do
        state = fn.__self__  # type: ignore[attr-defined]
        state.hasher = _Unusable()
        fn(*args)
        assert state.error is None


class _FailsOffTheMainThread:
    def __init__(self) -> None:
        self.hasher = xxhash.xxh3_128()

    def update(self, data: object) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("hash failed on the worker")
        self.hasher.update(data)  # type: ignore[arg-type]


def test_worker_errors_reach_the_caller(
    store: FileFeatureStore, big_tensors: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    _overlap(monkeypatch, True)
    location = store.put("big-fail", big_tensors)
    monkeypatch.setattr(file_store, "_hash_worker", _ThreadWorker)
    monkeypatch.setattr(file_store.codec, "new_hasher", _FailsOffTheMainThread)
    with pytest.raises(RuntimeError, match="hash failed on the worker"):
        store.get(location)


def test_concurrent_overlapped_gets_share_the_worker(
    store: FileFeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_store, "OVERLAP_MIN_BYTES", 0)
    monkeypatch.setattr(file_store, "CHUNK", 64 << 10)  # many pieces per get
    samples = {
        f"c{i}": {"x": torch.randn(1 << 16, generator=torch.Generator().manual_seed(i))}
        for i in range(4)
    }
    locations = {sid: store.put(sid, tensors) for sid, tensors in samples.items()}
    errors: list[BaseException] = []

    def reader(sid: str) -> None:
        try:
            for _ in range(10):
                assert torch.equal(store.get(locations[sid])["x"], samples[sid]["x"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(sid,)) for sid in samples]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors


def _get_in_child(uri: str, location: FeatureLocation, report: str) -> None:
    torch.set_num_threads(1)
    file_store.OVERLAP_MIN_BYTES = 0
    store = open_store(uri)
    out = store.get(location)
    Path(report).write_text(str(int(out["x"].sum().item())))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_gets_its_own_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_store, "OVERLAP_MIN_BYTES", 0)
    uri = f"file://{tmp_path / 'features'}"
    store = open_store(uri)
    location = store.put("forked", {"x": torch.arange(1000)})
    store.get(location)  # the parent's worker thread now exists
    report = tmp_path / "child.txt"
    child = multiprocessing.get_context("fork").Process(
        target=_get_in_child, args=(uri, location, str(report))
    )
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's worker thread")
    assert child.exitcode == 0
    assert report.read_text() == str(sum(range(1000)))


# --- concurrent writers of one sample id --------------------------------------------------

WRITERS = 4
ROUNDS = 100


def _value(writer: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((16, 1024), float(writer))}  # 64 KiB, below torch's parallel grain


def _write_many(uri: str, writer: int, report: str) -> None:
    torch.set_num_threads(1)  # a forked child must not rely on the parent's thread pool
    store = open_store(uri)
    checksums = {store.put("contended", _value(writer)).checksum for _ in range(ROUNDS)}
    Path(report).write_text("\n".join(sorted(checksums)))


def test_concurrent_writers_leave_one_whole_file_and_agree_on_it(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 'features'}"
    store = open_store(uri)
    assert isinstance(store, FileFeatureStore)
    by_checksum = {checksum(encode(_value(w))[0]): w for w in range(1, WRITERS + 1)}

    # fork starts in milliseconds; spawn (re-importing torch per process) where fork is missing.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    reports = [tmp_path / f"writer-{w}.txt" for w in range(1, WRITERS + 1)]
    procs = [
        ctx.Process(target=_write_many, args=(uri, w, str(reports[w - 1])))
        for w in range(1, WRITERS + 1)
    ]
    for proc in procs:
        proc.start()
    while any(proc.is_alive() for proc in procs):  # a reader never sees a torn file meanwhile
        for path in store.root.rglob("*.safetensors"):
            digest = "xxh3_128:" + xxhash.xxh3_128_hexdigest(path.read_bytes())
            assert digest in by_checksum, "a reader saw a torn or mixed file"
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    (path,) = _files(store.root)
    assert path.name == "contended.safetensors"
    stored = "xxh3_128:" + xxhash.xxh3_128_hexdigest(path.read_bytes())
    winner = by_checksum[stored]
    # Every put of every writer returned the location of the one stored copy.
    assert {r.read_text() for r in reports} == {stored}
    location = store.put("contended", _value(0))
    assert location.checksum == stored
    assert torch.equal(store.get(location)["x"], _value(winner)["x"])
