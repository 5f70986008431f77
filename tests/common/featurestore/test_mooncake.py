"""mooncake:// store against a real mooncake_master + segment holder on loopback (TCP).

Same bytes, checks and first-copy-wins semantics as file:// and mem://; puts send from registered
pooled buffers and get_into lands in the caller's buffer; typed errors for missing, corrupt and
foreign samples.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
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
    open_store,
)
from specforge_common.featurestore.codec import encode
from specforge_common.featurestore.mooncake import (
    MooncakeFeatureStore,
    MooncakeOptions,
    MooncakeUnavailableError,
)
from specforge_common.featurestore.mooncake_buffers import size_class
from specforge_common.mooncake_processes import (
    MooncakeHolder,
    MooncakeMaster,
    free_port,
    missing_reason,
)

REASON = missing_reason()
needs_mooncake = pytest.mark.skipif(REASON is not None, reason=REASON or "")

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
SEGMENT = 1 << 30


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def _sample(tokens: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The capture's four tensors (EAGLE-3: three aux layers concatenated + the last layer)."""
    return {
        "input_ids": torch.arange(tokens, dtype=torch.int64),
        "loss_mask": torch.ones(tokens, dtype=torch.int64),
        "aux_hidden_states": _tensor(torch.bfloat16, (tokens, 3 * hidden), seed),
        "hidden_states": _tensor(torch.bfloat16, (tokens, hidden), seed + 1),
    }


def _equal(out: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return set(out) == set(expected) and all(
        out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v)
        for k, v in expected.items()
    )


def _with(location: FeatureLocation, **changes: object) -> FeatureLocation:
    fields = {"uri": location.uri, "tensors": location.tensors, "nbytes": location.nbytes,
              "checksum": location.checksum}  # fmt: skip
    return FeatureLocation(**(fields | changes))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def master() -> Iterator[MooncakeMaster]:
    """One real master and one holder (1 GiB segment) for the module."""
    if REASON is not None:
        pytest.skip(REASON)
    with MooncakeMaster() as running, MooncakeHolder(running.address, segment_size=SEGMENT):
        yield running


@pytest.fixture(scope="module")
def connected(master: MooncakeMaster) -> Iterator[MooncakeFeatureStore]:
    """One store opened the ordinary way; its client serves every test (a close takes ~1 s)."""
    opened = open_store(master.store_uri)
    assert isinstance(opened, MooncakeFeatureStore)
    yield opened
    opened.close()


@pytest.fixture
def store(connected: MooncakeFeatureStore) -> Iterator[MooncakeFeatureStore]:
    """A fresh namespace per test on the shared client, so tests never see each other's
    samples (the namespace is all a store adds to its client)."""
    uri = f"{connected.uri}?namespace=t-{uuid.uuid4().hex[:12]}"
    scoped = MooncakeFeatureStore(uri, MooncakeOptions.parse(uri), connected._client)
    yield scoped
    scoped.pool.close()  # not close(): that would disconnect the shared client


# --- no server needed -------------------------------------------------------------------------


def test_size_classes_have_at_most_a_quarter_of_slack() -> None:
    assert size_class(1) == 64 << 10
    for nbytes in (65537, 3_000_000, 64 << 20, (64 << 20) + 17_000, 300 << 20):
        capacity = size_class(nbytes)
        assert nbytes <= capacity <= nbytes * 1.25
    assert size_class((64 << 20) + 17_000) == 80 << 20  # not 128 MiB for a 64 MiB sample


def test_uri_options() -> None:
    options = MooncakeOptions.parse(
        "mooncake://10.0.0.5:50051?protocol=rdma&devices=mlx5_0,mlx5_1&segment=512MiB"
        "&namespace=run-7&host=10.0.0.9&pool=2GiB&pin=0"
    )
    assert (options.master, options.protocol, options.devices) == (
        "10.0.0.5:50051",
        "rdma",
        "mlx5_0,mlx5_1",
    )
    assert (options.segment, options.pool, options.namespace, options.host, options.pin) == (
        512 << 20,
        2 << 30,
        "run-7",
        "10.0.0.9",
        "0",
    )
    plain = MooncakeOptions.parse("mooncake://127.0.0.1:50051")
    assert (plain.protocol, plain.segment, plain.namespace, plain.host, plain.metadata) == (
        "tcp",
        0,
        "default",
        "127.0.0.1",
        "P2PHANDSHAKE",
    )


@pytest.mark.parametrize(
    "uri",
    [
        "mooncake://127.0.0.1",
        "mooncake://:50051",
        "mooncake://127.0.0.1:50051/path",
        "mooncake://127.0.0.1:50051?protocl=tcp",
        "mooncake://127.0.0.1:50051?protocol=udp",
        "mooncake://127.0.0.1:50051?namespace=a/b",
        "mooncake://127.0.0.1:50051?segment=lots",
        "mooncake://127.0.0.1:99999",
    ],
)
def test_bad_uris_are_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        MooncakeOptions.parse(uri)


def test_a_missing_wheel_fails_only_when_a_store_is_opened(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.store", None)  # what an absent wheel looks like
    with pytest.raises(MooncakeUnavailableError, match="pip install mooncake-transfer-engine"):
        open_store("mooncake://127.0.0.1:50051")
    assert open_store("mem://").uri == "mem://"  # the other stores do not care


@needs_mooncake
def test_no_master_fails_fast_with_a_hint() -> None:
    started = time.monotonic()
    with pytest.raises(FeatureStoreError, match="specforge mooncake-master"):
        open_store(f"mooncake://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 5  # Mooncake alone retries for ~90 s


# --- against the real master + holder ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_each_dtype(store: MooncakeFeatureStore, dtype: torch.dtype) -> None:
    tensors = {
        "matrix": _tensor(dtype, (5, 9)),
        "scalar": _tensor(dtype, ()),
        "empty": _tensor(dtype, (3, 0)),
    }
    location = store.put("s", tensors)
    assert _equal(store.get(location), tensors)


def test_location_matches_the_file_and_memory_stores(
    store: MooncakeFeatureStore, tmp_path: Path
) -> None:
    tensors = _sample(300, 64)
    location = store.put("same", tensors)
    disk = open_store(f"file://{tmp_path}").put("same", tensors)
    mem = open_store(f"mem://mc-{uuid.uuid4().hex[:8]}").put("same", tensors)
    assert location.uri == f"mooncake:{store.namespace}/same"
    for other in (disk, mem):
        assert (location.tensors, location.nbytes, location.checksum) == (
            other.tensors,
            other.nbytes,
            other.checksum,
        )
    buf, _ = encode(tensors)
    assert location.checksum == "xxh3_128:" + xxhash.xxh3_128_hexdigest(bytes(buf))
    assert isinstance(store, FeatureStore)


def test_caller_owns_what_get_returns(store: MooncakeFeatureStore) -> None:
    location = store.put("own", {"x": torch.zeros(4, 4)})
    first = store.get(location)
    first["x"].fill_(5)
    second = store.get(location)
    assert torch.equal(second["x"], torch.zeros(4, 4))


def test_get_into_is_zero_copy(store: MooncakeFeatureStore) -> None:
    tensors = _sample(512, 256, seed=3)
    location = store.put("into", tensors)
    target = bytearray(location.nbytes)
    out = store.get_into(location, target)
    assert _equal(out, tensors)
    start = torch.frombuffer(target, dtype=torch.uint8).data_ptr()
    assert all(start <= t.data_ptr() < start + len(target) for t in out.values() if t.numel())


def test_puts_reuse_registered_pool_buffers(store: MooncakeFeatureStore) -> None:
    tensors = _sample(512, 256, seed=4)
    store.put("warm-0", tensors)
    registered = store.pool.registered
    for i in range(1, 4):  # a warm put allocates and registers nothing new
        assert _equal(store.get(store.put(f"warm-{i}", tensors)), tensors)
    assert store.pool.registered == registered and store.pool.free_bytes > 0
    buffer = store.pool.acquire(100)
    buffer.release()
    with pytest.raises(ValueError, match="already released"):
        buffer.release()


def test_the_pool_keeps_no_more_free_buffers_than_allowed(
    connected: MooncakeFeatureStore,
) -> None:
    uri = f"{connected.uri}?namespace=t-{uuid.uuid4().hex[:12]}&pool=1MiB"
    store = MooncakeFeatureStore(uri, MooncakeOptions.parse(uri), connected._client)
    try:
        small, big = store.pool.acquire(100_000), store.pool.acquire(3 << 20)
        assert store.pool.registered == 2 and small.capacity >= 100_000
        small.release()  # fits under 1 MiB: kept registered for reuse
        big.release()  # would exceed it: unregistered and dropped
        assert store.pool.registered == 1 and store.pool.free_bytes == small.capacity
        location = store.put("after", {"x": torch.arange(5)})  # and the store goes on as usual
        assert torch.equal(store.get(location)["x"], torch.arange(5))
    finally:
        store.pool.close()


def test_pinning_without_cuda_is_refused(connected: MooncakeFeatureStore) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: pin=1 is valid here")
    uri = f"{connected.uri}?pin=1"
    with pytest.raises(ValueError, match="pin=1 needs CUDA"):
        MooncakeFeatureStore(uri, MooncakeOptions.parse(uri), connected._client)


def test_get_into_a_plain_buffer(store: MooncakeFeatureStore) -> None:
    tensors = _sample(64, 32)
    location = store.put("plain", tensors)
    target = bytearray(location.nbytes + 10)
    assert _equal(store.get_into(location, target), tensors)
    with pytest.raises(ValueError, match="needs"):
        store.get_into(location, bytearray(location.nbytes - 1))
    with pytest.raises(ValueError, match="read-only"):
        store.get_into(location, bytes(location.nbytes))


def test_a_64_mib_sample_round_trips_through_registered_buffers(
    store: MooncakeFeatureStore,
) -> None:
    tensors = _sample(2048, 4096, seed=5)  # 64 MiB: a 2k-token sample of a 4k-hidden target
    location = store.put("big", tensors)
    assert location.nbytes > 64 << 20
    assert _equal(store.get(location), tensors)
    store.delete(location)


def test_a_256_mib_sample(store: MooncakeFeatureStore) -> None:
    tensors = _sample(8192, 4096, seed=6)
    location = store.put("huge", tensors)
    assert location.nbytes > 256 << 20
    assert _equal(store.get(location), tensors)
    store.delete(location)


def test_first_copy_wins_so_a_published_location_stays_valid(
    store: MooncakeFeatureStore,
) -> None:
    first = {"x": torch.arange(6.0)}
    location = store.put("dup", first)
    again = store.put("dup", {"x": torch.arange(6.0) + 1})  # a redelivered capture
    assert (again.uri, again.nbytes, again.checksum) == (
        location.uri,
        location.nbytes,
        location.checksum,
    )
    assert _equal(store.get(location), first)


def test_a_damaged_copy_is_replaced_by_the_next_put(store: MooncakeFeatureStore) -> None:
    location = store.put("damaged", {"x": torch.arange(4.0)})
    key = store._key("damaged")
    assert store._client.upsert(key, b"\x00" * 64) == 0  # garbage, written by the raw client
    with pytest.raises(FeatureCorruptError):
        store.get(location)
    replaced = store.put("damaged", {"x": torch.arange(4.0) * 2})
    assert _equal(store.get(replaced), {"x": torch.arange(4.0) * 2})


def test_corruption_is_detected_on_read(store: MooncakeFeatureStore) -> None:
    location = store.put("flip", _sample(32, 16))
    key = store._key("flip")
    stored = bytearray(store._client.get(key))
    assert len(stored) == location.nbytes
    stored[-1] ^= 0xFF  # same size, one data byte different
    assert store._client.upsert(key, bytes(stored)) == 0
    with pytest.raises(FeatureCorruptError, match="checksum"):
        store.get(location)
    with pytest.raises(FeatureCorruptError, match="checksum"):
        store.get_into(location, bytearray(location.nbytes))
    assert store._client.upsert(key, bytes(stored[:-8])) == 0  # shorter
    with pytest.raises(FeatureCorruptError, match="bytes stored"):
        store.get(location)
    assert store._client.upsert(key, bytes(stored) + b"more") == 0  # longer
    with pytest.raises(FeatureCorruptError, match="bytes stored"):
        store.get(location)


def test_specs_that_disagree_with_the_object_are_corrupt(store: MooncakeFeatureStore) -> None:
    location = store.put("specs", {"x": torch.zeros(2, 3)})
    for specs in (
        (TensorSpec("x", "float32", (3, 2)),),
        (TensorSpec("x", "int32", (2, 3)),),
        (TensorSpec("y", "float32", (2, 3)),),
    ):
        with pytest.raises(FeatureCorruptError):
            store.get(_with(location, tensors=specs))


def test_missing_delete_exists(store: MooncakeFeatureStore) -> None:
    location = store.put("m", {"x": torch.zeros(1)})
    assert store.exists(location)
    store.delete(location)  # at once, though the put's read lease still runs
    assert not store.exists(location)
    store.delete(location)  # idempotent
    with pytest.raises(FeatureMissingError, match="evicted"):
        store.get(location)
    with pytest.raises(FeatureMissingError):
        store.get_into(location, bytearray(location.nbytes))
    never = _with(location, uri=f"mooncake:{store.namespace}/never-written")
    assert not store.exists(never)
    with pytest.raises(FeatureMissingError):
        store.get(never)


def test_delete_then_put_stores_the_new_value(store: MooncakeFeatureStore) -> None:
    store.delete(store.put("again", {"x": torch.zeros(2)}))
    location = store.put("again", {"x": torch.ones(2)})
    assert _equal(store.get(location), {"x": torch.ones(2)})


def test_foreign_locations_are_refused(store: MooncakeFeatureStore) -> None:
    location = store.put("mine", {"x": torch.zeros(1)})
    with pytest.raises(FeatureOutsideRootError, match="namespace"):
        store.get(_with(location, uri="mooncake:someone-else/mine"))
    for uri in ("mooncake:" + store.namespace + "/../x", "mooncake:" + store.namespace + "/"):
        with pytest.raises(FeatureOutsideRootError):
            store.exists(_with(location, uri=uri))
    for call in (store.get, store.exists, store.delete):
        with pytest.raises(FeatureStoreError, match="not a mooncake: location"):
            call(_with(location, uri="file:ab/mine.safetensors"))
    with pytest.raises(FeatureStoreError, match="algorithm"):
        store.get(_with(location, checksum="sha1:00"))
    with pytest.raises(ValueError):
        store.put("../escape", {"x": torch.zeros(1)})


def test_get_many_into_reports_each_sample_alone(store: MooncakeFeatureStore) -> None:
    samples = [_sample(100 + i, 32, seed=i) for i in range(3)]
    locations = [store.put(f"many-{i}", s) for i, s in enumerate(samples)]
    missing = _with(locations[0], uri=f"mooncake:{store.namespace}/gone")
    foreign = _with(locations[0], uri="mooncake:other/many-0")
    wanted = [*locations, missing, foreign]
    buffers: list[object] = [bytearray(loc.nbytes) for loc in wanted]
    buffers[1] = memoryview(bytearray(locations[1].nbytes + 16))  # longer than needed is fine
    results = store.get_many_into(wanted, buffers)
    for out, expected in zip(results[:3], samples, strict=True):
        assert isinstance(out, dict) and _equal(out, expected)
    assert isinstance(results[3], FeatureMissingError)
    assert isinstance(results[4], FeatureOutsideRootError)
    with pytest.raises(ValueError, match="locations"):
        store.get_many_into(wanted, buffers[:2])


def test_concurrent_threads_put_and_fetch(store: MooncakeFeatureStore) -> None:
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(5):
                tensors = _sample(64 + i, 48, seed=w * 10 + i)
                location = store.put(f"w{w}-{i}", tensors)
                assert _equal(store.get(location), tensors)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_closed_store_refuses(master: MooncakeMaster) -> None:
    store = open_store(f"{master.store_uri}?namespace=closing")
    location = store.put("c", {"x": torch.zeros(1)})
    kept = store.get(location)
    store.close()
    store.close()  # idempotent
    for call in (store.get, store.exists, store.delete):
        with pytest.raises(FeatureStoreError, match="closed"):
            call(location)
    with pytest.raises(FeatureStoreError, match="closed"):
        store.put("d", {"x": torch.zeros(1)})
    assert torch.equal(kept["x"], torch.zeros(1))  # what get returned is the caller's


def test_a_master_without_holders_refuses_puts_clearly() -> None:
    if REASON is not None:
        pytest.skip(REASON)
    with MooncakeMaster() as bare, open_store(bare.store_uri) as store:
        with pytest.raises(FeatureStoreError, match="NO_AVAILABLE_HANDLE"):
            store.put("nowhere", {"x": torch.zeros(1)})
