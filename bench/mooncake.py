"""mooncake:// throughput across processes, next to file:// and a plain memcpy of the same bytes.

One real ``mooncake_master`` and one segment holder (``mooncake_client``, its own process); this
process is the store client, as a capture or trainer node would be, over TCP on loopback. One
sample of 64 MiB of bf16 hidden states ([1, 8192, 4096], the featurestore suite's sample).
Repetitions of every case are interleaved so drift hits all alike; medians.

- ``mooncake_put``: encode into a registered pooled buffer + xxh3 + ``put_from`` (a fresh id
  each time); ``mooncake_get``: into a fresh buffer the caller owns (the trainer's fetch);
  ``mooncake_get_into``: into a reused buffer, registered per call; ``raw_put_from`` /
  ``raw_get_into``: the client moving the same bytes between registered buffers with no encode
  or checksum (the transport's ceiling); ``file_put`` (fsync'd) / ``file_get_into`` (reused
  buffer); ``memcpy``: one copy of the bytes into a reused buffer, the floor of any in-memory move.
- Fetch latency of a trainer loop (``get``, one sample in flight) per 64 MiB and 4 MiB sample;
  and 8 x 4 MiB samples in flight (8 buffers), fetched one by one with ``get_into`` vs in one
  batched ``get_many_into``, per sample.
- One object per sample vs one per tensor (the capture's four tensors), raw client: the
  measurement behind the backend's layout.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from bench.report import BenchReport
from specforge_common.featurestore import FileFeatureStore, open_store
from specforge_common.featurestore.codec import alloc_buffer
from specforge_common.featurestore.mooncake import MooncakeFeatureStore
from specforge_common.mooncake_processes import MooncakeHolder, MooncakeMaster, missing_reason

SHAPE = (1, 8192, 4096)
SMALL = (1, 512, 4096)  # 4 MiB
REPS = 9
FETCHES = 30
BATCH = 8
SEGMENT = "2GiB"


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _throughput(report: BenchReport, store: MooncakeFeatureStore, tmp: str) -> None:
    hidden = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tensors = {"hidden_states": hidden}
    location = store.put("bench-0", tensors)
    nbytes = location.nbytes
    gb = nbytes / 1e9
    disk = open_store(f"file://{tmp}/features")
    assert isinstance(disk, FileFeatureStore)
    disk_location = disk.put("bench-0", tensors)
    disk_buffer = alloc_buffer(nbytes)
    copy_source, copy_target = alloc_buffer(nbytes), alloc_buffer(nbytes)
    copy_source[:] = memoryview(disk_buffer)  # any bytes: only the copy is timed
    mooncake_buffer = alloc_buffer(nbytes)
    raw = store._client
    src, dst = store.pool.acquire(nbytes), store.pool.acquire(nbytes)
    src.view[:nbytes] = copy_source
    puts = iter(range(1, 10_000))

    def mooncake_put() -> None:
        store.delete(store.put(f"bench-{next(puts)}", tensors))

    def raw_put() -> None:
        key = f"raw-{next(puts)}"
        assert raw.put_from(key, src.address, nbytes) == 0
        raw.remove(key, True)

    assert raw.put_from("raw-get", src.address, nbytes) == 0
    cases: dict[str, Callable[[], object]] = {
        "mooncake_get": lambda: store.get(location),
        "mooncake_get_into": lambda: store.get_into(location, mooncake_buffer),
        "raw_get_into": lambda: raw.get_into("raw-get", dst.address, nbytes),
        "file_get_into": lambda: disk.get_into(disk_location, disk_buffer),
        "memcpy": lambda: copy_target.__setitem__(slice(None), copy_source),
        # Puts time the delete too (it is a metadata call, ~0.1 ms) so the segment never fills.
        "mooncake_put": mooncake_put,
        "raw_put_from": raw_put,
    }
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(REPS):
        for name, fn in cases.items():
            times[name].append(_seconds(fn))
    times["file_put"] = []
    for i in range(REPS):  # fsync dirties the page cache: apart from the reads
        times["file_put"].append(_seconds(lambda i=i: disk.put(f"put-{i}", tensors)))
    raw.remove("raw-get", True)
    src.release()
    dst.release()

    rate = {name: gb / statistics.median(ts) for name, ts in times.items()}
    for name in ("mooncake_put", "mooncake_get", "mooncake_get_into", "raw_put_from",
                 "raw_get_into", "file_put", "file_get_into", "memcpy"):  # fmt: skip
        report.add(name, rate[name], "GB/s")
    report.add("sample_size", nbytes / 2**20, "MiB")
    report.ratios["mooncake_get_into_vs_memcpy"] = rate["mooncake_get_into"] / rate["memcpy"]
    report.ratios["mooncake_get_into_vs_file_get_into"] = (
        rate["mooncake_get_into"] / rate["file_get_into"]
    )
    report.ratios["mooncake_put_vs_file_put"] = rate["mooncake_put"] / rate["file_put"]
    report.ratios["mooncake_get_into_vs_raw_get_into"] = (
        rate["mooncake_get_into"] / rate["raw_get_into"]
    )
    report.ratios["mooncake_put_vs_raw_put_from"] = rate["mooncake_put"] / rate["raw_put_from"]
    store.delete(location)


def _latency(report: BenchReport, store: MooncakeFeatureStore) -> None:
    for label, shape in (("64MiB", SHAPE), ("4MiB", SMALL)):
        tensors = {"hidden_states": torch.randn(shape).to(torch.bfloat16)}
        locations = [store.put(f"lat-{label}-{i}", tensors) for i in range(BATCH)]
        store.get(locations[0])
        samples = []
        for i in range(FETCHES):
            start = time.perf_counter()
            store.get(locations[i % BATCH])
            samples.append(time.perf_counter() - start)
        report.add(f"fetch_{label}_p50", statistics.median(samples) * 1e3, "ms")
        report.add(f"fetch_{label}_p95", _percentile(samples, 0.95) * 1e3, "ms")
        if label == "4MiB":  # 8 samples in flight, each in its own reused buffer
            buffers = [alloc_buffer(loc.nbytes) for loc in locations]
            one_by_one: list[float] = []
            batched: list[float] = []
            for _ in range(FETCHES // 3):
                start = time.perf_counter()
                for loc, buffer in zip(locations, buffers, strict=True):
                    store.get_into(loc, buffer)
                one_by_one.append((time.perf_counter() - start) / BATCH)
                start = time.perf_counter()
                results = store.get_many_into(locations, buffers)
                batched.append((time.perf_counter() - start) / BATCH)
                assert all(isinstance(r, dict) for r in results)
                del results
            seq, bat = statistics.median(one_by_one), statistics.median(batched)
            report.add(f"fetch_{label}_x{BATCH}_one_by_one_per_sample", seq * 1e3, "ms")
            report.add(f"fetch_{label}_x{BATCH}_batched_per_sample", bat * 1e3, "ms")
            report.ratios[f"get_many_into_speedup_{label}_x{BATCH}"] = seq / bat
        for location in locations:
            store.delete(location)


def _layout(report: BenchReport, store: MooncakeFeatureStore) -> None:
    """Raw client, the capture's four tensors: one object per sample vs one per tensor."""
    raw = store._client
    for tokens, hidden in ((128, 576), (512, 1024), (2048, 4096)):
        sizes = [tokens * 8, tokens * 8, tokens * 3 * hidden * 2, tokens * hidden * 2]
        total = sum(sizes)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        src, dst = store.pool.acquire(total), store.pool.acquire(total)
        src.view[:total] = os.urandom(total)
        per_sample: list[float] = []
        per_tensor: list[float] = []
        for rep in range(REPS):
            key = f"layout-{tokens}-{rep}"
            start = time.perf_counter()
            assert raw.put_from(key, src.address, total) == 0
            assert raw.get_into(key, dst.address, total) == total
            per_sample.append(time.perf_counter() - start)
            raw.remove(key, True)
            keys = [f"{key}/{i}" for i in range(len(sizes))]
            start = time.perf_counter()
            assert raw.batch_put_from(keys, [src.address + o for o in offsets], sizes) == [0] * 4
            assert raw.batch_get_into(keys, [dst.address + o for o in offsets], sizes) == sizes
            per_tensor.append(time.perf_counter() - start)
            raw.batch_remove(keys, True)
        src.release()
        dst.release()
        label = f"{total / 2**20:.1f}MiB"
        report.add(f"put+get_one_object_per_sample_{label}", statistics.median(per_sample) * 1e3,
                   "ms")  # fmt: skip
        report.add(f"put+get_one_object_per_tensor_{label}", statistics.median(per_tensor) * 1e3,
                   "ms")  # fmt: skip
        report.ratios[f"per_tensor_vs_per_sample_time_{label}"] = statistics.median(
            per_tensor
        ) / statistics.median(per_sample)


def run() -> BenchReport:
    report = BenchReport("mooncake")
    reason = missing_reason()
    if reason is not None:
        report.notes.append(f"skipped: {reason}")
        return report
    with (
        MooncakeMaster() as master,
        MooncakeHolder(master.address, segment_size=SEGMENT),
        tempfile.TemporaryDirectory(prefix="specforge-bench-") as tmp,
    ):
        store = open_store(master.store_uri)
        assert isinstance(store, MooncakeFeatureStore)
        try:
            _throughput(report, store, tmp)
            _latency(report, store)
            _layout(report, store)
        finally:
            store.close()
    report.notes.append(
        f"median of {REPS} interleaved repetitions; GB = 1e9 bytes; TCP on loopback between this "
        f"process and a separate holder process; {os.cpu_count()} CPUs shared by both"
    )
    report.notes.append(
        "mooncake_get allocates and faults in a fresh buffer per call (the caller owns it), as "
        "the trainer's fetch does; mooncake_get_into reuses one buffer and registers it per call; "
        "both verify size + xxh3_128 + specs; puts include encode + checksum and a delete "
        "(metadata only)"
    )
    return report
